"""`task=classification`: sequence classification with transformers' Trainer (LoRA SEQ_CLS or full).

The BERT-style path of the tutorials: text + label columns, `num_labels` and label names from the
data, padding/truncation at tokenization, accuracy + macro-F1 evaluated every epoch, and the
majority-class baseline reported beside them so a score means something.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer

from tuneforge import library_args, runs
from tuneforge.callbacks import load as user_callbacks
from tuneforge.config import ConfigError, TuneforgeConfig
from tuneforge.data.sources import data_sources, load_source
from tuneforge.models.adapters import add_lora, enable_checkpointing, prepare_base
from tuneforge.models.loading import compute_dtype, fit_embeddings, resolve_path
from tuneforge.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def label_names(column: list) -> list[str]:
    """Sorted class names (integer labels keep their numeric order)."""
    values = sorted(set(column), key=lambda v: (isinstance(v, str), v))
    return [str(v) for v in values]


def classification_metrics(eval_pred) -> dict[str, float]:
    """Accuracy and macro-F1 (the mean of per-class F1 over the classes present in labels or predictions)."""
    logits, labels = eval_pred
    preds = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    f1s = []
    for c in np.union1d(labels, preds):
        tp = np.sum((preds == c) & (labels == c))
        precision = tp / max(np.sum(preds == c), 1)
        recall = tp / max(np.sum(labels == c), 1)
        f1s.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    return {"accuracy": float(np.mean(preds == labels)), "macro_f1": float(np.mean(f1s))}


def _encode(ds: Dataset, tokenizer, text_col: str, label_col: str, label2id: dict, max_length: int) -> Dataset:
    for col in (text_col, label_col):
        if col not in ds.column_names:
            raise ConfigError(f"task=classification needs column {col!r}; the data has {ds.column_names}. "
                              f"Set format.text_column / format.label_column or rename with data.columns.")
    unknown = sorted({str(v) for v in ds[label_col]} - set(label2id))
    if unknown:
        raise ConfigError(f"held-out labels {unknown} never occur in the training split.")

    def encode(batch):
        enc = tokenizer(batch[text_col], truncation=True, max_length=max_length)
        enc["labels"] = [label2id[str(v)] for v in batch[label_col]]
        return enc

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="Tokenizing")


def run(cfg: TuneforgeConfig, run_dir: Path, resolved_config: Any) -> dict:
    if cfg.dry_run:
        from tuneforge.train import print_dry_run

        print_dry_run(cfg)
        return {}
    from tuneforge.launch import process_state

    state = process_state()  # several processes: the main one writes the run directory
    if state.is_main_process:
        runs.claim_run_dir(run_dir, cfg.train.resume_from_checkpoint)
        runs.write_config(run_dir, resolved_config)
    runs.use_token(cfg.model)
    with state.main_process_first():
        path = resolve_path(cfg.model)
        tokenizer, tok_report = load_tokenizer(path, cfg.tokenizer, cfg.model.revision, cfg.model.trust_remote_code)
        splits = load_source(data_sources(cfg.data, cfg.format)[0], cfg.data)
    if len(splits["eval"]) == 0:
        raise ConfigError("task=classification needs held-out rows: set data.eval_fraction > 0 or data.eval_split.")
    fmt = cfg.format
    names = label_names(splits["train"][fmt.label_column])
    label2id = {n: i for i, n in enumerate(names)}
    train = _encode(splits["train"], tokenizer, fmt.text_column, fmt.label_column, label2id, cfg.train.max_length)
    held_out = _encode(splits["eval"], tokenizer, fmt.text_column, fmt.label_column, label2id, cfg.train.max_length)

    from transformers import set_seed

    from tuneforge.estimate import preflight

    if state.is_main_process and (warning := preflight(cfg)):
        log.warning("GPU memory: %s", warning)
    set_seed(cfg.train.seed)  # the new head (and LoRA) are drawn before the Trainer seeds
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(names), id2label=dict(enumerate(names)), label2id=label2id,
        dtype=compute_dtype(cfg.model.dtype), quantization_config=library_args.quantization_config(cfg.quant),
        revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code, use_safetensors=True,
    )
    fit_embeddings(model, tokenizer)  # decoder backbones: the fixed PAD id tells the head where rows end
    model = prepare_base(model, cfg.quant)

    t = cfg.train
    model = enable_checkpointing(model, t)
    model = add_lora(model, cfg.peft, task_type="SEQ_CLS")  # the new head is trained in full
    args = library_args.trainer_arguments(cfg, run_dir)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                      data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=cfg.collator.pad_to_multiple_of),
                      processing_class=tokenizer, compute_metrics=classification_metrics,
                      callbacks=user_callbacks(cfg.callbacks))
    from tuneforge import console

    console.attach(trainer)
    from tuneforge import faults
    from tuneforge.tokenizer import content_hash

    if state.is_main_process:
        runs.write_manifest(run_dir, seed=t.seed, tokenizer={"content_hash": content_hash(tokenizer)},
                            data={"fingerprint": train._fingerprint, "rows": {"train": len(train), "eval": len(held_out)}})
        runs.check_free_space(run_dir, runs.estimate_for(model, t))
    result = faults.train_guarded(trainer, t, run_dir, args.bf16)
    final = trainer.evaluate()
    if not runs.save_adapter(trainer, tokenizer, run_dir):
        return {}

    counts = Counter(held_out["labels"])
    majority = max(counts.values()) / len(held_out)
    metrics = {
        "task": "classification", "labels": names, "train_rows": len(train), "eval_rows": len(held_out),
        "train_loss": result.training_loss, "train_runtime_s": result.metrics.get("train_runtime"),
        "eval_accuracy": final["eval_accuracy"], "eval_macro_f1": final["eval_macro_f1"],
        "majority_baseline_accuracy": majority, "tokenizer": {"fixes": tok_report.fixes},
        "log_history": trainer.state.log_history, "world_size": trainer.args.world_size,
    }
    runs.write_json(run_dir / runs.METRICS_FILE, metrics)
    runs.plot_losses(trainer.state.log_history, run_dir / "loss.png")
    from tuneforge import model_card

    model_card.write(cfg, metrics, runs.read_manifest(run_dir).get("command", runs.command_line()), run_dir)
    runs.write_manifest(run_dir, status="finished", finished_at=runs._now())
    print(f"held-out accuracy {metrics['eval_accuracy']:.3f} (macro-F1 {metrics['eval_macro_f1']:.3f}) vs "
          f"majority-class baseline {majority:.3f} on {len(held_out)} rows")
    return metrics
