"""Faults during training: SIGTERM/Ctrl-C save a checkpoint and stop cleanly; NaN/inf stops early.

Both are TrainerCallbacks (the Trainer already knows how to save and stop between steps); `lifecycle.run` turns
what they saw into an exit code and a message that says how to resume or what to check.
"""

from __future__ import annotations

import logging
import math
import signal
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)


class RunStopped(Exception):
    """Training stopped early on purpose; `exit_code` is what the command exits with."""

    exit_code = 1


class Interrupted(RunStopped):
    """SIGTERM / Ctrl-C: a checkpoint was saved, the run can be resumed."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class Diverged(RunStopped):
    """The loss or the gradient norm became NaN/inf for `train.nan_patience` steps in a row."""

    exit_code = 3


class StopOnSignal(TrainerCallback):
    """On SIGTERM or SIGINT, finish the current step, save a checkpoint and stop. A second signal aborts."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: Optional[int] = None
        self.step: Optional[int] = None

    def _handle(self, signum, frame):
        if self.signum is not None:  # asked twice: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: saving a checkpoint after the current step, then stopping "
                    "(send it again to abort without saving).", signal.Signals(signum).name)

    @contextmanager
    def installed(self) -> Iterator["StopOnSignal"]:
        previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        try:
            for s in self.SIGNALS:
                signal.signal(s, self._handle)
        except ValueError:  # not the main thread (some launchers): the default handlers stay
            previous = {}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def on_step_end(self, args, state, control, **kwargs):
        if self.signum is not None:
            self.step = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


def all_finite(grads: list) -> bool:
    """Whether every gradient is finite. One fused norm over all of them (one device sync) instead of a check and
    a sync per tensor: on the demo's 420 LoRA gradients, 45-50 ms instead of 170-210 ms a step on the shared 2-core
    Xeon (benchmarks/step_time.py, the `callbacks` part). The squares of finite gradients above ~1e19 overflow
    too, so a non-finite norm is confirmed tensor by tensor."""
    try:
        if torch.isfinite(torch.nn.utils.get_total_norm(grads, foreach=True)):
            return True
    except RuntimeError:  # a device without the foreach kernels
        pass
    return all(bool(torch.isfinite(g).all()) for g in grads)


class StopOnNaN(TrainerCallback):
    """Checks every optimizer step (not only logged ones): a step whose gradients are NaN/inf is skipped
    (its update would poison the weights), and `patience` such steps in a row stop training without saving,
    so the last checkpoint on disk is the last good one. The logged loss and grad norm are checked too."""

    def __init__(self, patience: int):
        self.patience = max(1, patience)
        self.bad_in_a_row = 0
        self.first_bad_step: Optional[int] = None
        self.tripped_at: Optional[int] = None
        self.what = ""

    def _bad(self, step: int, what: str) -> None:
        self.bad_in_a_row += 1
        if self.bad_in_a_row == 1:
            self.first_bad_step = step
        self.what = what
        log.warning("step %d: %s is not finite (%d/%d in a row); the update is skipped.",
                    step, what, self.bad_in_a_row, self.patience)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None] if model else []
        if grads and not all_finite(grads):
            self._bad(state.global_step + 1, "the loss or its gradient")
            for p in model.parameters():  # AdamW leaves a parameter without a gradient untouched
                p.grad = None
        else:
            self.bad_in_a_row = 0
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value) and self.bad_in_a_row == 0:
                self._bad(state.global_step, key)
        return self._maybe_stop(state, control)

    def on_step_end(self, args, state, control, **kwargs):
        return self._maybe_stop(state, control)

    def _maybe_stop(self, state, control):
        if self.bad_in_a_row >= self.patience and self.tripped_at is None:
            self.tripped_at = state.global_step
        if self.tripped_at is not None:
            control.should_training_stop = True
            control.should_save = False  # keep the last good checkpoint the newest one
        return control


def interrupted_message(stopper: StopOnSignal, run_dir, checkpoint) -> str:
    name = signal.Signals(stopper.signum).name
    return (f"{name}: training stopped after step {stopper.step}; checkpoint saved in {checkpoint}. "
            f"Resume with the same command plus: hydra.run.dir={run_dir} train.resume_from_checkpoint=auto")


def diverged_message(guard: StopOnNaN, learning_rate: float, bf16: bool, checkpoint) -> str:
    kept = f"the last good checkpoint is {checkpoint}" if checkpoint else \
        "no checkpoint was saved before it (set train.save_strategy=steps and train.save_steps)"
    return (f"{guard.what} became NaN/inf at step {guard.first_bad_step} and stayed so for {guard.patience} "
            f"step(s) (train.nan_patience); training stopped at step {guard.tripped_at}, {kept}. Check: "
            f"train.learning_rate={learning_rate:g} (too high? try 10x lower or more warmup_steps), "
            f"precision (bf16={bf16}; fp16 overflows easily, try fp32 or bf16), train.max_grad_norm, and the data "
            "(`tuneforge doctor`, empty or extremely long rows).")


def train_guarded(trainer, train_cfg, run_dir, bf16: bool):
    """`trainer.train()` with checkpoint resume, the signal and NaN guards; raises Interrupted / Diverged."""
    from tuneforge.runs import checkpoints, manifest, redaction

    checkpoint = checkpoints.resolve_resume(train_cfg.resume_from_checkpoint, run_dir)
    main = trainer.is_world_process_zero()  # several processes: the main one writes the run directory
    if checkpoint:
        log.info("Resuming from %s", checkpoint)
    if checkpoint and main:
        manifest.write(run_dir, resumed=manifest.read(run_dir).get("resumed", []) + [
            {"from": checkpoint, "command": redaction.command_line(), "at": manifest.now()}])
    stopper, guard = StopOnSignal(), StopOnNaN(train_cfg.nan_patience)
    trainer.add_callback(stopper)
    trainer.add_callback(guard)
    from tuneforge.runs.console import training_output

    with stopper.installed(), training_output():
        result = trainer.train(resume_from_checkpoint=checkpoint)
    latest = checkpoints.latest_complete_checkpoint(run_dir)
    if guard.tripped_at is not None:
        if main:
            manifest.write(run_dir, status="diverged", stopped_at_step=guard.tripped_at)
        raise Diverged(diverged_message(guard, train_cfg.learning_rate, bf16, latest))
    if stopper.signum is not None:
        if main:
            manifest.write(run_dir, status="interrupted", stopped_at_step=stopper.step)
        raise Interrupted(interrupted_message(stopper, run_dir, latest), stopper.signum)
    if checkpoint:  # the Trainer averages only the steps of this session; report the whole run's mean
        result = result._replace(training_loss=whole_run_loss(trainer.state.log_history, result.training_loss))
    return result


def whole_run_loss(log_history: list[dict], fallback: float) -> float:
    """Mean training loss over every step, from the logged per-interval means (what an uninterrupted run's
    `training_loss` is)."""
    total, last = 0.0, 0
    for h in log_history:
        if "loss" in h and "step" in h and h["step"] > last:
            total, last = total + h["loss"] * (h["step"] - last), h["step"]
    return total / last if last else fallback
