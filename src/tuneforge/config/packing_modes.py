"""The packing modes (`packing.mode`): one record each, read by validation, the device defaults, the collator,
the data stage (data/packing.py packs with the record's `pack_rows`) and the trainer's contamination probe, so a
mode added here is known everywhere (and a name not here is refused by validation).

Every mode whose sequences share a forward row feeds the model batches without an attention mask and with
position ids restarting per sequence (data/collators.py); the loss masks (labels) travel with the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tuneforge.config.errors import ConfigError

# What the collator does with a batch: PAD each sequence to the longest (one sequence per row), FLATTEN the
# batch into one row (no padding), or keep one packed ROW per batch row (its `seq_lengths` restart positions).
PAD, FLATTEN, ROWS = "pad", "flatten", "rows"


@dataclass(frozen=True)
class PackingMode:
    name: str
    doc: str
    # How the prepared rows are packed: module:function, (rows, max_length) -> rows with `seq_lengths`; None leaves
    # them as they are.
    pack_rows: Optional[str]
    batch: str  # PAD | FLATTEN | ROWS

    @property
    def shares_rows(self) -> bool:
        """Sequences share a forward row: no attention mask, restarting position ids, the contamination probe,
        causal-LM labels only, an attention implementation that honours the position ids."""
        return self.batch != PAD


# To add a packing mode: add it here (its packer in data/packing.py), and conf/packing/NAME.yaml so that
# `packing=NAME` selects it.
MODES: dict[str, PackingMode] = {m.name: m for m in (
    PackingMode("none", "one sequence per row, padded per batch", None, PAD),
    PackingMode("padding_free", "rows unchanged; the collator flattens each batch into one row (no padding)",
                None, FLATTEN),
    PackingMode("bfd", "best-fit-decreasing bins of train.max_length tokens (TRL pack_dataset), seq_lengths per "
                "row", "tuneforge.data.packing:bfd", ROWS),
    PackingMode("wrapped", "concatenate and cut into rows of exactly train.max_length; TRL's wrapped mode drops the "
                "sequence boundaries, ours keeps them in seq_lengths so position ids restart at each sequence",
                "tuneforge.data.packing:wrapped", ROWS),
)}
AUTO = "auto"  # decided for the device the job runs on (config/device.auto_packing_mode)
CHOICES = (AUTO, *MODES)


def packing_mode(name: str) -> PackingMode:
    """The registered mode `name` (validation refuses any other before a run starts)."""
    if name not in MODES:
        raise ConfigError(f"packing.mode={name} is not a packing mode; choose one of {', '.join(MODES)} (or auto).")
    return MODES[name]
