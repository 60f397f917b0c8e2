"""`tuneforge merge`: fold a LoRA adapter into full-precision weights and save a standalone model.

Never merge into 4-bit weights (the rounding would silently change the model). `base=dequantized`
(default) de-quantizes the NF4 weights the adapter was trained against and merges into those, which
reproduces the trained model; `base=original` merges into the original full-precision weights, as is
common practice, and reports how far that drifts from what was trained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from tuneforge.commands.base import as_object, hydra_command, output_path
from tuneforge.config.errors import ConfigError
from tuneforge.runs import rundir

log = logging.getLogger(__name__)


@dataclass
class MergeConfig:
    # dequantized: merge into the de-quantized NF4 weights the adapter was trained on (faithful) |
    # original: merge into the original full-precision weights (common practice; drift is measured).
    base: str = "dequantized"
    check_prompts: int = 4
    check_max_new_tokens: int = 24


@dataclass
class MergeCommandConfig:
    """The `merge` command's config (conf/merge.yaml)."""

    run_dir: str = MISSING
    out: Optional[str] = None
    merge: MergeConfig = field(default_factory=MergeConfig)


# Fixed prompts for the equivalence check (a few generic ones plus the run's own held-out prompts).
CHECK_PROMPTS = ["What is the capital of France?", "Write this date as YYYY-MM-DD: 4 July 1976",
                 "List three colours.", "Summarise: the cat sat on the mat."]


def run(cfg: MergeCommandConfig) -> dict:
    # Imported when the command runs: `tuneforge --help` reads every command module, and must not load torch.
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.commands.eval import refuse_non_generating
    from tuneforge.eval.compare import compare_models
    from tuneforge.models.merging import merged_model
    from tuneforge.models.trained import load_trained

    if cfg.merge.base not in ("dequantized", "original"):
        raise ConfigError(f"merge.base={cfg.merge.base!r}: use dequantized (default) or original.")
    run_dir = Path(cfg.run_dir)
    refuse_non_generating(cfg.run_dir, "merge")
    out = output_path("out", cfg.out) if cfg.out else run_dir / f"merged-{cfg.merge.base}"
    rundir.refuse_non_empty(out, "choose another out=DIR")  # before minutes of loading, and again when renaming
    reference, tokenizer, _ = load_trained(run_dir)  # adapter on its training base (4-bit as trained)
    merged = merged_model(run_dir, cfg.merge.base, tokenizer)
    # Written beside `out` and renamed once checked: a failure leaves no half-written model under its name.
    with rundir.atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

        # Verify what was written: reload from disk and compare with the adapter on its training base.
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, use_safetensors=True)
        prompts = CHECK_PROMPTS[: cfg.merge.check_prompts]
        report = {"out": str(out), "base": cfg.merge.base,
                  **compare_models(reference, reloaded, tokenizer, prompts, cfg.merge.check_max_new_tokens)}
        rundir.write_json(tmp / "merge_check.json", report)
    verdict = "identical" if report["identical_generations"] == len(prompts) else "DIFFERENT"
    print(f"Merged ({cfg.merge.base} base) into {out}\n"
          f"Check vs adapter on its training base, {len(prompts)} prompts: greedy generations {verdict} "
          f"({report['identical_generations']}/{len(prompts)}), max |Δlogit| {report['max_abs_logit_diff']:.4g}, "
          f"argmax disagreement {report['argmax_disagreement']:.1%}")
    return report


def app(dcfg) -> None:
    run(as_object(dcfg))


COMMAND = hydra_command(
    "merge", "fold the adapter into full-precision weights",
    "tuneforge merge run_dir=PATH [out=DIR] [merge.base=original]", config_name="merge", schema=MergeCommandConfig,
    app=app)
