"""The run lifecycle every task shares: claim the run directory, prepare, train under the guards, save, score,
record. A task supplies only its stages (tasks/stages.Stages, named in config/tasks.py); `job` is what the `train`
command, each sweep job, each launched rank and `tuneforge reproduce` run; `exit_code` is the one mapping from a
failure a user can cause to the documented exit code.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from transformers import set_seed

from tuneforge.config import library_args
from tuneforge.config.compose import to_validated
from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import TuneforgeConfig
from tuneforge.config.tasks import task as task_spec
from tuneforge.config.user_code import load as user_callbacks
from tuneforge.models.estimate import preflight, print_estimate
from tuneforge.runs import console, faults, launch, manifest, model_card, plots, rundir, study
from tuneforge.runs.objective import objective
from tuneforge.runs.redaction import command_line, use_token
from tuneforge.tasks.stages import stages_class

log = logging.getLogger(__name__)

def job(dcfg, run_dir: Path, callbacks: Optional[list] = None) -> tuple[TuneforgeConfig, dict]:
    """One training job from its composed Hydra config: validated on its own values (every multirun job is), the
    libraries' own checks, then run here, or re-run through `accelerate launch` (launcher=ddp|fsdp|deepspeed_*),
    whose main rank writes the metrics read back here. `callbacks`: extra TrainerCallbacks (this process only).
    Returns the validated config and the run's metrics."""
    cfg = to_validated(dcfg)
    library_args.check(cfg)
    if launch.needs_launch(cfg):
        launch.run_from_hydra(cfg, run_dir)
        if not cfg.dry_run:
            return cfg, read_metrics(run_dir)
    # In a tuneforge Optuna sweep with a pruner: the logged losses go to this job's trial (runs/study.py).
    return cfg, run(cfg, run_dir, dcfg, [*(callbacks or []), *study.trial_callbacks(sweep_metric(cfg))])


def run(cfg: TuneforgeConfig, run_dir: Path, resolved_config: Any, callbacks: Optional[list] = None) -> dict:
    """Train, save and score one run of `cfg.task`; returns the metrics written to metrics.json ({} on the other
    ranks of a multi-process run, and for `dry_run=true`, which prints the plan and loads nothing)."""
    if cfg.dry_run:
        print_dry_run(cfg)
        return {}
    state = launch.process_state()  # several processes: one run directory, written by the main process only
    main = state.is_main_process
    if main:
        rundir.claim_run_dir(run_dir, cfg.train.resume_from_checkpoint)
        rundir.check_resume_matches(run_dir, cfg)  # before the run's config is rewritten
        rundir.write_config(run_dir, resolved_config)
    # SIGTERM / Ctrl-C outside trainer.train() (preparing, converting, scoring, saving) end the run the same way
    # as during it: exit 128 + signal, the manifest's status, the resume hint, half-written files removed.
    with faults.signals_end_the_run(run_dir, main) as phase:
        return _run(cfg, run_dir, state, main, phase, callbacks)


def _run(cfg: TuneforgeConfig, run_dir: Path, state, main: bool, phase, callbacks) -> dict:
    use_token(cfg.model)
    task = stages_class(cfg.task)(cfg, run_dir, main)
    phase.name = "preparing the tokenizer, the model and the data"
    with state.main_process_first():  # the model conversion and the data cache are built once
        identity = task.prepare()
    # On every rank after the barrier: a check that fails on the main rank alone inside it would hang the others.
    phase.name = "checking the data"
    task.check()
    if main:
        manifest.write(run_dir, seed=cfg.train.seed, **identity)
        if warning := preflight(cfg):
            log.warning("GPU memory: %s", warning)

    # LoRA's A matrices and a new head are drawn while the model is built, before the Trainer seeds: seed now,
    # or no two runs start alike.
    set_seed(cfg.train.seed)
    phase.name = "loading the model"
    model = task.build_model()
    phase.name = "scoring the base model"
    baseline = task.baseline(model)
    args = library_args.trainer_arguments(cfg, run_dir)
    trainer = task.build_trainer(model, args, [*user_callbacks(cfg.callbacks), *(callbacks or [])])
    if main:
        rundir.check_free_space(run_dir, rundir.estimate_for(model, cfg.train))
    console.attach(trainer)
    # TRL writes its generic model card at every checkpoint; the run's own card is written once it has scores.
    trainer.create_model_card = lambda *args, **kwargs: None
    phase.name = "training"
    result = faults.train_guarded(trainer, cfg.train, run_dir, args.bf16)
    phase.name = "saving the adapter"
    saved = rundir.save_adapter(trainer, task.tokenizer, run_dir, task.initial_adapter)  # every rank calls it
    phase.name = "scoring the trained model"
    evaluation = task.evaluate(model, trainer)
    if not saved:
        return {}

    phase.name = "writing the metrics"
    metrics = task.metrics(result, trainer, baseline, evaluation) | {"world_size": trainer.args.world_size}
    rundir.write_json(run_dir / rundir.METRICS_FILE, metrics)
    task.report(baseline, evaluation, metrics)
    plots.plot_losses(trainer.state.log_history, run_dir / "loss.png")
    model_card.write(cfg, metrics, manifest.read(run_dir).get("command", command_line()), run_dir,
                     getattr(task, "resized_vocab", None))
    manifest.write(run_dir, status="finished", finished_at=manifest.now())
    log.info("Run saved in %s", run_dir)
    return metrics


def sweep_metric(cfg: TuneforgeConfig) -> str:
    return task_spec(cfg.task).sweep_metric or cfg.eval.metric


def sweep_value(cfg: TuneforgeConfig, metrics: dict) -> Optional[float]:
    """What a sweeper optimizes for this job: the task's metric (config/tasks.py; `eval.metric` by default) in its
    metrics."""
    metric = sweep_metric(cfg)
    value = objective(metrics, metric)
    if value is None and metrics:
        log.warning("%s is not among this run's metrics (held-out scores need eval.before_after=true; or use "
                    "eval.metric=last_logged_loss, train_loss, eval_loss): a sweeper gets None.", metric)
    return value


def read_metrics(run_dir: Path) -> dict:
    """metrics.json of a finished run ({} when it wrote none)."""
    path = Path(run_dir) / rundir.METRICS_FILE
    return rundir.read_json(path) if path.is_file() else {}


def exit_code(exc: BaseException) -> Optional[int]:
    """The documented exit code of a failure a user can cause, after one log line saying what to do (and its
    traceback when asked for: `--debug` / HYDRA_FULL_ERROR=1); None for anything else (a bug: its traceback is
    the report). 2: a config or input error (bad key, value, data, model, template or run directory); a
    stopped run (SIGTERM/Ctrl-C with a checkpoint saved, or a diverged loss): its own code (faults.py)."""
    trace = exc if os.environ.get("HYDRA_FULL_ERROR") == "1" else None
    if isinstance(exc, ConfigError):
        log.error("config error: %s", exc, exc_info=trace)
        return 2
    if isinstance(exc, faults.RunStopped):  # the message says what next (resume, or what to change)
        log.error("%s", exc, exc_info=trace)
        return exc.exit_code
    return None


def plan(cfg: TuneforgeConfig) -> dict:
    """What a run would do, computed without loading any weights (`dry_run=true`)."""
    t = cfg.train
    world = cfg.launcher.num_processes if cfg.launcher.name != "local" else int(os.environ.get("WORLD_SIZE", "1"))
    return {
        "task": cfg.task,
        "model": cfg.model.name_or_path,
        "quantization": (f"4-bit {cfg.quant.bnb_4bit_quant_type}" if cfg.quant.load_in_4bit else
                         "8-bit" if cfg.quant.load_in_8bit else cfg.model.dtype),
        "adapter": f"LoRA r={cfg.peft.r} alpha={cfg.peft.lora_alpha} on {cfg.peft.target_modules}"
        if cfg.peft.method == "lora" else "none (full fine-tune)",
        "data": cfg.data.path,
        "format": cfg.format.strategy,
        "collator": cfg.collator.name,
        "packing": cfg.packing.mode,
        "max_length": t.max_length,
        "launcher": f"{cfg.launcher.name} ({world} process{'es' if world > 1 else ''})",
        "effective_batch_size": t.per_device_train_batch_size * t.gradient_accumulation_steps * world,
        "max_steps": t.max_steps if t.max_steps > 0 else f"{t.num_train_epochs} epoch(s)",
        "learning_rate": t.learning_rate,
    }


def print_dry_run(cfg: TuneforgeConfig) -> None:
    """The plan, then the GPU memory estimate (tuneforge/estimate.py)."""
    for key, value in plan(cfg).items():
        print(f"{key:>22}: {value}")
    print_estimate(cfg)
