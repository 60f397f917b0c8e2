"""The data stage: raw rows -> formatted messages -> tokens + labels, with everything counted."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from tuneforge.config import ConfigError, DataConfig, FormatConfig, TrainConfig
from tuneforge.data.formats import BadRow, formatter, required_columns
from tuneforge.data.sources import load_raw
from tuneforge.data.tokenize import IGNORE, TemplateError, tokenize_conversations
from tuneforge.tokenizer import stop_token_ids

log = logging.getLogger(__name__)


@dataclass
class DataStats:
    rows_in: int = 0
    rows_kept: int = 0
    bad_rows: dict[str, int] = field(default_factory=dict)
    bad_row_examples: list[int] = field(default_factory=list)
    truncated: int = 0
    fully_masked: int = 0
    tokens: int = 0
    trained_tokens: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PreparedData:
    train: Dataset  # input_ids, labels
    eval: Dataset  # input_ids, labels, messages (for generation scoring)
    stats: dict[str, DataStats]


def prepare(data_cfg: DataConfig, format_cfg: FormatConfig, train_cfg: TrainConfig,
            tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    raw = load_raw(data_cfg)
    needed = required_columns(format_cfg)
    missing = [c for c in needed if c not in raw["train"].column_names]
    if missing:
        have = raw["train"].column_names
        hint = ", ".join(f"+data.columns.{h}={m}" for m, h in zip(missing, have)) if have else ""
        raise ConfigError(
            f"format.strategy={format_cfg.strategy} needs column(s) {missing}; the data has {have}. "
            f"Rename with data.columns (e.g. {hint}) or point format.*_column at existing columns."
        )
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
    stats = {}
    out = {}
    for split, ds in raw.items():
        st = DataStats(rows_in=len(ds))
        formatted = _format(ds, format_cfg, data_cfg.on_bad_row, st, split)
        if split == "train" and len(formatted) == 0:
            raise ConfigError(f"No usable training rows left after dropping {st.bad_rows}; check the data and format.")
        tok = formatted.map(
            tokenize_conversations,
            batched=True,
            num_proc=data_cfg.num_proc,
            fn_kwargs={"tokenizer": tokenizer, "stop_strings": stops, "max_length": train_cfg.max_length,
                       "truncation_mode": train_cfg.truncation_mode},
            remove_columns=[c for c in formatted.column_names if c != "messages"],
            desc=f"Tokenizing {split}",
        )
        trained = [sum(1 for x in labels if x != IGNORE) for labels in tok["labels"]]
        st.truncated = sum(tok["truncated"])
        st.tokens = sum(tok["num_tokens"])
        st.trained_tokens = sum(trained)
        keep = [i for i, n in enumerate(trained) if n > 0]
        st.fully_masked = len(tok) - len(keep)
        tok = tok.select(keep) if st.fully_masked else tok
        st.rows_kept = len(tok)
        stats[split] = st
        columns = ["input_ids", "labels"] + (["messages"] if split == "eval" else [])
        out[split] = tok.select_columns(columns)
        _report(split, st)
    return PreparedData(train=out["train"], eval=out["eval"], stats=stats)


def _format(ds: Dataset, cfg: FormatConfig, on_bad_row: str, st: DataStats, split: str) -> Dataset:
    fmt = formatter(cfg)
    messages, reasons, bad_idx = [], Counter(), []
    for i, row in enumerate(ds):
        try:
            messages.append(fmt(row))
        except (BadRow, TemplateError) as exc:
            if on_bad_row == "error":
                raise ConfigError(f"{split} row {i} is malformed: {exc} (data.on_bad_row=error).") from exc
            reasons[str(exc)] += 1
            bad_idx.append(i)
    st.bad_rows = dict(reasons)
    st.bad_row_examples = bad_idx[:5]
    return Dataset.from_dict({"messages": messages})


def _report(split: str, st: DataStats) -> None:
    log.info("%s: %d rows in, %d kept, %d tokens (%d trained), %d truncated, %d fully masked",
             split, st.rows_in, st.rows_kept, st.tokens, st.trained_tokens, st.truncated, st.fully_masked)
    if st.bad_rows:
        log.warning("%s: dropped %d malformed rows (%s); first: %s", split, sum(st.bad_rows.values()),
                    "; ".join(f"{n}x {why}" for why, n in st.bad_rows.items()), st.bad_row_examples)
