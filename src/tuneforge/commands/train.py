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
    if multirun:
        check_slurm(cfg, overrides)
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


def check_slurm(cfg: TuneforgeConfig, overrides: list[str]) -> None:
    """`-m hydra/launcher=slurm`: one Slurm task per node (it starts the node's processes itself) and as many nodes
    as launcher.num_machines; with dry_run=true, print the sbatch script each job would be submitted with and stop
    (no Slurm needed, and no jobs submitted that would only print their plans)."""
    import shlex

    from omegaconf import OmegaConf

    from tuneforge.config.compose import compose_config, first_job_overrides
    from tuneforge.config.errors import ConfigError

    first = first_job_overrides(overrides)
    hydra_launcher = compose_config(first, return_hydra=True).hydra.launcher
    if not str(hydra_launcher.get("_target_", "")).endswith(".SlurmLauncher"):
        return
    if hydra_launcher.tasks_per_node != 1:
        raise ConfigError(f"hydra.launcher.tasks_per_node={hydra_launcher.tasks_per_node}: tuneforge runs one Slurm "
                          "task per node, which starts launcher.num_processes / launcher.num_machines processes itself.")
    if hydra_launcher.nodes != cfg.launcher.num_machines:
        raise ConfigError(f"hydra.launcher.nodes={hydra_launcher.nodes} but launcher.num_machines="
                          f"{cfg.launcher.num_machines}: set both to the number of nodes of each job.")
    if not cfg.dry_run:
        return
    print("sbatch script of each job (Hydra submits a multirun as one job array; nothing submitted: dry_run=true):\n")
    print(launch.slurm_script(OmegaConf.to_container(hydra_launcher, resolve=True)))
    print(f"On each node the first job runs: tuneforge train {shlex.join(o for o in first if not o.startswith('hydra'))}"
          + ("\nwith launcher.machine_rank = $SLURM_NODEID and launcher.main_process_ip = the job's first node."
             if cfg.launcher.num_machines > 1 else ""))
    raise SystemExit(0)


def cleanup() -> None:
    """The command is over: its run directory claims end (in-process callers, e.g. tests, run several)."""
    rundir.release_run_dir()


COMMAND = hydra_command(
    "train", "fine-tune (default recipe: demo)",
    "tuneforge train recipe=demo train.max_steps=50   (-m: a sweep; dry_run=true: the plan, nothing loaded)",
    config_name="config", schema=TuneforgeConfig, app=app, rewrite_args=launch.rank_args, precheck=precheck,
    cleanup=cleanup)
