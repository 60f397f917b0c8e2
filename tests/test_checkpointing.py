"""Activation checkpointing policy (train.gradient_checkpointing_every_n_layers / _offload): which layers are
checkpointed, that gradients are unchanged, and that what autograd keeps for the backward pass shrinks."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tuneforge.config.compose import load_config
from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import PeftConfig, QuantConfig, TrainConfig
from tuneforge.models.adapters import add_lora, enable_checkpointing, prepare_base


def _lora_model(train: TrainConfig):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    model = prepare_base(model, QuantConfig(load_in_4bit=False))
    return add_lora(enable_checkpointing(model, train), PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0))


def _step(model) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, LoRA gradients, and the bytes autograd keeps outside checkpointed regions during the forward."""
    model.train()
    batch = torch.arange(2, 66).reshape(2, 32)
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, sum(kept)


def test_layer_policy_keeps_gradients_and_trades_memory():
    runs = {
        "off": TrainConfig(gradient_checkpointing=False),
        "every layer": TrainConfig(),
        "one layer in 2": TrainConfig(gradient_checkpointing_every_n_layers=2),
        "offloaded": TrainConfig(gradient_checkpointing_offload=True),
    }
    results = {}
    for name, train in runs.items():
        model = _lora_model(train)
        flags = [layer.gradient_checkpointing for layer in model.get_base_model().model.layers]
        expected = {"off": [False] * 6, "one layer in 2": [True, False] * 3}.get(name, [True] * 6)
        assert flags == expected, name
        results[name] = _step(model)
    loss, grads, _ = results["off"]
    for name, (other_loss, other_grads, _) in results.items():
        assert other_loss == pytest.approx(loss, rel=1e-6), name
        assert other_grads.keys() == grads.keys() and any(g.abs().sum() > 0 for g in grads.values())
        for key in grads:
            assert torch.allclose(other_grads[key], grads[key], rtol=1e-5, atol=1e-7), (name, key)
    kept = {name: r[2] for name, r in results.items()}
    assert kept["every layer"] < kept["one layer in 2"] < kept["off"]


def test_layer_policy_config_rules():
    cfg = load_config(["train.gradient_checkpointing=true", "train.gradient_checkpointing_every_n_layers=2",
                       "train.gradient_checkpointing_offload=true"])
    assert cfg.train.gradient_checkpointing_every_n_layers == 2 and cfg.train.gradient_checkpointing_offload
    with pytest.raises(ConfigError, match="must be >= 1"):
        load_config(["train.gradient_checkpointing_every_n_layers=0"])
    with pytest.raises(ConfigError, match="set train.gradient_checkpointing=true"):
        load_config(["train.gradient_checkpointing=false", "train.gradient_checkpointing_every_n_layers=2"])
