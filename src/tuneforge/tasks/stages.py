"""The stage contract every task implements (`Stages`), and what SFT, DPO/KTO and classification share: the
tokenizer, the model-building chain (load -> fit embeddings -> prepare the base -> checkpointing -> adapter), the
metrics of a training run and the before/after table of held-out generations.

tasks/lifecycle.run builds a task's stages as `Stages(cfg, run_dir, main)` and calls them in the order the
Protocol lists them; the task table (config/tasks.py) names each task's class.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import TuneforgeConfig
from tuneforge.config.tasks import task
from tuneforge.eval.metrics import adapter_off, print_comparison
from tuneforge.models.adapters import add_lora, enable_checkpointing, keep_input_dtype_under_autocast, prepare_base
from tuneforge.models.loading import fit_embeddings, load_model, resolve_path
from tuneforge.models.tokenizer import TokenizerReport, content_hash, load_tokenizer, new_token_ids
from tuneforge.runs import rundir
from tuneforge.tasks import doctor

log = logging.getLogger(__name__)


class Stages(Protocol):
    """One task's stages, in the order the lifecycle calls them."""

    # Set by prepare(): the fixed tokenizer, saved with the adapter.
    tokenizer: Any
    # Set by build_model(): PiSSA/OLoRA's initial adapter (converted against it when saving), else None.
    initial_adapter: Optional[Any]
    # Set by build_model(): the embedding rows after a resize (the model card says so), else None.
    resized_vocab: Optional[int]

    def __init__(self, cfg: TuneforgeConfig, run_dir: Path, main: bool) -> None: ...

    def prepare(self) -> dict:
        """Tokenizer + data, on the main process first (caches are built once); returns the manifest fields that
        identify the inputs."""

    def check(self) -> None:
        """The checks before any weights load (the doctor), on every rank."""

    def build_model(self) -> Any:
        """The model with its adapter, seeded."""

    def baseline(self, model) -> Any:
        """Scores before training (None when the task has none)."""

    def build_trainer(self, model, args, callbacks: list) -> Any:
        """The library trainer over the prepared rows."""

    def evaluate(self, model, trainer) -> Any:
        """Scores after training and saving, on every rank (sharded models evaluate together)."""

    def metrics(self, result, trainer, baseline, evaluation) -> dict:
        """metrics.json (main process only, from here on)."""

    def report(self, baseline, evaluation, metrics: dict) -> None:
        """Predictions and the console table."""


def stages_class(name: str) -> type[Stages]:
    """The class of task `name` (config/tasks.py names it as module:Class)."""
    module, _, attr = task(name).stages.partition(":")
    return getattr(importlib.import_module(module), attr)


# --- shared by the tasks ---------------------------------------------------------------------------------------

REFERENCE_ADAPTER = "ref"  # TRL's name for the frozen copy of a pretrained adapter


def prepare_start(cfg: TuneforgeConfig) -> tuple[Optional[Path], str, Any, TokenizerReport]:
    """(SFT adapter or None, model path, tokenizer, report) of a task that may start from an SFT run
    (`model.adapter`): an SFT start keeps the SFT run's tokenizer (its fixes and chat template), so its prompts
    render as they trained."""
    sft_adapter = sft_adapter_dir(cfg) if cfg.model.adapter else None
    source = str(sft_adapter) if sft_adapter else None
    tokenizer_cfg = type(cfg.tokenizer)(chat_template="keep") if sft_adapter else None
    return (sft_adapter, *prepare_tokenizer(cfg, source, tokenizer_cfg))


def sft_adapter_dir(cfg: TuneforgeConfig) -> Path:
    """model.adapter: an SFT run directory or its adapter/ directory; refused unless it holds a LoRA adapter
    trained on this config's base model."""
    from tuneforge.runs.rundir import run_config

    path = Path(cfg.model.adapter).expanduser()
    adapter = path / rundir.ADAPTER_DIR if (path / rundir.ADAPTER_DIR).is_dir() else path
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"model.adapter={cfg.model.adapter}: no LoRA adapter there (expected an SFT run directory "
                          f"with {rundir.ADAPTER_DIR}/adapter_config.json).")
    run_dir = adapter.parent
    if (run_dir / rundir.CONFIG_FILE).is_file():
        trained = run_config(run_dir)
        if trained.model.name_or_path != cfg.model.name_or_path:
            raise ConfigError(f"model.adapter={cfg.model.adapter} was trained on {trained.model.name_or_path}, but "
                              f"this run loads {cfg.model.name_or_path}: set model.name_or_path="
                              f"{trained.model.name_or_path}.")
    return adapter


def prepare_tokenizer(cfg: TuneforgeConfig, source: Optional[str] = None,
                      tokenizer_cfg: Any = None) -> tuple[str, Any, TokenizerReport]:
    """(model path, fixed tokenizer, report): the base model's tokenizer with `tokenizer.*` fixes, or the
    tokenizer saved at `source` (an SFT run's adapter) with `tokenizer_cfg`."""
    model_path = resolve_path(cfg.model)
    tokenizer, report = load_tokenizer(source or model_path, tokenizer_cfg or cfg.tokenizer, cfg.model.revision,
                                       cfg.model.trust_remote_code)
    return model_path, tokenizer, report


@dataclass
class LoadedBase:
    """The base model as training starts from it, before the adapter."""

    model: Any
    load_seconds: float
    # Embedding rows after a resize for new tokens, else None.
    resized_vocab: Optional[int]


def load_base(cfg: TuneforgeConfig, model_path: str, tokenizer, **head_kwargs) -> LoadedBase:
    """The model-building chain every task shares, up to the adapter: load (4-bit as `quant.*` says, with the
    task's head) -> fit embeddings to the tokenizer -> prepare the base (kbit) -> activation checkpointing."""
    start = time.perf_counter()
    model = load_model(model_path, cfg.model, cfg.quant, head=task(cfg.task).head, **head_kwargs)
    seconds = time.perf_counter() - start
    resized = model.get_input_embeddings().weight.shape[0] if fit_embeddings(model, tokenizer) else None
    model = prepare_base(model, cfg.quant)
    model = enable_checkpointing(model, cfg.train)
    return LoadedBase(model, seconds, resized)


def run_doctor(stage) -> None:
    """The doctor's checks before training (tasks/doctor.py), where doctor.enabled: every task runs them at the same
    point, on its prepared data; the main process writes doctor.json."""
    cfg = stage.cfg
    if cfg.doctor.enabled:
        doctor.before_training(cfg, stage.tokenizer, stage.tok_report, stage.model_path, stage.data,
                               stage.run_dir if stage.main else None)


def build_policy(stage):
    """The trainable policy of a task that may start from an SFT run (preference tuning, online RL): a fresh LoRA
    adapter on the base, or a trainable copy of the SFT run's adapter (TRL keeps a frozen copy as the reference)."""
    from peft import PeftModel

    cfg = stage.cfg
    base = load_base(cfg, stage.model_path, stage.tokenizer)
    stage.load_seconds, stage.resized_vocab = base.load_seconds, base.resized_vocab
    if stage.sft_adapter:
        log.info("Starting from the SFT adapter in %s (the reference: a frozen copy of it)", stage.sft_adapter)
        return keep_input_dtype_under_autocast(PeftModel.from_pretrained(base.model, str(stage.sft_adapter),
                                                                         is_trainable=True))
    return add_lora(base.model, cfg.peft, new_token_ids(stage.tokenizer, stage.tok_report),
                    weights_path=stage.model_path)


def starting_policy(model, sft_adapter: Optional[Path]):
    """The policy training starts from: the base for a fresh adapter (adapter off: exactly the reference), the SFT
    policy for an SFT start."""
    return adapter_off(model) if not sft_adapter else contextlib.nullcontext()


def training_metrics(result, trainer, data, tok_report: TokenizerReport, tokenizer) -> dict:
    """The metrics every causal-LM task records: losses, runtime, steps, tokens, data and tokenizer statistics,
    the log history and the best checkpoint."""
    runtime = result.metrics.get("train_runtime", 0.0)
    tokens = trainer.state.num_input_tokens_seen
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "train_runtime_s": runtime,
        "train_steps": trainer.state.global_step,
        "tokens_seen": tokens,
        "tokens_per_second": tokens / runtime if runtime else None,
        "data": {split: st.as_dict() for split, st in data.stats.items()},
        "tokenizer": {"fixes": tok_report.fixes, "added_tokens": tok_report.added_tokens,
                      "content_hash": content_hash(tokenizer)},
        "log_history": trainer.state.log_history,
        # Set when train.load_best_model_at_end kept the best evaluation's weights (saved as the adapter).
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
        "best_metric": trainer.state.best_metric,
    }


def generation_metrics(before, after) -> dict:
    """The before/after scores of held-out generations (eval/metrics.GenerationEval), for metrics.json."""
    if before is None or after is None:
        return {}
    return {"eval_before": before.scores, "eval_after": after.scores, "eval_samples": len(after.predictions)}


def report_generations(run_dir: Path, before, after, title: str) -> None:
    """predictions_before.jsonl, predictions.jsonl and the before/after table of held-out generations."""
    rundir.write_predictions(run_dir / "predictions_before.jsonl", before.predictions)
    rundir.write_predictions(run_dir / "predictions.jsonl", after.predictions)
    print_comparison({"before": before.scores, "after": after.scores}, title)
