"""Load what a run saved: its config, its fixed tokenizer, the base model as trained, and the adapter."""

from __future__ import annotations

from pathlib import Path

from tuneforge.config.errors import ConfigError
from tuneforge.models.adapters import load_adapter
from tuneforge.models.loading import fit_embeddings, load_model, resolve_path
from tuneforge.runs import rundir
from tuneforge.runs.checkpoints import file_problem


def load_trained(run_dir: str | Path, quant=None):
    """(model, tokenizer, config): the base loaded exactly as for training (same 4-bit settings, or `quant`), with
    the task's head (a reward model's one-output score head), the tokenizer and chat template saved with the run,
    and the adapter on top."""
    from transformers import AutoTokenizer

    from tuneforge.config.tasks import task

    run_dir = Path(run_dir)
    cfg = rundir.run_config(run_dir)
    adapter_dir = run_dir / rundir.ADAPTER_DIR
    if not adapter_dir.is_dir():
        raise ConfigError(f"{run_dir} has no {rundir.ADAPTER_DIR}/ (did training finish?).")
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        if cfg.peft.method == "none" and name.startswith("adapter_"):
            continue
        if problem := file_problem(adapter_dir / name):
            raise ConfigError(f"{problem}: the run's saved adapter is damaged; where its checkpoints remain, remove "
                              f"{adapter_dir} and {rundir.METRICS_FILE} and resume the run "
                              "(train.resume_from_checkpoint=auto), else train it again.")
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    spec = task(cfg.task)
    # A head of a fixed size (a reward model's one score); a classification run's labels are not read back here.
    head = {"head": spec.head, "num_labels": spec.num_labels} if spec.num_labels else {}
    # A full fine-tune (peft=none) saved the whole model where an adapter would be.
    weights = str(adapter_dir) if cfg.peft.method == "none" else resolve_path(cfg.model)
    model = load_model(weights, cfg.model, quant or cfg.quant, **head)
    fit_embeddings(model, tokenizer)
    if cfg.peft.method != "none":
        model = load_adapter(model, str(adapter_dir))
    return model, tokenizer, cfg
