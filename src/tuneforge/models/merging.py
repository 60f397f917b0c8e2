"""Folding a run's LoRA adapter into full-precision weights, in memory (`tuneforge merge` saves and checks the
result; an export starts from it).

Never merge into 4-bit weights (the rounding would silently change the model). `base=dequantized` de-quantizes
the NF4 weights the adapter was trained against and merges into those, which reproduces the trained model;
`base=original` merges into the original full-precision weights, as is common practice.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import ModelConfig, QuantConfig
from tuneforge.models.adapters import load_adapter
from tuneforge.models.loading import fit_embeddings, load_model, resolve_path
from tuneforge.runs import rundir
from tuneforge.runs.rundir import run_config


def merge_base(run_dir: Path, base: str, tokenizer):
    cfg_model, cfg_quant = run_model_config(run_dir)
    path = resolve_path(cfg_model)
    if base == "dequantized" and cfg_quant.load_in_8bit:
        raise ConfigError("merge.base=dequantized: an 8-bit base has no exact de-quantization in transformers; use "
                          "merge.base=original.")
    if base == "dequantized" and cfg_quant.load_in_4bit:
        # transformers' own de-quantization: every Linear4bit becomes an nn.Linear with the NF4 values.
        model = load_model(path, cfg_model, cfg_quant).dequantize(dtype=torch.float32)
    else:
        model = load_model(path, replace(cfg_model, dtype="float32"), QuantConfig(load_in_4bit=False))
    fit_embeddings(model, tokenizer)
    return model


def merged_model(run_dir: Path, base: str, tokenizer):
    """The run's adapter folded into a full-precision base (`dequantized` or `original`), in memory."""
    merged = load_adapter(merge_base(run_dir, base, tokenizer), str(run_dir / rundir.ADAPTER_DIR))
    return merged.merge_and_unload()


def run_model_config(run_dir: Path) -> tuple[ModelConfig, QuantConfig]:
    cfg = run_config(run_dir)
    if cfg.peft.method == "none":
        raise ConfigError(f"{run_dir} was a full fine-tune (peft=none): its weights are already standalone.")
    return cfg.model, cfg.quant
