"""Faults during training: SIGTERM/Ctrl-C save a checkpoint and stop cleanly; NaN/inf stops early; the loss
watchdog (train.max_loss) saves a checkpoint and stops a run whose loss stays too high; online RL stops when its
rewards give no learning signal.

Both are TrainerCallbacks (the Trainer already knows how to save and stop between steps); `lifecycle.run` turns
what they saw into an exit code and a message that says how to resume or what to check.
"""

from __future__ import annotations

import logging
import math
import signal
from contextlib import contextmanager
from pathlib import Path
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


class _Signalled(BaseException):
    """Raised by signals_end_the_run's handler where the signal arrives; turned into the explained Interrupted. A
    BaseException, like KeyboardInterrupt, so that no library's `except Exception` swallows it on the way out."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class Diverged(RunStopped):
    """The loss or the gradient norm became NaN/inf for `train.nan_patience` steps in a row."""

    exit_code = 3


class LossTooHigh(RunStopped):
    """The logged loss stayed above `train.max_loss` for `train.max_loss_patience` logged steps (the watchdog)."""

    exit_code = 4


class NoSignal(RunStopped):
    """Online RL: every group of completions scored alike for `train.no_signal_patience` logged steps in a row."""

    exit_code = 5


class StopOnHighLoss(TrainerCallback):
    """The loss watchdog: a finite logged training loss above `ceiling` for `patience` logged steps in a row saves
    a checkpoint and stops (a run that is not learning, e.g. a learning rate far too high or labels that do not
    match the inputs, costs no more steps). Non-finite losses are StopOnNaN's."""

    def __init__(self, ceiling: Optional[float], patience: int):
        self.ceiling, self.patience = ceiling, max(1, patience)
        self.above: list[tuple[int, float]] = []
        self.tripped_at: Optional[int] = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if self.ceiling is None or not isinstance(loss, (int, float)) or not math.isfinite(loss):
            return control
        self.above = self.above + [(state.global_step, float(loss))] if loss > self.ceiling else []
        if len(self.above) >= self.patience and self.tripped_at is None:
            self.tripped_at = state.global_step
            log.warning("step %d: the loss stayed above train.max_loss=%g for %d logged steps: saving a checkpoint "
                        "and stopping.", state.global_step, self.ceiling, self.patience)
            control.should_save = True  # the Trainer saves after this log, then stops
            control.should_training_stop = True
        return control


def loss_too_high_message(watch: StopOnHighLoss, checkpoint, run_dir) -> str:
    losses = ", ".join(f"{loss:.4g}@{step}" for step, loss in watch.above[-watch.patience:])
    return (f"the training loss stayed above train.max_loss={watch.ceiling:g} for {watch.patience} logged steps "
            f"({losses}); stopped at step {watch.tripped_at}, checkpoint saved in {checkpoint}. Check the learning "
            "rate, the data (`tuneforge preview` shows the trained tokens) and the ceiling; to go on anyway: the same "
            f"command plus hydra.run.dir={run_dir} train.resume_from_checkpoint=auto and a higher train.max_loss.")


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


class RunPhase:
    """What the run is doing now (`name`), for the message a signal outside `trainer.train()` ends it with."""

    def __init__(self):
        self.name = "starting"


@contextmanager
def signals_end_the_run(run_dir, main: bool) -> Iterator[RunPhase]:
    """SIGTERM / Ctrl-C anywhere in a run outside `trainer.train()` (which saves a checkpoint first, StopOnSignal):
    the run ends at once as Interrupted, with the same exit code (128 + signal), the manifest's status, and the
    resume hint where a checkpoint exists. The exception unwinds through the writers, whose cleanup removes what
    they had half written (a cache entry, the converted model, the adapter). A second signal acts as usual."""
    from tuneforge.runs import checkpoints, manifest

    phase = RunPhase()
    signals = StopOnSignal.SIGNALS
    previous = {s: signal.getsignal(s) for s in signals}

    def restore():
        for s, handler in previous.items():
            signal.signal(s, handler)

    def handle(signum, frame):
        restore()  # a second signal: the default (or the caller's) behaviour
        raise _Signalled(f"{signal.Signals(signum).name} while {phase.name}", signum)

    try:
        for s in signals:
            signal.signal(s, handle)
    except ValueError:  # not the main thread (some launchers): the default handlers stay
        previous = {}
    try:
        yield phase
    except _Signalled as exc:
        latest = checkpoints.latest_complete_checkpoint(run_dir)
        if main:
            manifest.write(run_dir, status="interrupted", stopped_while=phase.name)
        hint = (f"checkpoint {latest} is kept. Resume with the same command plus: hydra.run.dir={run_dir} "
                "train.resume_from_checkpoint=auto" if latest else
                "no checkpoint had been saved; run the command again (nothing half-written was kept)")
        raise Interrupted(f"{exc}: the run stopped; {hint}", exc.signum) from None
    finally:
        restore()
class StopOnNoSignal(TrainerCallback):
    """Online RL (DESIGN rule 12): the advantage is a reward minus its group's mean, so a step whose every group
    scored alike (TRL's frac_reward_zero_std = 1.0) teaches nothing. `patience` such logged steps in a row stop the
    run (a failed run, not a slow one); the checkpoint of the last step is kept. Inert where no step logs it."""

    KEY = "frac_reward_zero_std"

    def __init__(self, patience: int):
        self.patience = patience
        self.in_a_row = 0
        self.first_step: Optional[int] = None
        self.tripped_at: Optional[int] = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        value = (logs or {}).get(self.KEY)
        if value is None or self.patience <= 0:
            return control
        if value >= 1.0:
            self.in_a_row += 1
            self.first_step = state.global_step if self.in_a_row == 1 else self.first_step
            log.warning("step %d: every group of completions scored alike: no learning signal (%d/%d logged steps "
                        "in a row, train.no_signal_patience)", state.global_step, self.in_a_row, self.patience)
        else:
            self.in_a_row = 0
        if self.in_a_row >= self.patience and self.tripped_at is None:
            self.tripped_at = state.global_step
            control.should_training_stop = True
        return control


def no_signal_message(guard: StopOnNoSignal) -> str:
    return (f"no learning signal: from step {guard.first_step} to step {guard.tripped_at} every group of completions "
            f"got equal rewards ({guard.patience} logged steps in a row, train.no_signal_patience), so every "
            "advantage was 0. Change what the rewards can tell apart: a shaped reward (partial credit), an SFT start "
            "(model.adapter=SFT_RUN), more generations (train.num_generations) or a higher train.temperature; "
            "`tuneforge doctor` measures it before training.")


def interrupted_message(stopper: StopOnSignal, run_dir, checkpoint) -> str:
    name = signal.Signals(stopper.signum).name
    when = f"after step {stopper.step}" if stopper.step is not None else "as it ended"  # a signal after the last step
    return (f"{name}: training stopped {when}; checkpoint saved in {checkpoint}. "
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
    """`trainer.train()` with checkpoint resume, the signal and NaN guards, the loss watchdog and online RL's
    no-signal stop; raises Interrupted / Diverged / LossTooHigh / NoSignal."""
    from tuneforge.runs import checkpoints, manifest, redaction, rundir

    checkpoint = checkpoints.resolve_resume(train_cfg.resume_from_checkpoint, run_dir)
    main = trainer.is_world_process_zero()  # several processes: the main one writes the run directory
    if checkpoint:
        log.info("Resuming from %s", checkpoint)
    if checkpoint and main:
        manifest.write(run_dir, resumed=manifest.read(run_dir).get("resumed", []) + [
            {"from": checkpoint, "command": redaction.command_line(), "at": manifest.now()}])
        (Path(run_dir) / rundir.FAILED_FILE).unlink(missing_ok=True)  # the resumed run decides anew
        rundir.discard_unfinished_adapter(run_dir)
    if checkpoints.at_last_step(checkpoint, trainer.args.max_steps):
        return _restore_finished(trainer, checkpoint)
    stopper, guard = StopOnSignal(), StopOnNaN(train_cfg.nan_patience)
    watch = StopOnHighLoss(train_cfg.max_loss, train_cfg.max_loss_patience)
    trainer.add_callback(stopper)
    trainer.add_callback(guard)
    trainer.add_callback(watch)
    no_signal = StopOnNoSignal(train_cfg.no_signal_patience)
    trainer.add_callback(no_signal)
    from tuneforge.runs.console import training_output

    with stopper.installed(), training_output():
        result = trainer.train(resume_from_checkpoint=checkpoint)
    latest = checkpoints.latest_complete_checkpoint(run_dir)
    if guard.tripped_at is not None:
        if main:
            manifest.write(run_dir, status="diverged", stopped_at_step=guard.tripped_at)
        raise Diverged(diverged_message(guard, train_cfg.learning_rate, bf16, latest))
    if watch.tripped_at is not None:
        if main:
            manifest.write(run_dir, status="loss_too_high", stopped_at_step=watch.tripped_at)
        raise LossTooHigh(loss_too_high_message(watch, latest, run_dir))
    if no_signal.tripped_at is not None:
        if main:
            manifest.write(run_dir, status="no_signal", stopped_at_step=no_signal.tripped_at)
        raise NoSignal(no_signal_message(no_signal))
    if stopper.signum is not None:
        if main:
            manifest.write(run_dir, status="interrupted", stopped_at_step=stopper.step)
        raise Interrupted(interrupted_message(stopper, run_dir, latest), stopper.signum)
    if checkpoint:  # the Trainer averages only the steps of this session; report the whole run's mean
        result = result._replace(training_loss=whole_run_loss(trainer.state.log_history, result.training_loss))
    return result


def _restore_finished(trainer, checkpoint: str):
    """A checkpoint at the last step: its weights and state, no step trained (Trainer.train would train one more:
    "step 3/2"), so the run goes straight to saving and scoring and equals the uninterrupted one."""
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    log.info("%s is at the run's last step: nothing left to train, saving and scoring it.", checkpoint)
    # The Trainer's own loading of a checkpoint's weights (adapter or full model), as its resume does.
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    loss = whole_run_loss(trainer.state.log_history, float("nan"))
    return TrainOutput(trainer.state.global_step, loss, {"train_runtime": 0.0, "train_loss": loss})


def whole_run_loss(log_history: list[dict], fallback: float) -> float:
    """Mean training loss over every step, from the logged per-interval means (what an uninterrupted run's
    `training_loss` is)."""
    total, last = 0.0, 0
    for h in log_history:
        if "loss" in h and "step" in h and h["step"] > last:
            total, last = total + h["loss"] * (h["step"] - last), h["step"]
    return total / last if last else fallback
