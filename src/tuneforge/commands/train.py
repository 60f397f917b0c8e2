"""`tuneforge train [overrides]`: fine-tune (default recipe: demo), one run or a sweep (`-m`): each job runs the
run lifecycle (tasks/lifecycle.job)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from tuneforge.commands.base import hydra_command
from tuneforge.config.schemas import TuneforgeConfig
from tuneforge.runs import launch, rundir

log = logging.getLogger("tuneforge")


def app(dcfg) -> Optional[float]:
    """One job: the run's value for a sweeper. In a sweep a failed job is recorded and the sweep goes on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from tuneforge.runs import manifest
    from tuneforge.runs.faults import Diverged, Interrupted
    from tuneforge.runs.redaction import redact
    from tuneforge.tasks import lifecycle

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    rundir.redact_hydra_files(run_dir, Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else run_dir)
    if hc.mode != RunMode.MULTIRUN:
        try:
            return lifecycle.sweep_value(*lifecycle.job(dcfg, run_dir))
        except Diverged as exc:
            manifest.write_failure(run_dir, exc)
            raise
    try:  # one failed job must not stop the sweep (Hydra's basic launcher stops at the first exception)
        return lifecycle.sweep_value(*lifecycle.job(dcfg, run_dir))
    except Interrupted:
        raise  # a person asked the whole sweep to stop
    except Exception as exc:
        log.error("job %s failed: %s", hc.job.num, exc)
        run_dir.mkdir(parents=True, exist_ok=True)
        manifest.write_failure(run_dir, exc, job=hc.job.num, overrides=redact(list(hc.overrides.task)))
        return None  # the Optuna sweeper records the trial as failed (NaN would crash its bookkeeping)
    finally:  # a long sweep in one process would otherwise hold one open lock file per finished job
        rundir.release_run_dir(run_dir)


def precheck(cfg: TuneforgeConfig, overrides: list[str], multirun: bool) -> None:
    """The libraries' own checks of the trainer, LoRA and bitsandbytes configs; an explicit run directory is
    claimed (locked) before Hydra writes .hydra/ into it, so of two commands started at once into one run
    directory, the second is refused before it writes anything (the job claims it again)."""
    from tuneforge.config import library_args

    library_args.check(cfg)
    explicit = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")]
    # A launched rank shares the run directory its launching job resolved (and rank 0 may claim it first).
    if not explicit or multirun or launch.in_launched_process():
        return
    if cfg.launcher.machine_rank != 0:  # another machine of a multi-node run: the run directory is machine 0's
        return
    if not launch.needs_launch(cfg):
        rundir.claim_run_dir(Path(explicit[-1]), cfg.train.resume_from_checkpoint)
    else:  # the launched main rank claims it, in its own process
        rundir.check_run_dir_free(Path(explicit[-1]), cfg.train.resume_from_checkpoint)
    # Before Hydra rewrites RUN/.hydra/ with this command's overrides.
    rundir.check_resume_matches(Path(explicit[-1]), cfg)


def cleanup() -> None:
    """The command is over: its run directory claims end (in-process callers, e.g. tests, run several)."""
    rundir.release_run_dir()


COMMAND = hydra_command(
    "train", "fine-tune (default recipe: demo)",
    "tuneforge train recipe=demo train.max_steps=50   (-m: a sweep; dry_run=true: the plan, nothing loaded)",
    config_name="config", schema=TuneforgeConfig, app=app, rewrite_args=launch.rank_args, precheck=precheck,
    cleanup=cleanup)
