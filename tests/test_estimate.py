"""The GPU memory estimate against peaks measured on an H100 (benchmarks/estimate_memory.py), and its parts."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO
from tuneforge.config.compose import load_config
from tuneforge.models import estimate
from tuneforge.models.estimate import (
    CUDA_CONTEXT_GIB,
    SHAPE_TABLE,
    estimate_memory,
    fit_advice,
    largest_micro_batch,
    table_config,
)

sys.path.insert(0, str(REPO / "benchmarks"))


def test_estimate_within_ten_percent_of_measured_peaks():
    import estimate_memory as bench

    rows = bench.rows()
    assert len(rows) == 6
    for row in rows:
        assert abs(row["error_pct"]) <= 10, row


def test_parts_scale_as_expected():
    config = table_config("meta-llama/Llama-3.1-8B")
    base = load_config(["train.per_device_train_batch_size=2", "train.max_length=4096",
                        "train.gradient_checkpointing=true"])
    est = estimate_memory(config, base)
    # NF4 linear weights (~7.0e9 params at 0.516 B) + fp32 embeddings and LM head (2 x 525e6 x 4 B).
    assert est["weights"] == pytest.approx((6.98e9 * 0.5159 + 2 * 525.3e6 * 4) / 2**30, rel=0.01)
    # LoRA r=16 on every linear layer of Llama-3.1-8B: 41.9M fp32 parameters; AdamW keeps two states.
    assert est["trainable"] == pytest.approx(41.9e6 * 4 / 2**30, rel=0.01)
    assert est["optimizer"] == pytest.approx(2 * est["trainable"])
    no_gc = estimate_memory(config, load_config(["train.per_device_train_batch_size=2", "train.max_length=4096",
                                                 "train.gradient_checkpointing=false"]))
    assert no_gc["activations"] > 5 * est["activations"]
    full = estimate_memory(config, load_config(["quant=none", "peft=none", "model.dtype=bfloat16"]))
    assert full["weights"] == pytest.approx(8.03e9 * 2 / 2**30, rel=0.01)
    zero3 = estimate_memory(config, load_config(["launcher=deepspeed_zero3", "launcher.num_processes=8",
                                                 "dry_run=true", "train.per_device_train_batch_size=2", "train.gradient_checkpointing=true",
                                                 "train.max_length=4096"]))
    # Sharded QLoRA keeps the bf16 storage (no fp32 upcast), then divides the weights over the 8 processes.
    bf16_base = estimate_memory(config, base, upcast_non_quantized=False)
    assert zero3["weights"] == pytest.approx(bf16_base["weights"] / 8)
    assert zero3["optimizer"] == pytest.approx(est["optimizer"] / 8)
    # quant.upcast_non_quantized=false: embeddings and LM head stay bf16 (2 B less per parameter), and the
    # checkpointed residual stream is bf16 instead of fp32 (half of its 32 layers x 4096 x 8192 tokens).
    lean = estimate_memory(config, load_config(["train.per_device_train_batch_size=2", "train.max_length=4096",
                                                "train.gradient_checkpointing=true",
                                                "quant.upcast_non_quantized=false"]))
    assert lean == pytest.approx(bf16_base)
    assert est["weights"] - lean["weights"] == pytest.approx(2 * 525.3e6 * 2 / 2**30, rel=0.01)
    assert est["activations"] - lean["activations"] >= 32 * 4096 * 8192 * 2 / 2**30
    # Offloading the checkpointed inputs takes the fp32 residual stream of 32 layers off the GPU; checkpointing
    # one layer in 2 keeps 16 layers' activations instead of their inputs.
    policy = ["train.per_device_train_batch_size=2", "train.max_length=4096", "train.gradient_checkpointing=true"]
    offload = estimate_memory(config, load_config([*policy, "train.gradient_checkpointing_offload=true"]))
    assert est["activations"] - offload["activations"] == pytest.approx(32 * 4096 * 8192 * 4 / 2**30)
    half = estimate_memory(config, load_config([*policy, "train.gradient_checkpointing_every_n_layers=2"]))
    assert est["activations"] < half["activations"] < no_gc["activations"]


@pytest.mark.parametrize("name", sorted(SHAPE_TABLE))
def test_every_table_shape_builds_and_estimates(name):
    config = table_config(name)
    task = ["task=classification", "collator=padding", "quant=none"] if "bert" in name or "minilm" in name else []
    est = estimate_memory(config, load_config(task))
    assert est["total"] > est["weights"] > 0


def test_largest_micro_batch_is_the_last_that_fits():
    config = table_config("meta-llama/Llama-3.1-8B")
    cfg = load_config(["train.max_length=4096", "train.gradient_checkpointing=true"])

    def needs(rows):
        return estimate_memory(config, cfg, tokens_per_micro_batch=rows * 4096)["total"] + CUDA_CONTEXT_GIB

    for budget in (24, 80):
        rows = largest_micro_batch(config, cfg, budget)
        assert rows >= 1 and needs(rows) <= budget < needs(rows + 1)
    assert largest_micro_batch(config, cfg, needs(1) - 0.01) == 0
    assert largest_micro_batch(config, cfg, needs(3)) == 3


def test_fit_advice_keeps_the_effective_batch():
    config = table_config("meta-llama/Llama-3.1-8B")
    cfg = load_config(["train.max_length=4096", "train.gradient_checkpointing=true",
                       "train.per_device_train_batch_size=8", "train.gradient_accumulation_steps=2"])
    rows = largest_micro_batch(config, cfg, 24)
    assert 1 <= rows < 8
    advice = fit_advice(config, cfg, 24)
    accumulation = -(-16 // rows)
    assert advice.startswith(f"train.per_device_train_batch_size={rows} "
                             f"train.gradient_accumulation_steps={accumulation} fits")
    assert f"effective batch {rows * accumulation}, now 16" in advice
    assert fit_advice(config, cfg, 500) is None  # 8 rows fit
    tiny = fit_advice(config, load_config(["train.max_length=4096", "train.gradient_checkpointing=false"]), 8)
    assert tiny.startswith("not even one row of 4096 tokens fits; try train.gradient_checkpointing=true")


def test_preflight_warns_on_a_gpu_too_small_and_stays_quiet_otherwise(monkeypatch, capsys):
    """On CUDA, before weights load; the GPU is simulated here (its size is all preflight reads)."""
    import types

    import torch

    gpu = types.SimpleNamespace(total_memory=0, name="Simulated GPU")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: gpu)
    cfg = load_config([])  # the embedded SmolLM2-135M, 8 rows of the demo's max_length
    need = estimate_memory(table_config("smollm2-135m"), cfg)["total"]
    gpu.total_memory = int((need + CUDA_CONTEXT_GIB - 0.2) * 2**30)
    warning = estimate.preflight(cfg)
    assert warning.startswith(f"estimated peak {need:.1f} GiB per process")
    assert f"at {cfg.train.per_device_train_batch_size} x {cfg.train.max_length} tokens" in warning
    assert "train.per_device_train_batch_size=" in warning
    gpu.total_memory = int((need + CUDA_CONTEXT_GIB + 0.1) * 2**30)
    assert estimate.preflight(cfg) is None
    # The dry run names this GPU beside the common sizes.
    estimate.print_estimate(cfg)
    line = next(s for s in capsys.readouterr().out.splitlines() if "largest micro-batch:" in s)
    assert f"on this GPU (Simulated GPU, {gpu.total_memory / 2**30:.1f} GiB)" in line


LAYER_SHAPE = dict(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=2,
                   vocab_size=1000, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def tiny_llamas(tmp_path_factory):
    """Random Llama checkpoints of 2 and 4 layers: one more pair of layers is what one more pair costs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llamas")
    for layers in (2, 4):
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **LAYER_SHAPE)).save_pretrained(root / str(layers))
    return root


@pytest.mark.parametrize("upcast", [False, True], ids=["bf16-stream", "fp32-upcast"])
@pytest.mark.parametrize("dropout", [0.0, 0.05], ids=["no-dropout", "dropout"])
def test_layer_activation_term_matches_what_autograd_saves(tiny_llamas, upcast, dropout, monkeypatch):
    """The per-layer activation term is counted, not fitted: here against the bytes autograd keeps for two more
    NF4 decoder layers (LoRA on every linear layer, bf16 autocast as in training, weights excluded), with and
    without the fp32 upcast and LoRA dropout. CUDA's dropout keeps a 1-byte mask where the CPU kernel keeps a
    float noise tensor, so dropout runs CUDA's kernel (torch.native_dropout, which the CPU has too)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.config.library_args import quantization_config
    from tuneforge.config.schemas import PeftConfig, QuantConfig
    from tuneforge.models.adapters import add_lora, prepare_base

    monkeypatch.setattr(torch.nn.Dropout, "forward",
                        lambda self, x: torch.native_dropout(x, self.p, self.training)[0] if self.training else x)
    quant = QuantConfig(upcast_non_quantized=upcast)
    tokens = 512

    def saved_bytes(layers: int) -> int:
        model = LlamaForCausalLM.from_pretrained(tiny_llamas / str(layers), dtype=torch.bfloat16,
                                                 quantization_config=quantization_config(quant))
        model = add_lora(prepare_base(model, quant), PeftConfig(r=16, lora_alpha=32, lora_dropout=dropout))
        model.train()
        assert model.get_input_embeddings().weight.dtype == (torch.float32 if upcast else torch.bfloat16)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:  # one entry per distinct view saved
                kept[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
            return t

        ids = torch.randint(0, LAYER_SHAPE["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
            model(input_ids=ids)
        return sum(kept.values())

    measured = saved_bytes(4) - saved_bytes(2)
    cfg = load_config([f"peft.lora_dropout={dropout}", f"quant.upcast_non_quantized={str(upcast).lower()}",
                       "train.gradient_checkpointing=false"])
    estimated = [estimate_memory(LlamaConfig(num_hidden_layers=n, **LAYER_SHAPE), cfg, tokens_per_micro_batch=tokens)
                 for n in (2, 4)]
    predicted = (estimated[1]["activations"] - estimated[0]["activations"]) * 2**30
    assert measured == pytest.approx(predicted, rel=0.06), (measured / tokens / 2, predicted / tokens / 2)
