"""Batch-time collators: pad or flatten what the data stage built. Labels are never computed here.

The loss masks (labels) are built at preparation time (`data/tokenize.py`), so that they survive
packing and are counted; the collators below only pad (right or left) or flatten (padding-free /
packed rows, with position ids restarting per sequence). TRL's `DataCollatorForLanguageModeling` does
the causal-LM work; transformers' `DataCollatorWithPadding` the classification padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from tuneforge.config.packing_modes import FLATTEN, ROWS, packing_mode
from tuneforge.config.schemas import CollatorConfig, PackingConfig
from tuneforge.data.tokenize import IGNORE


@dataclass
class CausalLMCollator(DataCollatorForLanguageModeling):
    """TRL's causal-LM collator, plus left padding and packed rows, which TRL lacks.

    - Left padding: rows carry explicit position ids (0 at each row's first real token), so a padded row
      computes exactly what it computes alone, also for models with absolute position embeddings.
    - `packed_rows` (bfd/wrapped rows with `seq_lengths`): one packed row per batch row, padded to the
      longest, with position ids restarting at every sequence start and NO attention mask. transformers
      builds a block-diagonal causal mask from restarting position ids only when no attention mask is
      given; pads (position 0 each) then form one-token blocks nobody attends to. Unlike TRL's padding-free
      layout (the whole batch flattened into one row), attention stays per row: on sdpa/eager, which
      compute the full masked square, that is (rows x max_length^2) instead of (rows x max_length)^2.
      The first label of every sequence is -100: it would be predicted from the previous sequence.
    """

    padding_side: str = "right"
    packed_rows: bool = False

    def __post_init__(self):
        if self.packed_rows or (self.padding_side == "left" and not self.padding_free):
            self.return_position_ids = True

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        if self.packed_rows and not self.padding_free:
            del batch["attention_mask"]
            batch["labels"][batch["position_ids"] == 0] = IGNORE
            return batch
        if self.padding_free or self.padding_side == "right":
            return batch
        width = batch["input_ids"].shape[1]
        shifts = [width - int(n) for n in batch["attention_mask"].sum(dim=1)]
        for key in ("input_ids", "labels", "attention_mask", "position_ids"):
            batch[key] = torch.stack([row.roll(s) for row, s in zip(batch[key], shifts)])
        return batch


def build_collator(cfg: CollatorConfig, packing: PackingConfig, tokenizer: PreTrainedTokenizerBase,
                   padding_side: str = "right") -> Callable:
    """The batch collator for `collator.name` and `packing.mode`.

    No packed batch carries an attention mask: transformers' sdpa/eager/flex attention isolate packed
    sequences by their restarting position ids only without one (with an all-ones mask they attend to
    each other). `padding_free` flattens each batch into one row (TRL's layout, best with varlen
    flash-attention kernels); `bfd`/`wrapped` keep one packed row per batch row (see CausalLMCollator).
    """
    if cfg.name == "padding":
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=cfg.pad_to_multiple_of)
    layout = packing_mode(packing.mode).batch
    return CausalLMCollator(
        pad_token_id=tokenizer.pad_token_id,
        padding_free=layout == FLATTEN,
        packed_rows=layout == ROWS,
        pad_to_multiple_of=cfg.pad_to_multiple_of,
        padding_side=padding_side,
    )


class TokenCounter:
    """Wraps a collator and counts, over every batch it builds, the real tokens, the tokens the model
    processes (padding included) and the tokens whose label enters the loss.

    The counts live in a shared-memory tensor with one row per dataloader worker (row 0: the main
    process), so they survive `dataloader_num_workers > 0` without locks.
    """

    def __init__(self, collate: Callable, num_workers: int = 0):
        self.collate = collate
        self.counts = torch.zeros(num_workers + 1, 3, dtype=torch.long).share_memory_()

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        info = torch.utils.data.get_worker_info()
        slot = 0 if info is None else 1 + info.id % (len(self.counts) - 1)
        real = sum(len(e["input_ids"]) for e in examples)
        labels = batch.get("labels")
        # A causal LM predicts token t+1 from t: label 0 of a row never enters the loss.
        trained = int((labels[..., 1:] != IGNORE).sum()) if labels is not None and labels.dim() == 2 else 0
        self.counts[slot] += torch.tensor([real, batch["input_ids"].numel(), trained])
        return batch

    def summary(self) -> dict[str, Any]:
        """padding_efficiency = real / processed tokens; trained_token_fraction = trained / real tokens."""
        real, processed, trained = (int(x) for x in self.counts.sum(dim=0))
        return {
            "real_tokens": real,
            "processed_tokens": processed,
            "trained_tokens": trained,
            "padding_efficiency": real / processed if processed else None,
            "trained_token_fraction": trained / real if real else None,
        }
