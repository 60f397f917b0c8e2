"""What a run prints: one line per logged step above a progress bar, and no library noise the user can do
nothing about. Every command calls `silence_library_noise` before it imports the libraries; every task's
trainer goes through `attach`.

transformers is imported inside the functions: importing it pulls in bitsandbytes, whose import-time log
line the filters below must already be in place for, and costs seconds a config error should not pay."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)  # tuneforge.runs.console: the step lines of every task

# (category, message regex) of warnings raised inside libraries on every run, that no setting of the user's
# changes; each filter is this narrow so that a new warning still shows.
LIBRARY_WARNINGS = [
    # PEFT reads transformers' deprecated `is_gradient_checkpointing` (peft_model.py) in every get_peft_model.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # TRL's TRLExperimentalWarning (a UserWarning) on importing trl.experimental (task=orpo's trainer): tuneforge says
    # it once, in its own words, when the task starts (tasks/preference.orpo) and in the README.
    (UserWarning, r"You are importing from 'trl\.experimental'"),
]
# (logger, message prefix) of library log records of the same kind.
LIBRARY_LOGS = [
    # bitsandbytes, imported on a CPU with AVX512-BF16, tries to fetch an inference kernel from the hub;
    # tuneforge never uses that kernel (models/loading.keep_cpu_4bit_trainable keeps the trainable layout).
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    # matplotlib's first use on a machine builds its font cache and says so at INFO, which a run's log level
    # shows (loss.png needs matplotlib).
    ("matplotlib.font_manager", "generated new fontManager"),
    # transformers' dequantize() on every `tuneforge merge` (merge.base=dequantized), which says so itself.
    ("transformers.integrations.bitsandbytes", "The modules are dequantized in"),
    # ggml's GGUFWriter on every `tuneforge export` to GGUF: its byte order, and a header before the file it writes.
    ("gguf.gguf_writer", "gguf: This GGUF file is for"),
    ("gguf.gguf_writer", "Writing the following files"),
]


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_library_noise() -> None:
    """Install the narrow filters above (idempotent)."""
    for category, message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefix in LIBRARY_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))


# Online RL's logged step (TRL's GRPOTrainer/RLOOTrainer log ~30 keys): what shows progress, in this order.
_RL_KEYS = (("frac_reward_zero_std", "no-signal"), ("kl", "kl"), ("completions/mean_length", "length"),
            ("completions/clipped_ratio", "clipped"), ("loss", "loss"), ("learning_rate", "lr"))
# Said once, before the first online-RL line: the loss column confuses everyone.
RL_LOSS_NOTE = ("online RL: the loss is ~0 by construction (advantages are rewards minus their group's mean): watch "
                "the reward; no-signal = share of prompt groups whose completions all scored alike (they teach "
                "nothing)")


def _rl_line(logs: dict) -> str:
    parts = [f"reward {logs['reward']:.3f}±{logs.get('reward_std', float('nan')):.3f}"]
    per = sorted(k[len("rewards/"):-len("/mean")] for k in logs if k.startswith("rewards/") and k.endswith("/mean"))
    if len(per) > 1:
        parts[0] += " (" + ", ".join(f"{n} {logs[f'rewards/{n}/mean']:.3f}±{logs.get(f'rewards/{n}/std', float('nan')):.3f}"
                                     for n in per) + ")"
    parts += [f"{label} {logs[key]:.4g}" for key, label in _RL_KEYS if isinstance(logs.get(key), (int, float))]
    return ", ".join(parts)


def step_line(step: int, max_steps: int, logs: dict) -> str:
    """`step 5/30: loss 0.6669, grad_norm 0.9922, ...`, and the Trainer's end-of-training summary as
    `trained 30 steps: train_loss 0.1967, ...` (total_flos, a Trainer internal, left out). An online-RL step (its
    logs carry `reward`) shows the reward first and only what tells progress (metrics.json keeps every key)."""
    if "reward" in logs and "train_runtime" not in logs:
        return f"step {step}/{max_steps}: {_rl_line(logs)}"
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in logs.items() if k != "total_flos")
    if "train_runtime" in logs and "train_loss" in logs:
        return f"trained {step} steps: {shown}"
    return f"step {step}/{max_steps}: {shown}"


def attach(trainer) -> None:
    """One log line per logged step (terminal and RUN/train.log), and the Trainer's printing callbacks replaced
    by a progress bar that prints no dicts."""
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback

    class StepLog(TrainerCallback):
        explained = False

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                if "reward" in logs and not self.explained:
                    log.info("%s", RL_LOSS_NOTE)
                    self.explained = True
                log.info("%s", step_line(state.global_step, state.max_steps, logs))

    class ProgressBar(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # StepLog writes the line
            return control

    had_bar = any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if had_bar:
        trainer.add_callback(ProgressBar())
    trainer.add_callback(StepLog())


@contextmanager
def training_output() -> Iterator[None]:
    """While the progress bar is drawn, console log lines go through tqdm.write: each prints above the bar
    instead of being glued to its end (the log file is untouched)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(loggers=[logging.getLogger()]):
        yield


# Rows a data set must have before preparing it shows a progress bar: below this the map takes seconds and
# the stage's own line (the data report) says what happened; above it the bar shows the work is moving.
LONG_WORK_ROWS = 50_000


@contextmanager
def without_bars(datasets_bars: bool = True, transformers_bars: bool = True) -> Iterator[None]:
    """Short library work shows as tuneforge's one line per stage, not a progress bar that flashes by between its
    lines: datasets' "Generating train split" (reading a local file) and "Preparing ..." (a small map), and
    transformers' "Loading weights" (weights already on disk). Downloads (huggingface_hub's own bars), the
    embedded model's conversion and training keep theirs. The previous switches are restored."""
    import datasets
    from transformers.utils import logging as hf_logging

    ds_was, hf_was = not datasets.are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    try:
        if datasets_bars:
            datasets.disable_progress_bars()
        if transformers_bars:
            hf_logging.disable_progress_bar()
        yield
    finally:
        if datasets_bars and ds_was:
            datasets.enable_progress_bars()
        if transformers_bars and hf_was:
            hf_logging.enable_progress_bar()

