"""`task=classification`: sequence classification with transformers' Trainer (LoRA SEQ_CLS or full).

The BERT-style path of the tutorials: text + label columns, `num_labels` and label names from the
data, padding/truncation at tokenization, accuracy + macro-F1 evaluated every epoch, and the
majority-class baseline reported beside them so a score means something.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
from datasets import Dataset
from transformers import DataCollatorWithPadding, Trainer

from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import TuneforgeConfig
from tuneforge.data.sources import data_sources, load_source
from tuneforge.models.adapters import add_lora
from tuneforge.models.tokenizer import content_hash
from tuneforge.tasks.stages import load_base, prepare_tokenizer

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


class Classification:
    """The classification stages (tasks/stages.Stages)."""

    def __init__(self, cfg: TuneforgeConfig, run_dir: Path, main: bool):
        self.cfg, self.run_dir, self.main = cfg, run_dir, main
        self.initial_adapter = self.resized_vocab = None

    def prepare(self) -> dict:
        cfg, fmt = self.cfg, self.cfg.format
        self.path, self.tokenizer, self.tok_report = prepare_tokenizer(cfg)
        # format.* strategies do not apply: classification reads format.text_column / label_column.
        splits = load_source(data_sources(cfg.data, cfg.format)[0], cfg.data, check_format=False)
        if len(splits["eval"]) == 0:
            raise ConfigError("task=classification needs held-out rows: set data.eval_fraction > 0 or "
                              "data.eval_split.")
        self.names = label_names(splits["train"][fmt.label_column])
        self.label2id = {n: i for i, n in enumerate(self.names)}
        self.train = _encode(splits["train"], self.tokenizer, fmt.text_column, fmt.label_column, self.label2id,
                             cfg.train.max_length)
        self.held_out = _encode(splits["eval"], self.tokenizer, fmt.text_column, fmt.label_column, self.label2id,
                                cfg.train.max_length)
        return {"tokenizer": {"content_hash": content_hash(self.tokenizer)},
                "data": {"fingerprint": self.train._fingerprint,
                         "rows": {"train": len(self.train), "eval": len(self.held_out)}}}

    def check(self) -> None:
        """Nothing beyond the label checks of prepare(): the doctor's checks are about chat rows and masks."""

    def build_model(self):
        names = self.names
        # Decoder backbones: the fixed PAD id (fit to the tokenizer) tells the head where rows end.
        base = load_base(self.cfg, self.path, self.tokenizer, num_labels=len(names), id2label=dict(enumerate(names)),
                         label2id=self.label2id)
        self.resized_vocab = base.resized_vocab
        return add_lora(base.model, self.cfg.peft, task_type="SEQ_CLS")  # the new head is trained in full

    def baseline(self, model) -> float:
        """The majority-class accuracy on the held-out rows: what a score must beat to mean something."""
        counts = Counter(self.held_out["labels"])
        return max(counts.values()) / len(self.held_out)

    def build_trainer(self, model, args, callbacks: list) -> Trainer:
        collator = DataCollatorWithPadding(self.tokenizer, pad_to_multiple_of=self.cfg.collator.pad_to_multiple_of)
        return Trainer(model=model, args=args, train_dataset=self.train, eval_dataset=self.held_out,
                       data_collator=collator, processing_class=self.tokenizer,
                       compute_metrics=classification_metrics, callbacks=callbacks)

    def evaluate(self, model, trainer) -> dict:
        return trainer.evaluate()  # every rank: the evaluation loop gathers across processes

    def metrics(self, result, trainer, majority: float, final: dict) -> dict:
        return {
            "task": "classification", "labels": self.names, "train_rows": len(self.train),
            "eval_rows": len(self.held_out), "train_loss": result.training_loss,
            "train_runtime_s": result.metrics.get("train_runtime"), "eval_accuracy": final["eval_accuracy"],
            "eval_macro_f1": final["eval_macro_f1"], "majority_baseline_accuracy": majority,
            "tokenizer": {"fixes": self.tok_report.fixes}, "log_history": trainer.state.log_history,
        }

    def report(self, majority: float, final: dict, metrics: dict) -> None:
        print(f"held-out accuracy {metrics['eval_accuracy']:.3f} (macro-F1 {metrics['eval_macro_f1']:.3f}) vs "
              f"majority-class baseline {majority:.3f} on {len(self.held_out)} rows")
