"""`tuneforge report SWEEP_DIR`: one table of every job of a sweep (its overrides and metrics, best first),
written to the terminal, `report.md` and `report.csv`, and `report.png` comparing the jobs' loss curves and
final metric. Failed or unfinished jobs are listed (last) with their error, so a partial sweep reports too.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from tuneforge.commands.base import Command, argparse_main, parser
from tuneforge.config.errors import ConfigError
from tuneforge.config.tasks import TASKS
from tuneforge.runs import rundir, study
from tuneforge.runs.objective import objective


@dataclass
class Job:
    name: str
    path: Path
    status: str  # ok | failed | pruned (an Optuna pruner stopped it) | incomplete
    overrides: dict[str, str] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    error: str = ""
    eval_metric: Optional[str] = None
    trial: str = ""  # the Optuna trial's state (tuneforge's Optuna sweeper: the job directory is the trial number)


def _job_dirs(sweep_dir: Path) -> list[Path]:
    if not sweep_dir.is_dir():
        raise ConfigError(f"{sweep_dir} is not a directory; pass a multirun directory such as multirun/DATE/TIME.")
    dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()]
    return sorted(dirs, key=lambda p: (0, int(p.name)) if p.name.isdigit() else (1, p.name))


def load_jobs(sweep_dir: Path) -> list[Job]:
    jobs = []
    for d in _job_dirs(sweep_dir):
        overrides = {}
        ov_file = d / ".hydra" / "overrides.yaml"
        if ov_file.is_file():
            for item in OmegaConf.to_container(OmegaConf.load(ov_file)) or []:
                key, _, value = str(item).partition("=")
                overrides[key.lstrip("+~")] = value
        job = Job(d.name, d, "incomplete", overrides)
        if (d / rundir.CONFIG_FILE).is_file():  # what the sweeper optimized: the task's metric, else eval.metric
            saved = OmegaConf.load(d / rundir.CONFIG_FILE)
            spec = TASKS.get(saved.get("task"))
            job.eval_metric = (spec.sweep_metric if spec else "") or saved.get("eval", {}).get("metric")
        if (d / rundir.METRICS_FILE).is_file():
            job.status, job.metrics = "ok", rundir.read_json(d / rundir.METRICS_FILE)
        elif (d / rundir.FAILED_FILE).is_file():
            failed = rundir.read_json(d / rundir.FAILED_FILE)
            job.status, job.error = "failed", failed.get("error", "")
        jobs.append(job)
    trials = study.read_trials(sweep_dir)
    for job in jobs:
        job.trial = trials.get(job.name, {}).get("state", "")
        if job.status == "ok" and job.trial.startswith("PRUNED"):
            job.status = "pruned"  # stopped early: its numbers are not comparable with finished jobs'
    return jobs


def _direction(sweep_dir: Path, metric: str) -> str:
    """The sweeper's direction when it has one (Optuna), else minimize for losses, maximize for scores."""
    path = sweep_dir / "multirun.yaml"
    if path.is_file():
        direction = OmegaConf.to_container(OmegaConf.load(path)).get("hydra", {}).get("sweeper", {}).get("direction")
        if isinstance(direction, list):
            direction = direction[0]
        if isinstance(direction, str) and direction.lower() in ("minimize", "maximize"):
            return direction.lower()
    return "minimize" if "loss" in metric or "perplexity" in metric else "maximize"


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def build_table(jobs: list[Job], metric: Optional[str] = None, direction: Optional[str] = None,
                sweep_dir: Optional[Path] = None) -> tuple[list[str], list[list], str, str]:
    """(header, rows best first, metric, direction). Without a metric: the jobs' eval.metric when the runs
    scored it, else the last logged training loss."""
    if metric is None:
        wanted = next((j.eval_metric for j in jobs if j.eval_metric), None)
        scored = wanted and any(objective(j.metrics, wanted) is not None for j in jobs if j.status == "ok")
        metric = wanted if scored else "last_logged_loss"
    direction = direction or _direction(sweep_dir or Path("."), metric)
    keys = swept_keys(jobs)
    sign = 1 if direction == "minimize" else -1

    def order(job: Job):
        value = objective(job.metrics, metric) if job.status == "ok" else None
        ok = value is not None and not math.isnan(value)
        return (0 if ok else 1, sign * value if ok else 0, job.name)

    extra = [k for k in ("train_loss", "last_logged_loss", "train_steps", "train_runtime_s") if k != metric]
    trial = ["trial"] if any(j.trial for j in jobs) else []
    header = ["rank", "job", "status", *trial, *keys, metric, *extra, "error"]
    rows = []
    for rank, job in enumerate(sorted(jobs, key=order), 1):
        m = job.metrics
        rows.append([rank if job.status == "ok" else "", job.name, job.status, *([job.trial] if trial else []),
                     *[job.overrides.get(k, "") for k in keys],
                     objective(m, metric) if job.status == "ok" else None, *[m.get(k) for k in extra],
                     job.error[:160]])
    return header, rows, metric, direction


def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs (all of them for a one-job sweep)."""
    keys = sorted({k for j in jobs for k in j.overrides if not k.startswith("hydra")})
    varied = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    return varied if len(jobs) > 1 else keys


def common_overrides(jobs: list[Job]) -> list[str]:
    varied = set(swept_keys(jobs))
    return sorted({f"{k}={v}" for j in jobs for k, v in j.overrides.items() if k not in varied and not k.startswith("hydra")})


def to_markdown(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return _fmt(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows([[("" if v is None else v) for v in row] for row in rows])
    return buf.getvalue()


def plot(jobs: list[Job], metric: str, path: Path) -> None:
    """Left: every finished job's training loss per step; right: its final metric (failed jobs marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = swept_keys(jobs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels, values = [], []
    for job in jobs:
        label = f"{job.name}: " + " ".join(f"{k.split('.')[-1]}={job.overrides.get(k)}" for k in keys)
        if job.status == "ok":
            curve = [(h["step"], h["loss"]) for h in job.metrics.get("log_history", []) if "loss" in h]
            if curve:
                left.plot(*zip(*curve), marker=".", label=label)
        value = objective(job.metrics, metric) if job.status == "ok" else None
        labels.append(label if job.status == "ok" else f"{label} ({job.status})")
        values.append(value if value is not None and not math.isnan(value) else 0.0)
    left.set_xlabel("step")
    left.set_ylabel("train loss")
    left.grid(alpha=0.3)
    if left.lines:
        left.legend(fontsize=7)
    bars = right.barh(range(len(values)), values, color=["tab:blue" if j.status == "ok" else "lightgrey" for j in jobs])
    for bar, job in zip(bars, jobs):
        if job.status != "ok":
            right.text(0, bar.get_y() + bar.get_height() / 2, f"  {job.status}", va="center", fontsize=8)
    right.set_yticks(range(len(labels)), labels, fontsize=7)
    right.invert_yaxis()
    right.set_xlabel(metric)
    right.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(sweep_dir: Path, metric: Optional[str] = None, direction: Optional[str] = None) -> dict:
    """Write report.md, report.csv and report.png into the sweep directory; returns what was written."""
    sweep_dir = Path(sweep_dir)
    jobs = load_jobs(sweep_dir)
    if not jobs:
        raise ConfigError(f"{sweep_dir} holds no sweep jobs (directories with .hydra/); pass a multirun "
                                "directory such as multirun/DATE/TIME.")
    header, rows, metric, direction = build_table(jobs, metric, direction, sweep_dir)
    md = (f"# Sweep report: {sweep_dir}\n\n{len(jobs)} jobs: {sum(j.status == 'ok' for j in jobs)} finished, "
          f"{sum(j.status == 'failed' for j in jobs)} failed, {sum(j.status == 'incomplete' for j in jobs)} "
          f"incomplete" + (f", {sum(j.status == 'pruned' for j in jobs)} pruned" if any(j.trial for j in jobs) else "")
          + f". Sorted by {metric} ({direction}), best first.\n\n" + _study_line(sweep_dir)
          + (f"Common to every job: `{' '.join(common_overrides(jobs))}`\n\n" if len(jobs) > 1 else "")
          + to_markdown(header, rows)
          + "\n![loss curves and final metric](report.png)\n")
    rundir.atomic_write_text(sweep_dir / "report.md", md)
    rundir.atomic_write_text(sweep_dir / "report.csv", to_csv(header, rows))
    by_name = {j.name: j for j in jobs}
    plot([by_name[row[1]] for row in rows], metric, sweep_dir / "report.png")  # bars best first, like the table
    return {"header": header, "rows": rows, "metric": metric, "direction": direction, "jobs": jobs}


def _study_line(sweep_dir: Path) -> str:
    """What the sweep's Optuna study holds (trials by state, the best one), when it has one."""
    trials = study.read_trials(sweep_dir)
    if not trials:
        return ""
    states: dict[str, int] = {}
    for t in trials.values():
        states[t["state"].split(" ")[0]] = states.get(t["state"].split(" ")[0], 0) + 1
    where = study.sweep_storage(sweep_dir)
    from tuneforge.runs.redaction import redact_url

    line = (f"Optuna study `{where[1]}` in `{redact_url(where[0])}`: {len(trials)} trials ("
            + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) + ")")
    done = [(n, t) for n, t in trials.items() if t["state"] == "COMPLETE" and t["value"] is not None]
    if done:
        sign = -1 if _direction(sweep_dir, "loss") == "maximize" else 1
        n, best = min(done, key=lambda item: sign * item[1]["value"])
        line += f"; best trial {n}: {best['value']:.6g} with {best['params']}"
    return line + ".\n\n"


def _print(result: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{result['metric']} ({result['direction']}), best first")
        for h in result["header"]:
            table.add_column(h, overflow="fold")
        for row in result["rows"]:
            table.add_row(*[_fmt(v) for v in row])
        Console(width=200).print(table)
    except ImportError:
        print(to_markdown(result["header"], result["rows"]))


def _run(ns, rest: list[str]) -> int:
    result = report(Path(ns.sweep_dir), ns.metric, ns.direction)
    _print(result)
    print(f"Wrote {Path(ns.sweep_dir) / 'report.md'}, report.csv and report.png")
    return 0


PARSER = parser("report", "One table of a sweep's jobs (overrides, metrics, best first; failed jobs too): "
                "terminal, report.md, report.csv, report.png.")
PARSER.add_argument("sweep_dir", help="a multirun directory, e.g. multirun/DATE/TIME")
PARSER.add_argument("--metric", help="the metric to rank by (default: the jobs' eval.metric)")
PARSER.add_argument("--direction", choices=("minimize", "maximize"),
                    help="default: the sweeper's, else minimize for losses and maximize for scores")
main = argparse_main("report", PARSER, _run)
COMMAND = Command("report", "table + plots of a sweep", main,
                  "tuneforge report multirun/DATE/TIME [--metric NAME] [--direction minimize]")
