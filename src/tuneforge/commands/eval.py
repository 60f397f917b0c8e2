"""`tuneforge eval run_dir=RUN`: eval loss, perplexity and generation metrics of a trained run on its held-out split
(`eval.compare_base=true`: the base too); writes RUN/eval/eval.json and predictions.jsonl."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from tuneforge.commands.base import as_object, hydra_command
from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import EvalConfig
from tuneforge.runs import rundir

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    """The `eval` command's config (conf/evaluate.yaml): a run directory and the `eval.*` settings."""

    run_dir: str = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)


def refuse_non_generating(run_dir: str, command: str) -> None:
    """`eval` and `merge` check generations: a run whose model scores instead (a reward model) is refused in one line,
    before anything loads."""
    from tuneforge.config.tasks import task

    name = rundir.read_config(Path(run_dir)).task
    if task(name).scores:
        raise ConfigError(f"{run_dir} is a task={name} run: a reward model scores answers, it does not generate, so "
                          f"`tuneforge {command}` (which checks generations) does not apply. Its held-out pairwise "
                          "accuracy before -> after is in its metrics.json (reward_after); `tuneforge infer "
                          f"run_dir={run_dir} prompt=... answer=...` scores an answer.")


def run(cfg) -> dict:
    """`tuneforge eval run_dir=PATH`: writes eval.json + predictions.jsonl under RUN_DIR/eval/."""
    # Imported when the command runs: `tuneforge --help` reads every command module, and must not load torch.
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tuneforge.data.pipeline import prepare
    from tuneforge.eval.inference import GenerationSettings
    from tuneforge.eval.metrics import adapter_off, eval_loss, evaluate_generations, generation_pairs, print_comparison
    from tuneforge.models.trained import load_trained

    refuse_non_generating(cfg.run_dir, "eval")
    model, tokenizer, run_cfg = load_trained(cfg.run_dir)
    ev = cfg.eval
    data = prepare(run_cfg.data, run_cfg.format, run_cfg.train, tokenizer, run_cfg.collator)
    if len(data.eval) == 0:
        raise ConfigError(f"{cfg.run_dir}: the run's data has no held-out split (data.eval_fraction=0 and no "
                          "data.eval_split), so there is nothing to score.")
    settings = GenerationSettings(max_new_tokens=ev.max_new_tokens, max_input_tokens=ev.max_input_tokens,
                                  batch_size=ev.batch_size)
    pairs = generation_pairs(data.eval, ev.num_samples)
    # Held-out rows are never packed: plain padding is the faithful batch for the loss.
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    result: dict[str, Any] = {"run_dir": str(cfg.run_dir), "samples": len(pairs), "eval_rows": len(data.eval)}
    tuned = evaluate_generations(model, tokenizer, pairs, settings)
    result["fine_tuned"] = {**tuned.scores, **eval_loss(model, data.eval, collate, ev.batch_size)}
    table = {"fine-tuned": result["fine_tuned"]}
    if ev.compare_base and hasattr(model, "disable_adapter"):
        with adapter_off(model):
            base = evaluate_generations(model, tokenizer, pairs, settings)
            result["base"] = {**base.scores, **eval_loss(model, data.eval, collate, ev.batch_size)}
        table = {"base": result["base"], "fine-tuned": result["fine_tuned"]}
        for row, b in zip(tuned.predictions, base.predictions):
            row["base_prediction"] = b["prediction"]
    out_dir = Path(cfg.run_dir) / "eval"
    out_dir.mkdir(exist_ok=True)
    rundir.write_json(out_dir / "eval.json", result)
    rundir.write_predictions(out_dir / "predictions.jsonl", tuned.predictions)
    print_comparison(table, f"tuneforge eval: {len(pairs)} held-out prompts, {result['fine_tuned']['eval_tokens']} "
                            "eval-loss tokens")
    log.info("Wrote %s and %s", out_dir / "eval.json", out_dir / "predictions.jsonl")
    return result


def app(dcfg) -> None:
    run(as_object(dcfg))


COMMAND = hydra_command(
    "eval", "score a trained run on its held-out split",
    "tuneforge eval run_dir=PATH [eval.compare_base=true]", config_name="evaluate", schema=EvaluateConfig, app=app)
