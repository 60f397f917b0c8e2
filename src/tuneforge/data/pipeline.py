"""The data stage: sources -> (mix) -> format -> render -> tokenize + labels, counted and cached by content.

One batched `datasets.map` per source and split does format, render and tokenize together, so rows
cross the Arrow boundary once. Every row reaches the tokenizer as text + trained character spans:
chat rows are rendered with the chat template first (render.py), plain-text strategies carry their
spans by construction (formats.py).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, DatasetDict, Features, List, Value, concatenate_datasets
from datasets.fingerprint import generate_random_fingerprint
from datasets.table import InMemoryTable
from transformers import PreTrainedTokenizerBase

from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import CollatorConfig, DataConfig, FormatConfig, MixSourceConfig, TrainConfig
from tuneforge.data import cache
from tuneforge.data.formats import BadRow, FormatContext, formatter, keeps_columns, renders_chat, used_columns
from tuneforge.data.mix import mix_counts
from tuneforge.data.render import render_conversations
from tuneforge.data.sources import ROW, SKIPPED_EXAMPLES, SkippedLines, data_sources, load_source
from tuneforge.data.text_masks import build_labels, encode_async
from tuneforge.data.tokenize import assistant_mask_route
from tuneforge.models.tokenizer import content_hash, reset_call_state, stop_token_ids
from tuneforge.runs.console import LONG_WORK_ROWS, without_bars

log = logging.getLogger(__name__)

# Columns the model trains on, and what the held-out split keeps for generation scoring.
TRAIN_COLUMNS = ["input_ids", "labels"]
GENERATION_COLUMNS = ["messages", "text", "spans"]
_MESSAGES = List({"role": Value("string"), "content": Value("string")})
# Fixed output schema: a batch with no chat (or no text) rows still yields the same column types.
OUT_FEATURES = Features({
    "input_ids": List(Value("int64")),
    "labels": List(Value("int64")),
    "truncated": Value("bool"),
    "n_trained": Value("int64"),
    "bad": Value("string"),
    ROW: Value("int64"),
    "messages": _MESSAGES,
    "text": Value("string"),
    "spans": List(List(Value("int64"))),
})


@dataclass
class DataStats:
    rows_in: int = 0
    rows_kept: int = 0
    bad_rows: dict[str, int] = field(default_factory=dict)
    bad_row_examples: list[int] = field(default_factory=list)
    # FILE:LINE of the first malformed JSON lines left out of local files (they never became rows).
    bad_line_examples: list[str] = field(default_factory=list)
    truncated: int = 0
    # Rows longer than train.max_length left out (data.on_long_row=drop); `truncated` counts the ones cut.
    dropped_long: int = 0
    fully_masked: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    # Rows kept per source (path), for mixes.
    sources: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def bad_positions(self) -> str:
        """Where the first malformed rows are: row indices, and FILE:LINE of JSON lines left out of the files."""
        return "; ".join(([f"first malformed row indices: {self.bad_row_examples}"] if self.bad_row_examples else [])
                         + ([f"first malformed lines: {', '.join(self.bad_line_examples)}"]
                            if self.bad_line_examples else []))

    @property
    def rows_dropped(self) -> int:
        return self.rows_in - self.rows_kept


@dataclass
class PreparedData:
    train: Dataset  # input_ids, labels
    eval: Dataset  # input_ids, labels, messages (+ text, spans when plain-text rows exist), for generation scoring
    stats: dict[str, DataStats]
    cache_path: Optional[str] = None
    cache_hit: bool = False
    # Prompt rows (data/prompts.py): the conversation each rendered prompt came from, before the system-prompt rule
    # (a reward model renders it with its own chat template).
    conversations: Optional[dict] = None


def prepare(data_cfg: DataConfig, format_cfg: FormatConfig, train_cfg: TrainConfig,
            tokenizer: PreTrainedTokenizerBase, collator: Optional[CollatorConfig] = None) -> PreparedData:
    """Prepared train/eval sets (tokens + loss labels) and their statistics; reused from the cache when the
    data content, configs and tokenizer content are unchanged. `collator` decides the labels (lm: every
    token; otherwise the completions / assistant turns); None means the default completion_only."""
    collator = collator or CollatorConfig()
    reset_call_state(tokenizer)
    sources = data_sources(data_cfg, format_cfg)
    for src in sources:
        _check_chat_template(src.format, tokenizer)
    labels_by = {"collator": [collator.name, collator.response_template, collator.instruction_template]}
    key = (cache.cache_key(data_cfg, sources, train_cfg.max_length, train_cfg.truncation_mode,
                           content_hash(tokenizer), labels_by) if data_cfg.cache else None)
    if key and (hit := cache.load(data_cfg, key)):
        splits, stats = hit
        log.info("Prepared data from cache %s", cache.data_cache_dir(data_cfg) / key)
        return PreparedData(train=splits["train"], eval=splits["eval"],
                            stats={k: DataStats(**v) for k, v in stats.items()},
                            cache_path=str(cache.data_cache_dir(data_cfg) / key), cache_hit=True)
    with _no_cyclic_gc():
        splits, stats = _build(data_cfg, sources, train_cfg, tokenizer, collator, key or generate_random_fingerprint())
    for split, st in stats.items():
        report(split, st)
    path = None
    if key:
        path = str(cache.save(data_cfg, key, splits, {k: v.as_dict() for k, v in stats.items()}))
        splits = cache.load(data_cfg, key)[0]  # memory-mapped, as a cache hit would give
    return PreparedData(train=splits["train"], eval=splits["eval"], stats=stats, cache_path=path)


@contextmanager
def _no_cyclic_gc():
    """The cycle collector off while rows are built: millions of short-lived lists (ids, labels, spans) make it
    rescan the whole heap again and again (measured on alpaca_5000: 1.17 s -> 0.99 s median). Reference
    counting still frees them; whatever cycles appear are collected when it is back on."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _check_chat_template(fmt: FormatConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    ctx = format_context(tokenizer)
    if renders_chat(fmt, ctx) and not ctx.has_chat_template:
        raise ConfigError(
            f"format.strategy={fmt.strategy} renders messages with the tokenizer's chat template, but this tokenizer "
            "has none. Set tokenizer.chat_template=chatml (or a .jinja file), or use format.strategy=template "
            "(or alpaca, which falls back to the classic Alpaca prompt)."
        )


@dataclass
class LoadedSources:
    """Every source of a data config loaded once (data/sources.py) with the mix's train counts: what the SFT and
    the preference data stages walk split by split, so both count, cap and merge sources alike."""

    cfg: DataConfig
    sources: list[MixSourceConfig]
    raws: list[DatasetDict]
    skipped: list[dict[str, SkippedLines]]  # malformed JSON lines left out, per source and split
    counts: list[int]  # train rows taken from each source

    @classmethod
    def load(cls, cfg: DataConfig, sources: list[MixSourceConfig]) -> "LoadedSources":
        skipped: list[dict[str, SkippedLines]] = [{} for _ in sources]
        raws = [load_source(src, cfg, skipped=sk) for src, sk in zip(sources, skipped)]
        weights = [s.weight for s in sources] if sources[0].weight is not None else None
        counts = mix_counts([len(r["train"]) for r in raws], weights, cfg.max_samples)
        return cls(cfg, sources, raws, skipped, counts)

    def rows(self, split: str, st: DataStats):
        """(index, source, rows with the columns its format uses, where, label) per source of `split`; the lines
        each source left out count in `st`. load_source checked the format's columns."""
        for i, (src, raw) in enumerate(zip(self.sources, self.raws)):
            ds = raw[split].select(range(self.counts[i])) if split == "train" else raw[split]
            label = f"mix[{i}] {src.path}" if len(self.sources) > 1 else ""
            _count_skipped(self.skipped[i].get(split), st, label)
            if not keeps_columns(src.format):
                ds = ds.select_columns([c for c in ds.column_names if c in used_columns(src.format) or c == ROW])
            yield i, src, ds, f"{split} split of {src.path!r}", label

    def merge(self, parts: list[Dataset], split: str, st: DataStats) -> Dataset:
        """One split from its sources' processed parts; an empty train split is refused with the reasons."""
        merged = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        if len(parts) > 1 and self.cfg.shuffle:  # interleave sources (eval too: scoring reads its first rows)
            merged = merged.shuffle(seed=self.cfg.seed)
        if split == "train" and len(merged) == 0:
            raise ConfigError(empty_message(st))
        return merged


def format_context(tokenizer: PreTrainedTokenizerBase) -> FormatContext:
    return FormatContext(eos_token=tokenizer.eos_token or "", has_chat_template=bool(tokenizer.chat_template))


def _build(cfg: DataConfig, sources: list[MixSourceConfig], train_cfg: TrainConfig,
           tokenizer: PreTrainedTokenizerBase, collator: CollatorConfig, key: str) -> tuple[DatasetDict, dict[str, DataStats]]:
    loaded = LoadedSources.load(cfg, sources)
    tok = tokenizer_kwargs(tokenizer, collator)
    out, stats = {}, {}
    for split in ("train", "eval"):
        st, parts = DataStats(), []
        for i, src, ds, where, label in loaded.rows(split, st):
            done = _process(ds, src.format, cfg, train_cfg, tok, where,
                            fingerprint=_fingerprint(key, split, i), keep_generation=split == "eval")
            parts.append(_account(done, st, label, drop_long=cfg.on_long_row == "drop"))
        merged = loaded.merge(parts, split, st)
        keep = TRAIN_COLUMNS if split == "train" else TRAIN_COLUMNS + _generation_columns(merged)
        out[split] = merged.select_columns(keep)
        stats[split] = st
    return DatasetDict(out), stats


def _fingerprint(key: str, split: str, i: int) -> str:
    # Given explicitly, so datasets never hashes the tokenizer passed to map (slow, and already in `key`).
    return hashlib.sha256(f"{key}:{split}:{i}".encode()).hexdigest()[:16]


def tokenizer_kwargs(tokenizer: PreTrainedTokenizerBase, collator: CollatorConfig) -> dict[str, Any]:
    """What `process_batch` needs from the tokenizer and collator, worked out once (get_vocab is not free)."""
    return {
        "tokenizer": tokenizer, "ctx": format_context(tokenizer), "collator": collator,
        "stops": [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)],
        "route": assistant_mask_route(tokenizer) if collator.name == "assistant_only" else "offsets",
    }


def _process(ds: Dataset, fmt: FormatConfig, cfg: DataConfig, train_cfg: TrainConfig, tok: dict[str, Any],
             where: str, fingerprint: str, keep_generation: bool) -> Dataset:
    if len(ds) == 0:  # map would return the input columns unchanged
        return Dataset.from_dict({k: [] for k in OUT_FEATURES}, features=OUT_FEATURES)
    # A small set prepares in seconds: the data report is its line; a large one keeps its progress bar.
    quiet = without_bars(transformers_bars=False) if len(ds) < LONG_WORK_ROWS else contextlib.nullcontext()
    with quiet:
        return _map(ds, fmt, cfg, train_cfg, tok, where, fingerprint, keep_generation)


def _map(ds: Dataset, fmt: FormatConfig, cfg: DataConfig, train_cfg: TrainConfig, tok: dict[str, Any],
         where: str, fingerprint: str, keep_generation: bool) -> Dataset:
    return ds.map(
        process_batch,
        batched=True,
        batch_size=cfg.map_batch_size,
        num_proc=cfg.num_proc if cfg.num_proc and len(ds) > cfg.map_batch_size else None,
        remove_columns=[c for c in ds.column_names if c != ROW],
        features=OUT_FEATURES,
        keep_in_memory=True,  # the result is saved once, into tuneforge's cache
        new_fingerprint=fingerprint,
        fn_kwargs={
            **tok, "fmt": fmt, "max_length": train_cfg.max_length, "truncation_mode": train_cfg.truncation_mode,
            "on_bad_row": cfg.on_bad_row, "where": where, "keep_generation": keep_generation,
        },
        desc=f"Preparing {where}",
    )


_CHUNK = 250  # rows rendered per tokenizer call inside a map batch


def process_batch(batch: dict[str, list], fmt: FormatConfig, ctx: FormatContext, tokenizer: PreTrainedTokenizerBase,
                  stops: list[str], max_length: int, truncation_mode: str, on_bad_row: str, where: str,
                  collator: CollatorConfig, route: str, keep_generation: bool) -> dict:
    """Batched map function: raw rows -> formatted -> rendered -> tokens + labels; malformed rows are kept
    as empty rows with the reason in `bad` (counted, then dropped) or raise with data.on_bad_row=error.
    `keep_generation`: also return messages / text + spans (held-out rows, for generation scoring)."""
    n = len(batch[ROW])
    columns = list(batch)
    fn = formatter(fmt, ctx)
    rows: list[Optional[dict[str, Any]]] = [None] * n
    bad = [""] * n

    def fail(i: int, reason: str) -> None:
        if on_bad_row == "error":
            raise ConfigError(f"{where}: row {batch[ROW][i]} is malformed: {reason} "
                              "(data.on_bad_row=error; data.on_bad_row=drop skips and counts such rows).")
        bad[i] = reason

    for i in range(n):
        try:
            rows[i] = fn({c: batch[c][i] for c in columns})
        except BadRow as exc:
            fail(i, str(exc))
    # Chunks: the tokenizer encodes one chunk in a background thread (it releases the GIL) while the next
    # chunk renders, so on two cores the Python work hides behind the tokenizer's.
    pending = []
    for start in range(0, n, _CHUNK):
        chunk = [i for i in range(start, min(start + _CHUNK, n)) if rows[i] is not None]
        chat = [i for i in chunk if "messages" in rows[i]]
        for i, result in zip(chat, render_conversations(tokenizer, [rows[i]["messages"] for i in chat], stops, route)):
            if isinstance(result, Exception):
                fail(i, str(result))
                rows[i] = None
            else:
                rows[i]["rendered"], rows[i]["spans"] = result
        chunk = [i for i in chunk if rows[i] is not None]
        texts = [rows[i].get("rendered", rows[i].get("text")) for i in chunk]
        pending.append((chunk, texts, encode_async(tokenizer, texts)))
    out = {"input_ids": [[]] * n, "labels": [[]] * n, "truncated": [False] * n, "n_trained": [0] * n,
           "bad": bad, ROW: batch[ROW], "messages": [None] * n, "text": [None] * n, "spans": [None] * n}
    for chunk, texts, encoded in pending:
        tok = build_labels(texts, [rows[i]["spans"] for i in chunk], encoded.result(), max_length, truncation_mode,
                           collator)
        for j, i in enumerate(chunk):
            for k in ("input_ids", "labels", "truncated", "n_trained"):
                out[k][i] = tok[k][j]
            if not keep_generation:
                continue
            out["messages"][i] = rows[i].get("messages")
            if "messages" not in rows[i]:  # plain-text rows keep text + spans (generation prompt and reference)
                out["text"][i], out["spans"][i] = rows[i]["text"], rows[i]["spans"]
    return out


def _account(done: Dataset, st: DataStats, label: str, drop_long: bool = False) -> Dataset:
    """Add a processed part's counts to `st`; return its usable rows (well-formed, something to train, and with
    `drop_long` no longer than train.max_length)."""
    table = done.data.table  # map output: no indices mapping
    bad = table.column("bad").to_pylist()
    n_trained = table.column("n_trained").to_pylist()
    rows = table.column(ROW).to_pylist()
    long = table.column("truncated").to_pylist() if drop_long else [False] * len(bad)
    st.rows_in += len(bad)
    reasons = Counter(f"{label}: {b}" if label else b for b in bad if b)
    for reason, count in reasons.items():
        st.bad_rows[reason] = st.bad_rows.get(reason, 0) + count
    st.bad_row_examples += [r for r, b in zip(rows, bad) if b][: max(0, 5 - len(st.bad_row_examples))]
    st.dropped_long += sum(1 for b, cut in zip(bad, long) if not b and cut)
    keep = [not b and t > 0 and not cut for b, t, cut in zip(bad, n_trained, long)]
    n_keep = sum(keep)
    st.fully_masked += sum(1 for b, t, cut in zip(bad, n_trained, long) if not b and not cut and t == 0)
    # One copy without the dropped rows (select() would add an indices mapping that saving copies again).
    kept = table.filter(pa.array(keep, type=pa.bool_())) if n_keep < len(bad) else table
    st.rows_kept += n_keep
    st.truncated += pc.sum(kept.column("truncated")).as_py() or 0
    st.tokens += pc.sum(pc.list_value_length(kept.column("input_ids"))).as_py() or 0
    st.trained_tokens += pc.sum(kept.column("n_trained")).as_py() or 0
    if label:
        st.sources[label] = st.sources.get(label, 0) + n_keep
    if n_keep == len(bad):
        return done
    return Dataset(InMemoryTable(kept), info=done.info, fingerprint=f"{done._fingerprint}-kept")


def _count_skipped(skipped: Optional[SkippedLines], st: DataStats, label: str) -> None:
    """Malformed JSON lines the source left out (data.on_bad_row=drop) count as read and dropped rows, with
    the reason per file and their FILE:LINE positions, so the report and metrics.json account for them."""
    if not skipped:
        return
    for file, count in skipped.counts.items():
        reason = f"{label}: {file}: malformed JSON line" if label else f"{file}: malformed JSON line"
        st.bad_rows[reason] = st.bad_rows.get(reason, 0) + count
        st.rows_in += count
    st.bad_line_examples += skipped.first[: max(0, SKIPPED_EXAMPLES - len(st.bad_line_examples))]


def _generation_columns(ds: Dataset) -> list[str]:
    """messages always (train.py reads them); text + spans only when plain-text rows are present."""
    has_text = len(ds) > 0 and ds.data.column("text").null_count < len(ds.data)
    return ["messages"] + (["text", "spans"] if has_text else [])


def empty_message(st: DataStats) -> str:
    why = []
    if st.bad_rows:
        why.append(f"{sum(st.bad_rows.values())} malformed ({'; '.join(f'{n}x {r}' for r, n in st.bad_rows.items())})")
    if st.dropped_long:
        why.append(f"{st.dropped_long} longer than train.max_length (data.on_long_row=drop)")
    if st.fully_masked:
        why.append(f"{st.fully_masked} with nothing to train (completion cut off by train.max_length, or "
                   "format.strategy=text without format.response_template)")
    return (f"No usable training rows: {st.rows_in} read, {', '.join(why) or 'the source is empty'}. "
            "Check data.path/data.split, data.columns and the format settings (`tuneforge preview` shows rows).")


def report(split: str, st: DataStats) -> None:
    log.info("%s: %d rows in, %d kept, %d tokens (%d trained), %d truncated, %d fully masked%s",
             split, st.rows_in, st.rows_kept, st.tokens, st.trained_tokens, st.truncated, st.fully_masked,
             f", {st.dropped_long} longer than train.max_length dropped (data.on_long_row=drop)" if st.dropped_long
             else "")
    if st.bad_rows:
        log.warning("%s: dropped %d malformed rows (%s); %s", split, sum(st.bad_rows.values()),
                    "; ".join(f"{n}x {why}" for why, n in st.bad_rows.items()), st.bad_positions())
