"""Load what a run saved: its config, its fixed tokenizer, the base model as trained, and the adapter."""

from __future__ import annotations

from pathlib import Path

from tuneforge.config.errors import ConfigError
from tuneforge.models.adapters import load_adapter
from tuneforge.models.loading import fit_embeddings, load_model, resolve_path
from tuneforge.runs import rundir
from tuneforge.runs.checkpoints import file_problem


def load_trained(run_dir: str | Path):
    """(model, tokenizer, config): the base loaded exactly as for training (same 4-bit settings), the
    tokenizer and chat template saved with the run, and the adapter on top."""
    from transformers import AutoTokenizer

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
    model = load_model(resolve_path(cfg.model), cfg.model, cfg.quant)
    fit_embeddings(model, tokenizer)
    if cfg.peft.method != "none":
        model = load_adapter(model, str(adapter_dir))
    return model, tokenizer, cfg
