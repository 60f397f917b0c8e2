"""tuneforge's Hydra sweeper on current Optuna (src/hydra_plugins/tuneforge_optuna_sweeper): the search space, every
sampler, the stored study (two workers share it; a crashed sweep resumes), pruning from logged losses, and
`report` reading the study. The sweeper is generic: most tests drive it with a tiny Hydra app (milliseconds a job)
instead of training runs; test_runs_e2e-style training lives in the one CLI test at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_in_process

optuna = pytest.importorskip("optuna")

from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402

from hydra_plugins.tuneforge_optuna_sweeper import sweeper as sw  # noqa: E402
from tuneforge.commands import report  # noqa: E402
from tuneforge.runs import study as st  # noqa: E402

APP = textwrap.dedent('''
    """A Hydra app whose jobs take milliseconds: the sweeper is under test, not training."""
    import os, signal, time
    from pathlib import Path

    import hydra
    from hydra.core.config_store import ConfigStore
    from hydra.core.hydra_config import HydraConfig

    ConfigStore.instance().store(name="app", node={"x": 0.5, "r": 1, "crash_once": "", "log": "ran.txt"})


    @hydra.main(version_base="1.3", config_path=None, config_name="app")
    def main(cfg):
        trial = Path(HydraConfig.get().runtime.output_dir).name
        with open(cfg.log, "a") as f:
            f.write(f"{trial} {cfg.x} {os.getpid()}\\n")
        if cfg.crash_once and trial == "2" and not os.path.exists(cfg.crash_once):
            Path(cfg.crash_once).touch()
            os.kill(os.getpid(), signal.SIGKILL)  # the whole sweep process dies mid-trial
        time.sleep(0.2)
        return (cfg.x - 0.3) ** 2 + 0.01 * cfg.r


    if __name__ == "__main__":
        main()
''')


@pytest.fixture
def app(tmp_path) -> Path:
    path = tmp_path / "app.py"
    path.write_text(APP)
    return path


def _sweep(app: Path, sweep_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(app), "-m", "hydra/sweeper=optuna", f"hydra.sweep.dir={sweep_dir}",
                             f"log={sweep_dir.parent / 'ran.txt'}", *args],
                            cwd=app.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})


def _ran(sweep_dir: Path) -> list[tuple[str, float]]:
    return [(line.split()[0], float(line.split()[1])) for line in (sweep_dir.parent / "ran.txt").read_text().splitlines()]


def _study(sweep_dir: Path, storage: str | None = None):
    return optuna.load_study(study_name=st.DEFAULT_STUDY_NAME, storage=st.open_storage(
        st.storage_url(storage, sweep_dir)))


def test_search_space_from_hydra_sweep_syntax():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space, fixed = sw.search_space(["peft.r=choice(8,16)", "train.learning_rate=tag(log,interval(1e-5,1e-3))",
                                    "train.warmup_steps=range(0,10,5)", "train.weight_decay=interval(0.0,0.1)",
                                    "train.max_steps=int(interval(4,8))", "train.lr_scheduler_type=linear,cosine",
                                    "train.seed=3"],
                                   {"peft.r": "4,8", "peft.lora_alpha": "16"})
    assert space["peft.r"] == CategoricalDistribution([8, 16])  # the command line wins over params
    assert space["train.learning_rate"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert space["train.warmup_steps"] == IntDistribution(0, 5, step=5)  # Hydra's range excludes its end
    assert space["train.weight_decay"] == FloatDistribution(0.0, 0.1)
    assert space["train.max_steps"] == IntDistribution(4, 8)
    assert space["train.lr_scheduler_type"] == CategoricalDistribution(["linear", "cosine"])
    assert fixed == {"peft.lora_alpha": "16", "train.seed": "3"}
    assert sw.grid_of({k: space[k] for k in ("peft.r", "train.warmup_steps")}) == {"peft.r": [8, 16],
                                                                                   "train.warmup_steps": [0, 5]}
    with pytest.raises(ValueError, match="grid needs discrete values; train.learning_rate"):
        sw.grid_of(space)
    assert sw._job_value("cosine") == "cosine" and sw._job_value("a b,c") == "'a b,c'"
    assert OverridesParser.create().parse_override(f"k={sw._job_value('sqlite:////x/y z.db')}").value() == \
        "sqlite:////x/y z.db"


@pytest.mark.parametrize("sampler", ["tpe", "gp", "cmaes", "random", "grid"])
def test_every_sampler_composes_and_asks(sampler, tmp_path):
    """Each sampler preset composes through the CLI's config and drives a stored study."""
    from hydra.utils import instantiate

    from tuneforge.config.compose import compose_config

    cfg = compose_config(["hydra/sweeper=optuna", f"hydra/sweeper/sampler={sampler}", "hydra.sweeper.sampler.seed=1",
                          f"hydra.sweep.dir={tmp_path}"], return_hydra=True)
    sweeper = instantiate(cfg.hydra.sweeper)
    assert isinstance(sweeper, sw.TuneforgeOptunaSweeper)
    sweeper.config = cfg
    space, _ = sw.search_space(["x=range(0,4)", "y=choice(a,b)"] if sampler == "grid" else
                               ["x=interval(0.0,1.0)", "y=interval(1,5)"], None)
    study = sweeper._study(space)
    assert type(study.sampler).__name__.lower().startswith(sampler.replace("cmaes", "cmaes"))
    for _ in range(3):
        trial = study.ask(space)
        study.tell(trial, float(trial.params["x"]))
    assert len(study.trials) == 3 and (tmp_path / "study.db").is_file()
    if sampler == "grid":
        assert sweeper.n_trials == 8  # 4 x 2 grid points


@pytest.mark.slow
def test_two_workers_share_one_study(app, tmp_path):
    """Two sweeper processes on one storage (the sweep directory's study.db): n_trials in total, each trial run once,
    every job in its own directory named by its trial number."""
    sweep = tmp_path / "sweep"
    args = ["hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=1", "x=interval(0.0,1.0)", "r=choice(1,2,3)",
            "hydra/sweeper/sampler=random"]
    workers = [_sweep(app, sweep, *args) for _ in range(2)]
    outs = [w.communicate(timeout=180)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-2000:] for o in outs)
    ran = _ran(sweep)
    study = _study(sweep)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(ran) == 4 and len(complete) == 4
    assert sorted(n for n, _ in ran) == sorted(str(t.number) for t in complete)  # none ran twice
    assert len({x for _, x in ran}) == 4
    assert len({line.split()[2] for line in (tmp_path / "ran.txt").read_text().splitlines()}) == 2  # both worked
    assert sorted(p.name for p in sweep.iterdir() if (p / ".hydra").is_dir()) == sorted(n for n, _ in ran)
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


@pytest.mark.slow
def test_a_crashed_sweep_resumes_on_a_journal_file(app, tmp_path):
    """The sweep process is killed inside trial 2; the same command resumes: the crashed trial's parameters run
    again, the finished trials are kept, and the study ends with n_trials counted trials. `report` reads it."""
    sweep = tmp_path / "sweep"
    journal = f"journal:{tmp_path / 'shared' / 'study.log'}"
    args = ["hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=1", "x=interval(0.0,1.0)", "hydra.sweeper.sampler.seed=0",
            f"hydra.sweeper.storage={journal}", "hydra.sweeper.study_name=resume", f"crash_once={tmp_path / 'crashed'}"]
    first = _sweep(app, sweep, *args)
    out = first.communicate(timeout=120)[0]
    assert first.returncode == -9, out[-2000:]
    again = _sweep(app, sweep, *args)
    out = again.communicate(timeout=120)[0]
    assert again.returncode == 0, out[-2000:]
    assert "trial 2 was running in a worker that is gone" in out
    study = optuna.load_study(study_name="resume", storage=st.open_storage(journal))
    by_number = {t.number: t for t in study.trials}
    crashed = [t for t in study.trials if t.user_attrs.get(st.CRASHED)]
    assert [t.number for t in crashed] == [2]
    retry = [t for t in study.trials if t.user_attrs.get("tuneforge_retry_of") == 2]
    assert len(retry) == 1 and retry[0].params == crashed[0].params and retry[0].state.name == "COMPLETE"
    assert sum(st.counted(t) for t in study.trials) == 4
    ran = _ran(sweep)
    # 0 and 1 were not run again; 2 crashed, its retry and one more make 4 counted trials.
    assert [n for n, _ in ran] == ["0", "1", "2", "3", "4"] and retry[0].number in (3, 4)
    assert by_number[0].state.name == by_number[1].state.name == "COMPLETE"

    result = report.report(sweep)
    trial_col = result["header"].index("trial")
    states = {row[1]: row[trial_col] for row in result["rows"]}
    assert states["2"] == "CRASHED (queued again)" and states[str(retry[0].number)] == "COMPLETE"
    assert "Optuna study" in (sweep / "report.md").read_text()


def test_failed_trials_stop_the_sweep_past_max_failure_rate(app, tmp_path):
    sweep = tmp_path / "sweep"
    proc = _sweep(app, sweep, "hydra.sweeper.n_trials=3", "x=interval(0.0,1.0)", "r=choice(oops)")
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "more than hydra.sweeper.max_failure_rate=0.0" in out, out[-3000:]


def test_a_shared_storage_needs_a_study_name():
    sweeper = sw.TuneforgeOptunaSweeper(sampler=None, pruner=None, direction="minimize", storage="sqlite:///x.db",
                                        study_name=None, n_trials=2, n_jobs=1, max_failure_rate=0.0,
                                        grace_period_s=60, params=None)
    with pytest.raises(ValueError, match="name this one with hydra.sweeper.study_name=NAME"):
        sweeper._check()


def test_pruning_callback_reports_losses_and_stops_a_bad_trial(tmp_path):
    """The job's side of pruning: logged losses become the trial's intermediate values; a trial worse than the
    median of the earlier ones at the same step is stopped and marked for the sweeper."""
    from transformers import TrainerControl, TrainerState

    storage = st.open_storage(st.storage_url(None, tmp_path))
    study = optuna.create_study(study_name="p", storage=storage,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    for losses in ([2.0, 1.0, 0.5], [2.0, 3.0, 3.0]):
        trial = study.ask()
        callback = st._pruning_callback(optuna.trial.Trial(study, trial._trial_id), "loss")
        state, control = TrainerState(), TrainerControl()
        for step, loss in enumerate(losses, 1):
            state.global_step = step
            callback.on_log(None, state, control, logs={"loss": loss, "learning_rate": 1e-3})
            if control.should_training_stop:
                break
        study.tell(trial, losses[step - 1])
    first, second = study.trials
    assert first.intermediate_values == {1: 2.0, 2: 1.0, 3: 0.5} and st.PRUNED_AT not in first.user_attrs
    assert second.user_attrs[st.PRUNED_AT] == 2 and second.intermediate_values == {1: 2.0, 2: 3.0}


@pytest.mark.slow
def test_cli_sweep_prunes_from_logged_losses_and_reports(tiny_model, tmp_path):
    """The real `tuneforge train -m hydra/sweeper=optuna` with a median pruner: the grid's second trial (a learning
    rate too small to learn) logs a worse loss than the first at step 2 and is stopped there; `report` says so."""
    sweep = tmp_path / "sweep"
    result = cli_in_process("train", "-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=grid",
                            "hydra.sweeper.sampler.seed=1", "hydra.sweeper.n_jobs=1", "hydra/sweeper/pruner=median",
                            "hydra.sweeper.pruner.n_startup_trials=1", f"model.name_or_path={tiny_model}", "quant=none",
                            "train.max_steps=4", "train.per_device_train_batch_size=2", "train.logging_steps=1",
                            "train.warmup_steps=0", "data.max_samples=16", "eval.before_after=false", "eval.sample_every_steps=0",
                            "eval.metric=last_logged_loss", "train.learning_rate=choice(3e-2,1e-9)",
                            f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    study = _study(sweep)
    assert [t.params["train.learning_rate"] for t in study.trials] == [3e-2, 1e-9]  # the grid's order for seed 1
    first, second = study.trials
    assert first.state.name == "COMPLETE" and sorted(first.intermediate_values) == [1, 2, 3, 4]
    assert second.state.name == "PRUNED" and second.user_attrs[st.PRUNED_AT] == 2
    assert json.loads((sweep / "1" / "metrics.json").read_text())["train_steps"] == 2  # stopped, then saved
    rows = report.report(sweep)["rows"]
    assert [(r[1], r[2], r[3]) for r in rows] == [("0", "ok", "COMPLETE"), ("1", "pruned", "PRUNED at step 2")]
