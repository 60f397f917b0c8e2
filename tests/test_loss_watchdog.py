"""The loss watchdog (train.max_loss / train.max_loss_patience, beside train.nan_patience): a run whose logged loss
stays above the ceiling saves a checkpoint and stops with its own exit code (4). The same short run shows what a
newcomer's console holds: tuneforge's one line per stage, not datasets' and transformers' short-work bars."""

from __future__ import annotations

import json
import math
import re

import pytest
from transformers import TrainerControl, TrainerState

from tests.conftest import cli_in_process
from tuneforge.runs.faults import LossTooHigh, StopOnHighLoss


def _log(watch, step, loss):
    state, control = TrainerState(), TrainerControl()
    state.global_step = step
    return watch.on_log(None, state, control, logs={"loss": loss})


def test_the_watchdog_trips_on_n_logged_steps_in_a_row_above_the_ceiling():
    watch = StopOnHighLoss(2.0, 3)
    for step, loss in [(1, 5.0), (2, 4.0), (3, 1.5), (4, 3.0), (5, math.nan), (6, 3.0)]:
        assert not _log(watch, step, loss).should_training_stop  # a dip below, and NaN (StopOnNaN's), reset/skip
    control = _log(watch, 7, 2.5)
    assert control.should_training_stop and control.should_save and watch.tripped_at == 7
    assert LossTooHigh.exit_code == 4
    off = StopOnHighLoss(None, 1)
    assert not _log(off, 1, 1e9).should_training_stop


@pytest.mark.slow
def test_a_run_above_the_ceiling_stops_with_a_checkpoint_and_exit_4(tmp_path, tiny_model):
    run_dir = tmp_path / "run"
    result = cli_in_process("train", f"model.name_or_path={tiny_model}", "train.max_steps=8", "train.logging_steps=1",
                            "train.per_device_train_batch_size=4", "data.max_samples=40", "data.cache=false",
                            "eval.before_after=false",
                            "quant=none", "train.max_loss=0.0", "train.max_loss_patience=2",
                            f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 4, result.stderr[-3000:] + result.stdout[-3000:]
    console = result.stdout + result.stderr
    for bar in ("Loading weights", "Preparing train split", "Generating train split"):
        assert bar not in console, bar  # short work: the stage's own line instead of a bar
    assert re.search(r"train: \d+ rows in, \d+ kept", console) and re.search(r"Loaded \S+ \(torch.float32\) in", console)
    assert (run_dir / "checkpoint-2").is_dir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "loss_too_high" and manifest["stopped_at_step"] == 2
