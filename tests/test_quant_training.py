"""4-bit layers stay trainable after generation (bitsandbytes' CPU repacking would drop their gradient)."""

from __future__ import annotations

import torch

from tuneforge.config.schemas import ModelConfig, QuantConfig
from tuneforge.eval.inference import GenerationSettings, generate
from tuneforge.models.loading import load_model


def test_gradient_through_4bit_layer_survives_generation(smollm_dir, smollm_tokenizer):
    import bitsandbytes as bnb

    model = load_model(smollm_dir, ModelConfig(), QuantConfig())
    generate(model, smollm_tokenizer, ["Hi"], GenerationSettings(max_new_tokens=2))  # eval-mode forwards
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    model.train()
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    expected = torch.ones(2, 5, layer.out_features) @ weight  # d(sum(x W^T))/dx
    assert x.grad is not None
    assert torch.allclose(x.grad, expected, rtol=1e-3, atol=1e-3)


def test_added_tokens_are_trainable_under_lora(smollm_dir):
    """A token added by the tokenizer config gets a trainable embedding row (PEFT trainable_token_indices)."""
    from tuneforge.config.schemas import PeftConfig, TokenizerConfig
    from tuneforge.models.adapters import add_lora
    from tuneforge.models.loading import fit_embeddings
    from tuneforge.models.tokenizer import load_tokenizer, new_token_ids

    tokenizer, report = load_tokenizer(smollm_dir, TokenizerConfig(add_special_tokens=["<|answer|>"]))
    ids = new_token_ids(tokenizer, report)
    assert ids == [tokenizer.convert_tokens_to_ids("<|answer|>")] and ids[0] == 49152
    model = load_model(smollm_dir, ModelConfig(dtype="float32"), QuantConfig(load_in_4bit=False))
    fit_embeddings(model, tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == 49216  # 49152 + 64, not 65536
    model = add_lora(model, PeftConfig(lora_dropout=0.0), new_token_ids=ids)
    before = model.get_input_embeddings()(torch.tensor([ids])).detach().clone()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "token_adapter" in n]
    assert trainable, "the new token's embedding is not trainable"
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    batch = torch.tensor([[1, 2, ids[0], 3]])
    model(input_ids=batch, labels=batch).loss.backward()
    opt.step()
    after = model.get_input_embeddings()(torch.tensor([ids])).detach()
    assert not torch.allclose(before, after)


def test_4bit_base_without_upcast_keeps_loaded_dtype_and_trains(smollm_dir):
    """quant.upcast_non_quantized=false: embeddings and norms stay bf16 (no fp32 copy), LoRA stays fp32 and
    trainable through checkpointed layers, and the loss matches the upcast model's within bf16 rounding."""
    from tuneforge.config.schemas import PeftConfig, TrainConfig
    from tuneforge.models.adapters import add_lora, enable_checkpointing, prepare_base

    batch = torch.tensor([[1, 504, 3373, 282, 260, 1789, 30, 2]])
    losses = {}
    for upcast in (True, False):
        torch.manual_seed(0)
        quant = QuantConfig(bnb_4bit_compute_dtype="bfloat16", upcast_non_quantized=upcast)
        model = prepare_base(load_model(smollm_dir, ModelConfig(), quant), quant)
        model = add_lora(enable_checkpointing(model, TrainConfig()), PeftConfig(lora_dropout=0.0))
        model.train()
        base = model.get_base_model()
        kept = torch.float32 if upcast else torch.bfloat16
        assert base.get_input_embeddings().weight.dtype == kept
        assert base.model.norm.weight.dtype == kept
        assert not base.get_input_embeddings().weight.requires_grad
        lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert lora and all("lora_" in n and p.dtype == torch.float32 for n, p in lora.items())
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        # LoRA B starts at zero: its gradient is what flows back through the checkpointed 4-bit layers.
        grads = [p.grad for n, p in lora.items() if "lora_B" in n]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
        losses[upcast] = loss.item()
    assert abs(losses[True] - losses[False]) <= 2e-2 * abs(losses[True])
