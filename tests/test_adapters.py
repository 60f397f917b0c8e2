"""LoRA layers under mixed precision: no round trip of every adapted input through fp32, and no value changed."""

from __future__ import annotations

import sys

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import REPO
from tuneforge.config.schemas import PeftConfig
from tuneforge.models.adapters import add_lora, lora_config

sys.path.insert(0, str(REPO / "benchmarks"))
from lora_casts import CastBytes  # noqa: E402  (the counter of benchmarks/lora_casts.py)

H, I, LAYERS = 64, 128, 2
LORA = PeftConfig(r=4, lora_alpha=8, lora_dropout=0.0)


def _bf16_llama():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(config).to(torch.bfloat16)


def _pair():
    """tuneforge's LoRA model and PEFT's own on the same bf16 weights, LoRA B made nonzero alike."""
    ours, plain = add_lora(_bf16_llama(), LORA), get_peft_model(_bf16_llama(), lora_config(LORA))
    for model in (ours, plain):
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data.normal_(0, 0.05)  # LoRA B starts at zero: give the adapters a real contribution
    assert {p.dtype for n, p in ours.named_parameters() if "lora_" in n} == {torch.float32}  # PEFT's fp32 adapters
    return ours, plain


def test_autocast_training_step_skips_the_fp32_round_trip_and_changes_nothing():
    ours, plain = _pair()
    ids = torch.randint(0, 256, (2, 16))
    losses, grads, cast = [], [], []
    for model in (ours, plain):
        with CastBytes() as counter, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        cast.append(counter.bytes)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    # bf16 -> fp32 -> bf16 is exact: the same loss and the same adapter gradients, bit for bit.
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * LAYERS
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    # Forward: each adapted input (q, k, v, o, gate, up: h wide; down: i wide) was copied bf16 -> fp32 by PEFT
    # (2 + 4 bytes) and back by autocast (4 + 2): 12 bytes per element, per token and layer, now not at all.
    assert cast[1] - cast[0] == 12 * (6 * H + I) * ids.numel() * LAYERS


def test_outside_autocast_the_fp32_adapters_still_get_their_input_cast():
    """Generation runs without autocast: a bf16 input into fp32 adapters needs PEFT's cast, before and after
    an autocast step."""
    ours, plain = _pair()
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        before = ours(input_ids=ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours(input_ids=ids)
        after = ours(input_ids=ids).logits
        reference = plain(input_ids=ids).logits
    assert torch.equal(before, reference) and torch.equal(after, reference)
