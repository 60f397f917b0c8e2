"""4-bit layers stay trainable after generation (bitsandbytes' CPU repacking would drop their gradient)."""

from __future__ import annotations

import torch

from tuneforge.config import ModelConfig, QuantConfig
from tuneforge.inference import GenerationSettings, generate
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
