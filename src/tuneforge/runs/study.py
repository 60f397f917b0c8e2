"""The Optuna study of a sweep (`hydra/sweeper=optuna`, src/hydra_plugins/tuneforge_optuna_sweeper): where it is
stored, how a job finds its own trial (to report intermediate losses for pruning), and what `tuneforge report`
reads from it.

Storage: by default `sqlite:///SWEEP_DIR/study.db`, so a sweep outlives its process and a crashed sweep resumes;
any SQLAlchemy URL (`postgresql://...`, `mysql+pymysql://...`) or `journal:PATH` (Optuna's journal file, for
several machines on a shared file system without a database server) instead. Optuna is imported on first use:
Hydra imports every sweeper plugin on every command start.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

STUDY_DB = "study.db"
DEFAULT_STUDY_NAME = "tuneforge"
JOURNAL_PREFIX = "journal:"
# Set by the sweeper for each job (through hydra.job.env_set), read by the job to report to its own trial.
ENV_STORAGE, ENV_STUDY, ENV_TRIAL_ID = "TUNEFORGE_OPTUNA_STORAGE", "TUNEFORGE_OPTUNA_STUDY", "TUNEFORGE_OPTUNA_TRIAL_ID"
# Trial user attributes written by tuneforge.
PRUNED_AT = "tuneforge_pruned_at_step"  # the job stopped training early on the pruner's word
CRASHED = "tuneforge_crashed"           # its worker died while it ran: not counted, its parameters run again
SURPLUS = "tuneforge_surplus"           # asked after another worker had already filled n_trials: never ran
WORKER = "tuneforge_worker"             # host:pid of the sweeper process that runs it
HEARTBEAT = "tuneforge_heartbeat"       # unix time, renewed by that process while the trial runs


def storage_url(storage: Optional[str], sweep_dir: Path) -> str:
    """The storage a sweep uses: the configured one, else a SQLite file in the sweep directory."""
    if storage:
        return storage
    return f"sqlite:///{(Path(sweep_dir).resolve() / STUDY_DB)}"


def open_storage(url: str):
    """Optuna storage for a URL: `journal:PATH` -> a journal file; an RDB URL -> RDBStorage (SQLite waits up to a
    minute for a lock held by another worker instead of failing at once)."""
    import optuna

    if url.startswith(JOURNAL_PREFIX):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len(JOURNAL_PREFIX):]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        db = Path(url[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        # Two workers started at once on a new file would both create its tables (the second fails).
        with _locked(db.with_name(db.name + ".lock")):
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    return optuna.storages.RDBStorage(url)


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def counted(trial) -> bool:
    """Whether a trial counts towards n_trials: it ran, runs or failed on its own (not a crashed worker's trial,
    whose parameters are queued again, nor a surplus one)."""
    from optuna.trial import TrialState

    return trial.state != TrialState.WAITING and not trial.user_attrs.get(CRASHED) and not trial.user_attrs.get(SURPLUS)


# ------------------------------------------------------------------------------------------- inside a job

def trial_callbacks(metric: str) -> list:
    """The pruning callback for this job when a tuneforge Optuna sweep started it (none otherwise)."""
    if ENV_TRIAL_ID not in os.environ:
        return []
    from hydra.core.hydra_config import HydraConfig

    pruner_cfg = HydraConfig.get().sweeper.get("pruner")
    if not pruner_cfg:
        return []
    logged = {"last_logged_loss": "loss", "train_loss": "loss", "eval_loss": "eval_loss"}.get(metric)
    if logged is None:
        log.warning("hydra.sweeper.pruner: pruning compares losses logged during training; the sweep optimizes %s "
                    "(known only at the end), so this trial runs to the end (use eval.metric=last_logged_loss or "
                    "eval_loss to prune).", metric)
        return []
    import optuna
    from hydra.utils import instantiate

    study = optuna.load_study(study_name=os.environ[ENV_STUDY], storage=open_storage(os.environ[ENV_STORAGE]),
                              pruner=instantiate(pruner_cfg))
    # Optuna's Trial for a trial another process asked for: its id is the storage's key (no public lookup).
    return [_pruning_callback(optuna.trial.Trial(study, int(os.environ[ENV_TRIAL_ID])), logged)]


def _pruning_callback(trial, logged: str):
    from transformers import TrainerCallback

    class TrialPruning(TrainerCallback):
        """Reports each logged loss to the trial; stops training when the pruner says so (the run still saves
        and scores what it has; the sweeper marks the trial PRUNED)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            value = (logs or {}).get(logged)
            if not state.is_world_process_zero or not isinstance(value, (int, float)) or math.isnan(value):
                return
            trial.report(float(value), state.global_step)
            if trial.should_prune():
                log.info("the pruner stopped this trial at step %d (%s=%.4g)", state.global_step, logged, value)
                trial.set_user_attr(PRUNED_AT, state.global_step)
                control.should_training_stop = True

    return TrialPruning()


# ------------------------------------------------------------------------------------------- for `report`

def sweep_storage(sweep_dir: Path) -> Optional[tuple[str, str]]:
    """(storage URL, study name) of a tuneforge Optuna sweep in this directory, from its multirun.yaml."""
    from omegaconf import OmegaConf

    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return None
    sweeper = (OmegaConf.to_container(OmegaConf.load(path)).get("hydra") or {}).get("sweeper") or {}
    if "tuneforge_optuna_sweeper" not in str(sweeper.get("_target_", "")):
        return None
    url = storage_url(sweeper.get("storage"), sweep_dir)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        return None
    return url, sweeper.get("study_name") or DEFAULT_STUDY_NAME


def read_trials(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """The study's trials by job directory name (the trial number): state, value, pruned step, and whether the
    trial retried a crashed one ({} when the sweep has no tuneforge Optuna study)."""
    where = sweep_storage(sweep_dir)
    if where is None:
        return {}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=where[1], storage=open_storage(where[0]))
    out = {}
    for t in study.get_trials(deepcopy=False):
        state = t.state.name
        if t.user_attrs.get(CRASHED):
            state = "CRASHED (queued again)"
        elif t.user_attrs.get(SURPLUS):
            continue
        elif t.user_attrs.get(PRUNED_AT) is not None:
            state = f"PRUNED at step {t.user_attrs[PRUNED_AT]}"
        out[str(t.number)] = {"state": state, "value": t.value, "params": dict(t.params)}
    return out
