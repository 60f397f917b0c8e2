"""`tuneforge merge`: fold a LoRA adapter into full-precision weights and save a standalone model.

Never merge into 4-bit weights (the rounding would silently change the model). `base=dequantized`
(default) de-quantizes the NF4 weights the adapter was trained against and merges into those, which
reproduces the trained model; `base=original` merges into the original full-precision weights, as is
common practice, and reports how far that drifts from what was trained.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from tuneforge import runs
from tuneforge.config import ConfigError, MergeCommandConfig, ModelConfig, QuantConfig
from tuneforge.inference import GenerationSettings, eval_mode, generate, left_pad, prompt_ids
from tuneforge.models.adapters import load_adapter
from tuneforge.models.loading import fit_embeddings, load_model, resolve_path
from tuneforge.models.trained import load_trained

log = logging.getLogger(__name__)

# Fixed prompts for the equivalence check (a few generic ones plus the run's own held-out prompts).
CHECK_PROMPTS = ["What is the capital of France?", "Write this date as YYYY-MM-DD: 4 July 1976",
                 "List three colours.", "Summarise: the cat sat on the mat."]


def _merged_base(run_dir: Path, base: str, tokenizer):
    cfg_model, cfg_quant = _run_model_cfg(run_dir)
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
    merged = load_adapter(_merged_base(run_dir, base, tokenizer), str(run_dir / runs.ADAPTER_DIR))
    return merged.merge_and_unload()


def _run_model_cfg(run_dir: Path) -> tuple[ModelConfig, QuantConfig]:
    from tuneforge.models.trained import run_config

    cfg = run_config(run_dir)
    if cfg.peft.method == "none":
        raise ConfigError(f"{run_dir} was a full fine-tune (peft=none): its weights are already standalone.")
    return cfg.model, cfg.quant


@torch.inference_mode()
def _logits(model, tokenizer, prompts) -> torch.Tensor:
    ids, mask = left_pad([prompt_ids(tokenizer, p, 512) for p in prompts], tokenizer.pad_token_id)
    device = next(p.device for p in model.parameters())
    with eval_mode(model):
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return out.logits.float().cpu()[mask.bool()]


def run(cfg: MergeCommandConfig) -> dict:
    if cfg.merge.base not in ("dequantized", "original"):
        raise ConfigError(f"merge.base={cfg.merge.base!r}: use dequantized (default) or original.")
    run_dir = Path(cfg.run_dir)
    out = Path(cfg.out) if cfg.out else run_dir / f"merged-{cfg.merge.base}"
    runs.refuse_non_empty(out, "choose another out=DIR")  # before minutes of loading, and again when renaming
    reference, tokenizer, _ = load_trained(run_dir)  # adapter on its training base (4-bit as trained)
    merged = merged_model(run_dir, cfg.merge.base, tokenizer)
    # Written beside `out` and renamed once checked: a failure leaves no half-written model under its name.
    with runs.atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

        # Verify what was written: reload from disk and compare with the adapter on its training base.
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, use_safetensors=True)
        prompts = CHECK_PROMPTS[: cfg.merge.check_prompts]
        settings = GenerationSettings(max_new_tokens=cfg.merge.check_max_new_tokens, batch_size=len(prompts))
        ref_gen = generate(reference, tokenizer, prompts, settings)
        new_gen = generate(reloaded, tokenizer, prompts, settings)
        ref_logits, new_logits = _logits(reference, tokenizer, prompts), _logits(reloaded, tokenizer, prompts)
        report = {
            "out": str(out),
            "base": cfg.merge.base,
            "prompts": len(prompts),
            "identical_generations": sum(a == b for a, b in zip(ref_gen, new_gen)),
            "max_abs_logit_diff": float((ref_logits - new_logits).abs().max()),
            "argmax_disagreement": float((ref_logits.argmax(-1) != new_logits.argmax(-1)).float().mean()),
        }
        runs.write_json(tmp / "merge_check.json", report)
    verdict = "identical" if report["identical_generations"] == len(prompts) else "DIFFERENT"
    print(f"Merged ({cfg.merge.base} base) into {out}\n"
          f"Check vs adapter on its training base, {len(prompts)} prompts: greedy generations {verdict} "
          f"({report['identical_generations']}/{len(prompts)}), max |Δlogit| {report['max_abs_logit_diff']:.4g}, "
          f"argmax disagreement {report['argmax_disagreement']:.1%}")
    return report
