"""Packing: several tokenized sequences per training row, without letting them attend to each other.

The modes are the records of config/packing_modes.py: each declares how it packs the prepared rows (a packer
here) and what the collator does with a batch of them. `packing.mode=auto` is decided per device
(config/device.auto_packing_mode).

Every mode whose sequences share a forward row feeds the model batches without an attention mask and with
position ids restarting per sequence (see `collators.build_collator`); the loss masks (labels) travel with
the tokens, so completion-only masking survives packing.
`check_no_contamination` is the start-up probe that fails a run whose model lets packed sequences see
each other (an attention implementation or a model that ignores position ids, a KV cache left on).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import asdict, dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Callable

from tuneforge.config.errors import ConfigError
from tuneforge.config.packing_modes import packing_mode
from tuneforge.config.schemas import PackingConfig

if TYPE_CHECKING:
    import torch
    from datasets import Dataset

log = logging.getLogger(__name__)

PACKED_COLUMNS = ["input_ids", "labels"]


def bfd(ds: Dataset, max_length: int) -> Dataset:
    """packing.mode=bfd: best-fit-decreasing bins (TRL's pack_dataset)."""
    from trl.data_utils import pack_dataset

    return pack_dataset(ds, max_length, strategy="bfd")


def wrapped(ds: Dataset, max_length: int) -> Dataset:
    """packing.mode=wrapped: concatenated and cut at max_length, sequence boundaries kept."""
    return ds.map(_wrap, batched=True, fn_kwargs={"max_length": max_length})


class ContaminationError(ConfigError):
    """Packed sequences attend to each other (the packed loss differs from the unpacked one), or the packed or
    unpacked forward is not finite: a setting to change (packing, attention implementation), exit 2."""


@dataclass
class PackingStats:
    mode: str
    rows_in: int
    rows_out: int
    tokens: int
    # Real tokens / (rows_out * max_length): how full the packed rows are (None when rows are not packed).
    fill: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def _wrap(batch: dict[str, list], max_length: int) -> dict[str, list]:
    """Concatenate a batch of sequences and cut it into rows of max_length, recording in `seq_lengths` the
    pieces of the original sequences each row holds (a sequence cut in two restarts at position 0)."""
    flat = {k: [x for seq in batch[k] for x in seq] for k in PACKED_COLUMNS}
    bounds = set(accumulate(len(s) for s in batch["input_ids"]))
    total = len(flat["input_ids"])
    out: dict[str, list] = {k: [] for k in PACKED_COLUMNS + ["seq_lengths"]}
    for start in range(0, total, max_length):
        end = min(start + max_length, total)
        cuts = [start] + sorted(b for b in bounds if start < b < end) + [end]
        for k in PACKED_COLUMNS:
            out[k].append(flat[k][start:end])
        out["seq_lengths"].append([b - a for a, b in zip(cuts, cuts[1:])])
    return out


def pack(ds: Dataset, cfg: PackingConfig, max_length: int) -> tuple[Dataset, PackingStats]:
    """The training rows for `packing.mode` (input_ids, labels and, when packed, seq_lengths)."""
    mode = packing_mode(cfg.mode)
    tokens = sum(len(ids) for ids in ds["input_ids"])
    if mode.pack_rows is None:
        return ds, PackingStats(mode.name, len(ds), len(ds), tokens, None)
    ds = ds.select_columns(PACKED_COLUMNS)
    module, _, name = mode.pack_rows.partition(":")
    packed = getattr(importlib.import_module(module), name)(ds, max_length)
    stats = PackingStats(mode.name, len(ds), len(packed), tokens, tokens / (len(packed) * max_length))
    log.info("packing=%s: %d sequences -> %d rows of <= %d tokens (%.1f%% full)",
             mode.name, stats.rows_in, stats.rows_out, max_length, 100 * stats.fill)
    return packed, stats


def _sequence_losses(model, batch: dict[str, Any], lengths: list[int]) -> torch.Tensor:
    """Mean next-token loss of each sequence of a (possibly flattened) batch, as training computes it:
    no KV cache (SFTTrainer passes use_cache=False), every key the collator produced."""
    import torch

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits.float()
    losses, offset = [], 0
    flat = logits.shape[0] == 1 and len(lengths) > 1
    for i, n in enumerate(lengths):
        if flat:
            seq_logits, seq_ids = logits[0, offset:offset + n], batch["input_ids"][0, offset:offset + n]
            offset += n
        else:
            seq_logits, seq_ids = logits[i, :n], batch["input_ids"][i, :n]
        nll = torch.nn.functional.cross_entropy(seq_logits[:-1], seq_ids[1:].to(seq_logits.device))
        losses.append(nll)
    return torch.stack(losses)


def check_no_contamination(model, collate: Callable, rows: list[list[int]], tolerance: float = 1e-2) -> float:
    """Start-up probe: forward `rows` packed into one row (collated by the run's collator) and each alone;
    raise ContaminationError when a sequence's packed loss differs from its unpacked loss by more than `tolerance` (relative). Clean packing agrees to ~1e-7 in fp32 and ~1e-3 in bf16/4-bit; a
    sequence that attends to its neighbour is off by ~1e-1. Returns the largest relative difference."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            to = lambda b: {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}  # noqa: E731
            lengths = [len(r) for r in rows]
            row = {"input_ids": [t for r in rows for t in r], "seq_lengths": lengths}  # one packed row
            packed = _sequence_losses(model, to(collate([row])), lengths)
            alone = torch.cat([_sequence_losses(model, to(collate([{"input_ids": r}])), [len(r)]) for r in rows])
    finally:
        model.train(was_training)
    for name, losses in (("packed", packed), ("unpacked", alone)):
        if not bool(torch.isfinite(losses).all()):
            raise ContaminationError(
                f"Packing probe: the {name} forward gave a non-finite loss ({losses.tolist()}) on {len(rows)} probe "
                "sequences, so packing cannot be shown to keep them apart. The attention implementation or the "
                "model is broken for these batches: set packing=none, or model.attn_implementation=sdpa (or eager).")
    error = float(((packed - alone).abs() / alone.abs()).max())
    if not error <= tolerance:  # written so that a NaN fails too
        raise ContaminationError(
            f"Packed sequences attend to each other: packed vs unpacked loss differ by {error:.2e} (relative) "
            f"on {len(rows)} probe sequences. The model's attention implementation ignores the restarting "
            "position ids of packed batches; set packing=none, or model.attn_implementation=sdpa (or eager)."
        )
    log.info("packing probe: packed vs unpacked loss agree to %.1e (relative)", error)
    return error


def probe_rows(ds: Dataset, n: int = 2, scan: int = 16, min_tokens: int = 4) -> list[list[int]]:
    """The `n` shortest sequences (of at least `min_tokens`) among the first `scan` rows: cheap probe input."""
    ids = [list(r) for r in ds.select(range(min(scan, len(ds))))["input_ids"] if len(r) >= min_tokens]
    return sorted(ids, key=len)[:n]
