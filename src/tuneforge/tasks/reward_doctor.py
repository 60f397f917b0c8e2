"""The reward doctor (task=grpo|rloo, DESIGN rule 12): before training, sample train.num_generations completions for
doctor.reward_prompts training prompts from the starting policy, with training's sampling settings, and score them
with the run's rewards. Per reward: mean / std / min / max; the share of prompt groups whose total rewards are all
equal (no learning signal: their advantages are all 0); completion lengths and the share cut at
train.max_completion_length. Every group alike refuses the run (exit 2, with what to change); more than
doctor.max_no_signal of them warns. Part of `tuneforge doctor` and of the start of `train`.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

from rich.console import Console
from rich.table import Table

from tuneforge.config.errors import ConfigError
from tuneforge.eval.inference import GenerationSettings, Rendered, generate_completions
from tuneforge.eval.rewards import Reward, score, weighted_total
from tuneforge.tasks.doctor import ERROR, OK, WARNING, Check

log = logging.getLogger(__name__)

ADVICE = ("a shaped reward (partial credit for being close), an SFT start (model.adapter=SFT_RUN), more generations "
          "(train.num_generations) or a higher train.temperature")


@dataclass
class RewardDoctorReport:
    prompts: int
    generations: int
    # {reward name (and "total"): {mean, std, min, max}} over every scored completion (None values left out).
    rewards: dict[str, dict[str, float]]
    # Share of prompt groups whose total rewards are all equal.
    no_signal_fraction: float
    lengths: dict[str, float]  # completion tokens: mean, min, median, max
    clipped_fraction: float  # completions cut at max_completion_length (no end-of-turn)
    examples: list[dict[str, Any]]

    def as_dict(self) -> dict:
        return asdict(self)


def _stats(values: Sequence[Optional[float]]) -> dict[str, float]:
    kept = [v for v in values if v is not None]
    if not kept:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    return {"mean": statistics.fmean(kept), "std": statistics.pstdev(kept), "min": min(kept), "max": max(kept)}


def _alike(values: Sequence[float]) -> bool:
    """TRL's test for a group without signal: the standard deviation of its rewards is ~0 (torch.isclose)."""
    return len(values) < 2 or math.isclose(statistics.pstdev(values), 0.0, abs_tol=1e-8)


def examine(model, tokenizer, rows: list[dict], rewards: Sequence[Reward], args, max_prompt_tokens: int,
            batch_size: int, prompt_column: str = "prompt") -> RewardDoctorReport:
    """Sample and score `rows` (prompt rows of the data stage) with the model as it is now; `args`: the trainer's
    config (GRPOConfig/RLOOConfig, the library defaults filled in), whose sampling settings training uses."""
    g = args.num_generations
    settings = GenerationSettings(max_new_tokens=args.max_completion_length, max_input_tokens=max_prompt_tokens,
                                  batch_size=batch_size, do_sample=True, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    prompts = [row[prompt_column] for row in rows for _ in range(g)]
    expanded = [{k: v for k, v in row.items() if k != prompt_column} for row in rows for _ in range(g)]
    done = generate_completions(model, tokenizer, [Rendered(p) for p in prompts], settings)
    texts = [c.text for c in done]
    values = score(rewards, prompts, texts, expanded, [c.ids for c in done])
    total = weighted_total(rewards, values)
    groups = [total[i:i + g] for i in range(0, len(total), g)]
    lengths = [len(c.ids) for c in done]
    stats = {name: _stats(v) for name, v in values.items()}
    if len(rewards) > 1:
        stats["total"] = _stats(total)
    return RewardDoctorReport(
        prompts=len(rows), generations=g, rewards=stats,
        no_signal_fraction=sum(_alike(grp) for grp in groups) / max(len(groups), 1),
        lengths={"mean": statistics.fmean(lengths), "min": min(lengths), "median": statistics.median(lengths),
                 "max": max(lengths)} if lengths else {},
        clipped_fraction=sum(not c.stopped for c in done) / max(len(done), 1),
        examples=[{"prompt": prompts[i], "completion": texts[i], **{n: values[n][i] for n in values}}
                  for i in range(0, len(texts), g)][:3],
    )


def checks(report: RewardDoctorReport, max_no_signal: float, max_completion_length: int) -> list[Check]:
    """The doctor's verdicts on a report: signal (error when none), and completions cut at the length limit."""
    frac = report.no_signal_fraction
    groups = f"{frac:.0%} of {report.prompts} prompt groups ({report.generations} completions each) scored alike"
    status = ERROR if frac >= 1.0 else WARNING if frac > max_no_signal else OK
    action = (f"{groups}: nothing to learn from; try {ADVICE}" if status == ERROR else
              f"{groups} (above doctor.max_no_signal={max_no_signal:g}): most steps will teach little; consider "
              f"{ADVICE}" if status == WARNING else groups)
    out = [Check("reward signal", status, "a group whose completions all score the same has zero advantage: it "
                 "teaches nothing", action)]
    clipped = report.clipped_fraction
    # With the overlong reward in the list, long completions already score less: training learns to end them.
    penalized = clipped > 0.5 and "overlong" in report.rewards
    out.append(Check("completions cut", WARNING if clipped > 0.5 and not penalized else OK, "a completion cut at "
                     "train.max_completion_length never shows the model an ending to reward",
                     f"{clipped:.0%} cut at {max_completion_length} tokens" +
                     ("; the overlong reward penalizes them" if penalized else
                      "; raise train.max_completion_length or reward brevity (rewards: overlong)" if clipped > 0.5
                      else "")))
    return out


def print_report(report: RewardDoctorReport, console: Console | None = None) -> None:
    table = Table(title=f"reward doctor: {report.prompts} prompts x {report.generations} completions from the "
                        "starting policy")
    for column in ("reward", "mean", "std", "min", "max"):
        table.add_column(column, justify="right" if column != "reward" else "left")
    for name, st in report.rewards.items():
        table.add_row(name, *(f"{st[k]:.3f}" for k in ("mean", "std", "min", "max")))
    console = console or Console()
    console.print(table)
    lengths = report.lengths
    console.print(f"no-signal groups: {report.no_signal_fraction:.0%}; completion tokens mean {lengths.get('mean', 0):.1f} "
                  f"(min {lengths.get('min', 0)}, median {lengths.get('median', 0)}, max {lengths.get('max', 0)}); "
                  f"cut at the limit: {report.clipped_fraction:.0%}")


def before_training(model, tokenizer, rows: list[dict], rewards: Sequence[Reward], cfg, args) -> RewardDoctorReport:
    """The reward doctor at the start of `train`: printed, refused when no group has a signal, warned above the
    threshold."""
    report = examine(model, tokenizer, rows, rewards, args, cfg.train.max_length, cfg.eval.batch_size)
    print_report(report)
    verdicts = checks(report, cfg.doctor.max_no_signal, args.max_completion_length)
    for c in verdicts:
        if c.status == ERROR:
            raise ConfigError(f"the reward doctor: {c.action}. (doctor.reward_prompts=0 skips this check.)")
        if c.status == WARNING:
            log.warning("reward doctor: %s: %s", c.name, c.action)
    return report
