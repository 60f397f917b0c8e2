"""`tuneforge train -m hydra/sweeper=optuna ...`: a Hydra sweeper on current Optuna (5.x).

The keys of hydra-optuna-sweeper, which it replaces, keep their meaning: `hydra.sweeper.direction`, `n_trials`,
`n_jobs` (trials asked per batch, run in parallel by a parallel launcher), `max_failure_rate`, `study_name`,
`storage`, `hydra/sweeper/sampler=tpe|gp|cmaes|random|grid` (`hydra.sweeper.sampler.seed=...`), and the search
space in `hydra.sweeper.params` or on the command line with Hydra's syntax: `a,b` / `choice(a,b)` (categorical),
`range(1,9,2)` (integers, the end excluded as in Hydra), `interval(1e-5,1e-3)` (uniform floats; `tag(log,
interval(...))` log-uniform; `int(interval(4,64))` integers). What is new:

- the study is stored by default (`sqlite:///SWEEP_DIR/study.db`; `hydra.sweeper.storage=URL` any RDB URL or
  `journal:PATH` for workers on several machines): the same command with the same `hydra.sweep.dir` resumes a
  crashed sweep, and several workers on one storage share one study and run n_trials in total;
- `hydra/sweeper/pruner=median|hyperband|...` prunes trials from the losses a job logs (runs/study.py);
- each job's directory is its trial number (`SWEEP_DIR/N`), unique across workers.
"""

# No `from __future__ import annotations`: Hydra imports plugin modules without registering them in sys.modules,
# where dataclasses look string annotations up.
import functools
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig, OmegaConf

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- configs

@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    seed: Optional[int] = None
    n_startup_trials: int = 10
    multivariate: bool = False
    # Parallel trials (n_jobs > 1, several workers) would otherwise be asked the same point.
    constant_liar: bool = True


@dataclass
class GPSamplerConf:
    _target_: str = "optuna.samplers.GPSampler"
    seed: Optional[int] = None
    n_startup_trials: int = 10


@dataclass
class CmaEsSamplerConf:
    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: Optional[int] = None
    n_startup_trials: int = 1
    sigma0: Optional[float] = None


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: Optional[int] = None


@dataclass
class GridSamplerConf:
    """The grid is the search space (choices and ranges); n_trials is raised or lowered to the grid's size."""
    _target_: str = "optuna.samplers.GridSampler"
    _partial_: bool = True
    seed: Optional[int] = None


@dataclass
class MedianPrunerConf:
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 2
    n_warmup_steps: int = 0
    interval_steps: int = 1


@dataclass
class PercentilePrunerConf:
    _target_: str = "optuna.pruners.PercentilePruner"
    percentile: float = 25.0
    n_startup_trials: int = 2
    n_warmup_steps: int = 0


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"
    reduction_factor: int = 3


@dataclass
class SuccessiveHalvingPrunerConf:
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"
    reduction_factor: int = 4


@dataclass
class TuneforgeOptunaSweeperConf:
    _target_: str = "hydra_plugins.tuneforge_optuna_sweeper.sweeper.TuneforgeOptunaSweeper"
    defaults: List[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])
    sampler: Any = MISSING
    # hydra/sweeper/pruner=none: trials run to the end. A pruner reads the losses jobs log (eval.metric=
    # last_logged_loss / eval_loss).
    pruner: Any = MISSING
    direction: str = "minimize"  # minimize | maximize
    # None: sqlite:///SWEEP_DIR/study.db. Any SQLAlchemy URL, or journal:PATH (a journal file).
    storage: Optional[str] = None
    # None: "tuneforge" (one study per default storage); a storage shared by several sweeps needs its own name.
    study_name: Optional[str] = None
    n_trials: int = 20
    n_jobs: int = 2
    # Stop the sweep when more than this fraction of the finished trials failed.
    max_failure_rate: float = 0.0
    # A running trial whose sweeper process sent no heartbeat for this long (or died, on this host) is a crashed
    # worker's: on the next start its parameters run again.
    grace_period_s: int = 600
    params: Optional[Dict[str, str]] = None


cs = ConfigStore.instance()
cs.store(group="hydra/sweeper", name="optuna", node=TuneforgeOptunaSweeperConf, provider="tuneforge")
for _name, _node in (("tpe", TPESamplerConf), ("gp", GPSamplerConf), ("cmaes", CmaEsSamplerConf),
                     ("random", RandomSamplerConf), ("grid", GridSamplerConf)):
    cs.store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="tuneforge")
cs.store(group="hydra/sweeper/pruner", name="none", node={}, provider="tuneforge")
for _name, _node in (("median", MedianPrunerConf), ("percentile", PercentilePrunerConf),
                     ("hyperband", HyperbandPrunerConf), ("successive_halving", SuccessiveHalvingPrunerConf)):
    cs.store(group="hydra/sweeper/pruner", name=_name, node=_node, provider="tuneforge")


# ---------------------------------------------------------------------------------------------- search space

def distribution(override: Override) -> Any:
    """An Optuna distribution for a sweep override (None for a fixed value)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not override.is_sweep_override():
        return None
    value = override.value()
    key = override.get_key_element()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if isinstance(value, RangeSweep):  # Hydra's range excludes its end
        values = list(override.sweep_iterator(transformer=Transformer.encode))
        if not values:
            raise ValueError(f"{key}: {override.input_line} is empty")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return FloatDistribution(float(values[0]), float(values[-1]), step=float(value.step))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(f"{key}: {override.input_line} is not a sweep the Optuna sweeper knows "
                     "(a,b | choice(...) | range(...) | interval(...))")


def search_space(arguments: List[str], params: Optional[Dict[str, str]]) -> tuple[dict, dict]:
    """(distributions, fixed values) from hydra.sweeper.params and the command line (which wins)."""
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.get_key_element()
        dist = distribution(override)
        space.pop(key, None)
        fixed.pop(key, None)
        if dist is None:
            fixed[key] = override.get_value_element_as_str()
        else:
            space[key] = dist
    return space, fixed


def grid_of(space: dict) -> dict[str, list]:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    grid = {}
    for key, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            grid[key] = list(dist.choices)
        elif isinstance(dist, IntDistribution) and not dist.log:
            grid[key] = list(range(dist.low, dist.high + 1, dist.step))
        else:
            raise ValueError(f"hydra/sweeper/sampler=grid needs discrete values; {key} is {dist}: use choice(...) "
                             "or range(...)")
    return grid


def _job_value(value: Any) -> str:
    """A sampled value as a Hydra override value (strings quoted unless plain)."""
    if isinstance(value, str) and not value.replace("_", "").replace("-", "").replace(".", "").isalnum():
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


# ---------------------------------------------------------------------------------------------- the sweeper

class _Heartbeat:
    """Renews the heartbeat attribute of this worker's running trials (public Trial API: works on every storage),
    so that another worker's restart can tell a crashed worker's trials from live ones."""

    def __init__(self, interval_s: float):
        self.trials: list = []
        self._stop = threading.Event()
        self._interval = interval_s
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        from tuneforge.runs.study import HEARTBEAT

        while not self._stop.wait(self._interval):
            for trial in list(self.trials):
                try:
                    trial.set_user_attr(HEARTBEAT, time.time())
                except Exception:  # the trial finished meanwhile
                    pass


class TuneforgeOptunaSweeper(Sweeper):
    def __init__(self, sampler: Any, pruner: Any, direction: str, storage: Optional[str], study_name: Optional[str],
                 n_trials: int, n_jobs: int, max_failure_rate: float, grace_period_s: int,
                 params: Optional[DictConfig]):
        self.sampler, self.pruner = sampler, pruner or None
        self.direction = str(direction).lower()
        self.storage, self.study_name = storage, study_name
        self.n_trials, self.n_jobs = int(n_trials), int(n_jobs)
        self.max_failure_rate, self.grace_period_s = float(max_failure_rate), int(grace_period_s)
        self.params = OmegaConf.to_container(params) if isinstance(params, DictConfig) else params
        self.config: Optional[DictConfig] = None
        self.launcher = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        import importlib.util

        if importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None:
            log.warning("hydra-optuna-sweeper is installed too: it registers the same hydra/sweeper=optuna names and "
                        "pins optuna<3; remove it (pip uninstall hydra-optuna-sweeper).")
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    def _check(self) -> None:
        if self.direction not in ("minimize", "maximize"):
            raise ValueError(f"hydra.sweeper.direction={self.direction}: minimize or maximize (tuneforge optimizes "
                             "one number per job)")
        if self.n_trials < 1 or self.n_jobs < 1:
            raise ValueError("hydra.sweeper.n_trials and hydra.sweeper.n_jobs must be >= 1")
        if self.storage and not self.study_name:
            raise ValueError(f"hydra.sweeper.storage={self.storage} may hold other sweeps' studies: name this one "
                             "with hydra.sweeper.study_name=NAME")

    def _study(self, space: dict):
        import optuna

        from tuneforge.runs.study import DEFAULT_STUDY_NAME, open_storage, storage_url

        sampler = self.sampler
        if isinstance(sampler, functools.partial):  # the grid sampler is built from the search space
            grid = grid_of(space)
            sampler = sampler(search_space=grid)
            size = 1
            for values in grid.values():
                size *= len(values)
            if size != self.n_trials:
                log.info("hydra/sweeper/sampler=grid: n_trials %d -> %d (the size of the grid)", self.n_trials, size)
                self.n_trials = size
        self.url = storage_url(self.storage, Path(self.config.hydra.sweep.dir))
        self.name = self.study_name or DEFAULT_STUDY_NAME
        # Several workers may create the study at once: the loser of that race loads it.
        return optuna.create_study(study_name=self.name, storage=open_storage(self.url), sampler=sampler,
                                   pruner=self.pruner, direction=self.direction, load_if_exists=True)

    def _recover_crashed(self, study) -> None:
        """Running trials of a dead worker (a dead process on this host, or no heartbeat for grace_period_s):
        marked crashed (uncounted) and their parameters queued again, so a restarted sweep resumes."""
        from optuna.trial import Trial, TrialState

        from tuneforge.runs.study import CRASHED, HEARTBEAT, WORKER

        host = socket.gethostname()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = str(t.user_attrs.get(WORKER, ""))
            w_host, _, w_pid = worker.rpartition(":")
            beat = float(t.user_attrs.get(HEARTBEAT, 0) or (t.datetime_start.timestamp() if t.datetime_start else 0))
            dead_here = w_host == host and w_pid.isdigit() and not _alive(int(w_pid))
            if not (dead_here or time.time() - beat > self.grace_period_s):
                continue
            Trial(study, t._trial_id).set_user_attr(CRASHED, True)  # noqa: SLF001 (Optuna has no public id lookup)
            _told(study, t.number, state=TrialState.FAIL, skip_if_finished=True)
            study.enqueue_trial(dict(t.params), user_attrs={"tuneforge_retry_of": t.number})
            log.warning("trial %d was running in a worker that is gone (%s): its parameters run again", t.number,
                        worker or "unknown")

    def sweep(self, arguments: List[str]) -> None:
        import optuna
        from hydra.core.utils import JobStatus
        from optuna.trial import TrialState

        from tuneforge.runs import study as st

        assert self.config is not None and self.launcher is not None
        self._check()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        space, fixed = search_space(arguments, self.params)
        study = self._study(space)
        self._recover_crashed(study)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        log.info("Optuna study %r in %s: %s, %d trials, %d per batch; space %s", self.name, self.url,
                 self.direction, self.n_trials, self.n_jobs, {k: str(v) for k, v in space.items()})
        worker = f"{socket.gethostname()}:{os.getpid()}"
        with _Heartbeat(min(60.0, self.grace_period_s / 4)) as heartbeat:
            while True:
                done = sum(st.counted(t) for t in study.get_trials(deepcopy=False))
                remaining = self.n_trials - done
                if remaining <= 0:
                    break
                batch = []
                for _ in range(min(self.n_jobs, remaining)):
                    trial = study.ask(space)
                    trial.set_user_attr(st.WORKER, worker)
                    trial.set_user_attr(st.HEARTBEAT, time.time())
                    # Exactly n_trials over all workers: trial numbers are handed out atomically by the storage, so
                    # a trial beyond the n_trials-th counted one (another worker asked first) never runs.
                    before = [t for t in study.get_trials(deepcopy=False) if t.number <= trial.number and st.counted(t)]
                    if len(before) > self.n_trials:
                        trial.set_user_attr(st.SURPLUS, True)
                        _told(study, trial, state=TrialState.FAIL)
                        break
                    batch.append(trial)
                if not batch:
                    break
                heartbeat.trials = batch
                overrides = [self._job_overrides(trial, fixed) for trial in batch]
                self.validate_batch_is_legal(overrides)
                returns = self.launcher.launch(overrides, initial_job_idx=batch[0].number)
                heartbeat.trials = []
                for trial, ret in zip(batch, returns):
                    self._tell(study, trial, ret, JobStatus)
                self._check_failures(study)
        best = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if best:
            b = study.best_trial
            log.info("Best trial %d: %s=%s with %s", b.number, self.direction, b.value, b.params)
            OmegaConf.save(OmegaConf.create({"name": "optuna", "best_trial": b.number, "best_value": b.value,
                                             "best_params": dict(b.params), "storage": _redacted(self.url),
                                             "study_name": self.name}), sweep_dir / "optimization_results.yaml")

    def _job_overrides(self, trial, fixed: dict) -> list[str]:
        from tuneforge.runs import study as st

        sampled = [f"{k}={_job_value(v)}" for k, v in trial.params.items()]
        # Hydra's own keys: the job directory is the trial number (unique across workers), and the job learns its
        # trial (to report losses for pruning) from its environment.
        return [*[f"{k}={v}" for k, v in fixed.items()], *sampled,
                f"hydra.sweep.subdir={trial.number}",
                f"++hydra.job.env_set.{st.ENV_STORAGE}={_job_value(self.url)}",
                f"++hydra.job.env_set.{st.ENV_STUDY}={_job_value(self.name)}",
                f"++hydra.job.env_set.{st.ENV_TRIAL_ID}={trial._trial_id}"]  # noqa: SLF001

    def _tell(self, study, trial, ret, JobStatus) -> None:
        from optuna.trial import TrialState

        from tuneforge.runs import study as st

        if ret.status != JobStatus.COMPLETED:
            error = ret._return_value  # noqa: SLF001 (reading .return_value re-raises it)
            _told(study, trial, state=TrialState.FAIL, skip_if_finished=True)
            # A person's Ctrl-C / SIGTERM stops the sweep (faults is loaded when a tuneforge job raised it; importing
            # it here would cost seconds of transformers imports in every sweep).
            faults = sys.modules.get("tuneforge.runs.faults")
            if (faults is not None and isinstance(error, faults.Interrupted)) or not isinstance(error, Exception):
                raise error
            log.error("trial %d failed: %s", trial.number, error)
            return
        value = ret.return_value
        pruned = study._storage.get_trial(trial._trial_id).user_attrs.get(st.PRUNED_AT)  # noqa: SLF001
        if pruned is not None:
            _told(study, trial, state=TrialState.PRUNED, skip_if_finished=True)
        elif isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
            _told(study, trial, float(value), skip_if_finished=True)
        else:  # tuneforge's job returns None when it failed (its failed.json says why) or scored nothing
            log.error("trial %d returned %r: recorded as failed", trial.number, value)
            _told(study, trial, state=TrialState.FAIL, skip_if_finished=True)

    def _check_failures(self, study) -> None:
        from optuna.trial import TrialState

        from tuneforge.runs import study as st

        finished = [t for t in study.get_trials(deepcopy=False) if st.counted(t) and t.state.is_finished()]
        failed = sum(t.state == TrialState.FAIL for t in finished)
        if finished and failed / len(finished) > self.max_failure_rate:
            raise RuntimeError(f"{failed} of {len(finished)} trials failed (more than hydra.sweeper.max_failure_rate="
                               f"{self.max_failure_rate}); see the failed jobs' failed.json. The same command resumes "
                               "the study.")


def _told(study, trial, *args, **kwargs) -> None:
    """study.tell, where the grid sampler's "grid complete" stop is no error: it calls Study.stop, which Optuna
    allows only inside study.optimize, after the trial's result is stored (the sweep ends by n_trials = grid size)."""
    try:
        study.tell(trial, *args, **kwargs)
    except RuntimeError as exc:
        if "Study.stop" not in str(exc):
            raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _redacted(url: str) -> str:
    from tuneforge.runs.redaction import redact_url

    return redact_url(url)
