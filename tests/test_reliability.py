"""What tuneforge writes, it reads back whole or rebuilds; a resume equals the uninterrupted run wherever the kill
landed; no secret in any file or job list; a signal outside training ends the run like one inside it; numbers the
libraries would refuse or misuse are refused first; a command's user errors are one line and exit 2.

Each test asserts the message and that nothing was lost or overwritten (issue 39)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from tests.conftest import cli_in_process
from tuneforge.config.compose import load_config
from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import DataConfig
from tuneforge.data import cache
from tuneforge.runs import checkpoints, faults, manifest, redaction, rundir, scratch


def _one_line(proc: subprocess.CompletedProcess, needle: str) -> str:
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if needle in line]
    assert len(lines) == 1, out[-3000:]
    for noise in ("Traceback", "Error executing job"):
        assert noise not in out, out[-3000:]
    return lines[0]


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != rundir.LOCK_FILE}


# --- temporary folders of killed writers ------------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has it (until the kernel reuses it, which remove_stale checks by age)


def test_leftovers_of_a_killed_writer_are_removed_and_a_live_writers_are_kept(tmp_path):
    dead = tmp_path / f".entry{scratch.MARK}{_dead_pid()}-0a0b0c0d"
    (dead / "train").mkdir(parents=True)
    (dead / "train" / "data.arrow").write_bytes(b"x" * 1000)
    live = scratch.make_scratch_dir(tmp_path / "other")  # this process: alive
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        alive_other = tmp_path / f".x{scratch.MARK}{parent.pid}-00000000"
        alive_other.mkdir()
        kept = tmp_path / "entry"
        kept.mkdir()
        assert scratch.remove_stale(tmp_path) == [dead]
        assert not dead.exists() and live.is_dir() and alive_other.is_dir() and kept.is_dir()
    finally:
        parent.kill()
        parent.wait()


# --- the data cache ----------------------------------------------------------------------------------------------

def _splits() -> DatasetDict:
    return DatasetDict({"train": Dataset.from_dict({"input_ids": [[1, 2, 3]] * 50, "labels": [[-100, 2, 3]] * 50}),
                        "eval": Dataset.from_dict({"input_ids": [[4, 5]] * 7, "labels": [[4, 5]] * 7})})


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


DAMAGES = {
    "stats truncated": lambda e: _truncate(e / cache.STATS_FILE),
    "split file truncated": lambda e: _truncate(next((e / "train").glob("*.arrow"))),
    "state.json deleted": lambda e: (e / "train" / "state.json").unlink(),
    "eval split deleted": lambda e: shutil.rmtree(e / "eval"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_cache_entry_is_named_removed_and_rebuilt(tmp_path, caplog, damage):
    cfg = DataConfig(cache_dir=str(tmp_path))
    entry = cache.save(cfg, "key1", _splits(), {"train": {"rows": 50}})
    DAMAGES[damage](entry)
    with caplog.at_level(logging.WARNING, logger="tuneforge.data.cache"):
        assert cache.load(cfg, "key1") is None
    warning = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(warning) == 1 and str(entry) in warning[0] and "rebuilding it" in warning[0]
    assert not entry.exists() and not list(tmp_path.iterdir())  # moved aside and deleted: nothing left over
    cache.save(cfg, "key1", _splits(), {"train": {"rows": 50}})  # the rebuild takes its place
    splits, stats = cache.load(cfg, "key1")
    assert splits["train"]["input_ids"] == _splits()["train"]["input_ids"] and len(splits["eval"]) == 7
    assert stats == {"train": {"rows": 50}}


def test_a_rebuild_replaces_a_damaged_entry_still_in_place(tmp_path):
    """The reported failure: the damaged folder was still there when the rebuilt copy was renamed onto it."""
    cfg = DataConfig(cache_dir=str(tmp_path))
    entry = cache.save(cfg, "key1", _splits(), {})
    (entry / cache.STATS_FILE).write_text('{"stats": {}, "sav')
    cache.save(cfg, "key1", _splits(), {"again": 1})
    assert cache.load(cfg, "key1")[1] == {"again": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["key1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model):
    """A finished 2-step run with a checkpoint at each step; then its data cache entry is damaged (truncated
    stats) and a second run with the same data is stopped by SIGTERM while its trained model is scored, then
    resumed. Returns (base, the second run's result, its resume's result)."""
    base = tmp_path_factory.mktemp("finished")
    args = _train_args(tiny_model, base / "cache")
    first = cli_in_process(*args, f"hydra.run.dir={base / 'run'}")
    assert first.returncode == 0, first.stderr[-3000:]
    entry = next(p for p in (base / "cache").iterdir() if not p.name.startswith("."))
    os.truncate(entry / cache.STATS_FILE, 40)
    scored = [*args, "eval.before_after=true", "eval.num_samples=2", "eval.max_new_tokens=2",
              f"hydra.run.dir={base / 'again'}"]
    again = cli_in_process(*scored, "callbacks=[tests.fault_hooks:SigtermWhileScoring]")
    resumed = cli_in_process(*scored, "train.resume_from_checkpoint=auto")
    return base, again, resumed


def _train_args(model: str, cache_dir: Path, *extra: str) -> list[str]:
    return ["train", f"model.name_or_path={model}", "train.max_steps=2", "train.logging_steps=1",
            "train.save_strategy=steps", "train.save_steps=1", "train.per_device_train_batch_size=4",
            "data.max_samples=16", "eval.before_after=false", "quant=none", f"data.cache_dir={cache_dir}", *extra]


def test_a_run_on_a_damaged_cache_entry_rebuilds_it_and_goes_on(finished):
    base, again, _ = finished
    out = again.stdout + again.stderr
    assert "damaged" in out and cache.STATS_FILE in out and "TypeError" not in out
    assert (base / "again" / "checkpoint-2").is_dir()  # it trained (then a signal stopped its scoring)


def test_sigterm_while_scoring_ends_the_run_with_the_resume_hint_and_the_resume_finishes_it(finished):
    base, again, resumed = finished
    run = base / "again"
    assert again.returncode == 128 + signal.SIGTERM, again.stderr[-3000:]
    line = _one_line(again, "SIGTERM while scoring the trained model")
    assert f"checkpoint {run / 'checkpoint-2'} is kept" in line and "train.resume_from_checkpoint=auto" in line
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "nothing left to train" in resumed.stdout + resumed.stderr
    history = json.loads((run / "manifest.json").read_text())
    assert history["status"] == "finished" and len(history["resumed"]) == 1
    assert "3/2" not in resumed.stdout + resumed.stderr  # no step past the last one
    # Same data (the rebuilt cache entry), same seed: the uninterrupted first run's steps, loss and adapter.
    metrics, original = (json.loads((d / "metrics.json").read_text()) for d in (run, base / "run"))
    assert metrics["train_steps"] == original["train_steps"] == 2
    assert metrics["train_loss"] == pytest.approx(original["train_loss"], rel=1e-6)
    assert _weights(run) == _weights(base / "run")


def _weights(run_dir: Path) -> bytes:
    return (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()


def test_a_damaged_converted_model_is_named(tiny_model, tmp_path):
    """The files a conversion writes (embedded.damage), on a model directory of the same layout: resolve() removes
    a damaged one and converts again."""
    from tuneforge.models.embedded import damage

    model = tmp_path / "converted"
    shutil.copytree(tiny_model, model)
    assert damage(model) is None
    _truncate(model / "model.safetensors")
    assert damage(model) == f"{model / 'model.safetensors'} is truncated"
    shutil.copy(Path(tiny_model) / "model.safetensors", model / "model.safetensors")
    (model / "tokenizer.json").unlink()
    assert damage(model) == f"{model / 'tokenizer.json'} is missing"


# --- checkpoints and resume ---------------------------------------------------------------------------------------

def _killed_while_saving(base: Path, name: str) -> Path:
    """The run as a kill while the final adapter was written leaves it: checkpoints, no adapter/, no metrics."""
    run = base / name
    shutil.copytree(base / "run", run)
    shutil.rmtree(run / "adapter")
    (run / "metrics.json").unlink()
    return run


def test_a_resume_changing_what_the_checkpoints_hold_is_refused_before_anything_is_written(finished, tiny_model):
    base, *_ = finished
    run = _killed_while_saving(base, "other-r")
    before = _snapshot(run)
    proc = cli_in_process(*_train_args(tiny_model, base / "cache"), f"hydra.run.dir={run}",
                          "train.resume_from_checkpoint=auto", "peft.r=8")
    assert proc.returncode == 2
    line = _one_line(proc, "changes what the checkpoints")
    assert "peft.r: 16 -> 8" in line and "another hydra.run.dir" in line
    assert _snapshot(run) == before  # config.yaml, manifest.json, .hydra/: not one byte changed


def test_resume_auto_skips_a_damaged_checkpoint_for_the_previous_whole_one(finished, caplog):
    base, *_ = finished
    run = base / "damaged-ckpt"
    shutil.copytree(base / "run", run)
    _truncate(run / "checkpoint-2" / "adapter_model.safetensors")
    assert "checkpoint-2" in checkpoints.checkpoint_problem(run / "checkpoint-2") + "checkpoint-2"
    with caplog.at_level(logging.WARNING, logger="tuneforge.runs.checkpoints"):
        assert checkpoints.resolve_resume("auto", run) == str(run / "checkpoint-1")
    assert any("adapter_model.safetensors is truncated" in r.getMessage() and "previous whole" in r.getMessage()
               for r in caplog.records)
    os.truncate(run / "checkpoint-1" / "optimizer.pt", 100)
    assert "optimizer.pt is truncated" in checkpoints.checkpoint_problem(run / "checkpoint-1")


@pytest.mark.parametrize("damage, needle", [
    (lambda r: _truncate(r / "adapter" / "adapter_model.safetensors"), "adapter_model.safetensors is truncated"),
    (lambda r: (r / "adapter" / "adapter_config.json").write_text('{"r": 1'), "adapter_config.json is truncated or damaged"),
    (lambda r: os.truncate(r / "config.yaml", 40), "config.yaml is damaged"),
])
def test_a_damaged_run_is_one_line_in_infer(finished, damage, needle):
    base, *_ = finished
    run = base / f"damaged-{hashlib.sha1(needle.encode()).hexdigest()[:6]}"
    shutil.copytree(base / "run", run)
    damage(run)
    before = _snapshot(run)
    proc = cli_in_process("infer", f"run_dir={run}", "prompt=hi")
    assert proc.returncode == 2
    assert str(run) in _one_line(proc, needle)
    assert _snapshot(run) == before


def test_infer_and_merge_path_errors_are_one_line(finished, tmp_path):
    base, *_ = finished
    missing = cli_in_process("infer", f"run_dir={base / 'run'}", f"prompts_file={tmp_path / 'nope.jsonl'}")
    assert missing.returncode == 2 and "give an existing file" in _one_line(missing, "prompts_file=")
    no_folder = cli_in_process("infer", f"run_dir={base / 'run'}", "prompt=hi",
                               f"output_file={tmp_path / 'no' / 'out.jsonl'}")
    assert no_folder.returncode == 2 and "does not exist" in _one_line(no_folder, "output_file=")
    assert not (tmp_path / "no").exists()
    merge = cli_in_process("merge", f"run_dir={base / 'run'}", f"out={tmp_path / 'no' / 'merged'}")
    assert merge.returncode == 2 and "does not exist" in _one_line(merge, "out=")
    not_a_run = cli_in_process("eval", f"run_dir={tmp_path}")
    assert not_a_run.returncode == 2 and "not a tuneforge run directory" in _one_line(not_a_run, str(tmp_path))


# --- a signal outside training -------------------------------------------------------------------------------------

def test_a_signal_while_a_cache_entry_is_written_leaves_nothing_half_written(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()

    class Splits(DatasetDict):
        def items(self):  # the signal lands between two split files
            for i, item in enumerate(super().items()):
                if i == 1:
                    os.kill(os.getpid(), signal.SIGINT)
                yield item

    with pytest.raises(faults.Interrupted) as stopped:
        with faults.signals_end_the_run(run_dir, main=True) as phase:
            phase.name = "preparing the data"
            cache.save(cfg, "key1", Splits(_splits()), {})
    assert stopped.value.exit_code == 130
    assert str(stopped.value).startswith("SIGINT while preparing the data: the run stopped; no checkpoint")
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary entry was removed on the way out
    assert manifest.read(run_dir)["status"] == "interrupted"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored


# --- secrets and sweeps ---------------------------------------------------------------------------------------------

SECRET = "hf_issue39_sweep_secret"


def test_a_bad_later_sweep_value_is_one_line_and_writes_nothing(tmp_path):
    proc = cli_in_process("train", "-m", "dry_run=true", f"model.token={SECRET}", f"hydra.sweep.dir={tmp_path / 's'}",
                          "train.learning_rate=1e-4,2e-4,abc")
    assert proc.returncode == 2
    assert "sweep value train.learning_rate=abc" in _one_line(proc, "train.learning_rate")
    assert SECRET not in proc.stdout + proc.stderr
    assert not (tmp_path / "s").exists()
    nan = cli_in_process("train", "-m", "dry_run=true", f"hydra.sweep.dir={tmp_path / 's'}", "train.seed=1,-1")
    assert nan.returncode == 2 and "train.seed=-1" in _one_line(nan, "out of range")


def test_a_sweep_shows_and_writes_no_secret(tmp_path):
    sweep = tmp_path / "s"
    proc = cli_in_process("train", "-m", "dry_run=true", f"model.token={SECRET}", f"hydra.sweep.dir={sweep}",
                          "train.learning_rate=1e-4,2e-4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "#1 :" in out and SECRET not in out and redaction.REDACTED in out  # Hydra's job list
    files = [p for p in sweep.rglob("*") if p.is_file()]
    assert (sweep / "multirun.yaml") in files
    assert not [p for p in files if SECRET.encode() in p.read_bytes()]
    assert os.environ.get("HF_TOKEN") != SECRET  # this process's environment is given back


# --- numbers --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, needle", [
    ("train.learning_rate=nan", "train.learning_rate=nan is not a finite number"),
    ("peft.lora_dropout=inf", "peft.lora_dropout=inf is not a finite number"),
    ("train.lr_scheduler_kwargs={min_lr: nan}", "train.lr_scheduler_kwargs.min_lr=nan is not a finite"),
    ("train.seed=4294967296", "train.seed=4294967296 is out of range"),
    ("train.data_seed=-3", "train.data_seed=-3 is out of range"),
    ("train.max_grad_norm=-1", "train.max_grad_norm=-1.0: negative values are refused"),
    ("train.warmup_steps=-5", "train.warmup_steps=-5.0: negative values are refused"),
    ("train.save_total_limit=-1", "train.save_total_limit=-1: negative values are refused"),
])
def test_numbers_the_libraries_would_refuse_or_misuse_are_refused(override, needle):
    with pytest.raises(ConfigError, match="^" + needle.replace("[", r"\[").replace("{", r"\{")):
        load_config([override])


def test_the_negative_defaults_stay_legal():
    assert load_config(["train.max_steps=-1", "train.num_train_epochs=1"]).train.max_steps == -1
