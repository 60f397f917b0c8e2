"""Content-addressed cache of prepared (tokenized + masked) data.

The key hashes what the result depends on -- the bytes of local data files (or the hub dataset's
own fingerprint), the data and format configs, the sequence-length settings, the tokenizer's
content (not its name), the data-stage code and the library versions -- and nothing it does not
(num_proc, batch size). A hit is answered before any data is loaded, so a re-run costs a
memory-mapped load; a changed tokenizer, template, file or setting misses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import datasets
import tokenizers
import transformers
import xxhash
from datasets import Dataset, DatasetDict, Features, load_from_disk
from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from tuneforge.config.local_paths import is_local
from tuneforge.config.paths import cache_dir
from tuneforge.config.schemas import DataConfig, MixSourceConfig
from tuneforge.data.sources import BUILTIN_PREFIX, load_split_raw, local_files
from tuneforge.runs import scratch

log = logging.getLogger(__name__)

_DATA_DIR = Path(__file__).resolve().parent
STATS_FILE = "tuneforge_stats.json"
# Settings that change how fast data is prepared, never what comes out.
_NOT_IN_KEY = ("num_proc", "map_batch_size", "cache", "cache_dir")


def file_digest(path: str) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def source_fingerprint(src: MixSourceConfig, cfg: DataConfig) -> Any:
    """What identifies a source's rows: builtin code + settings, local file bytes, or the hub fingerprint."""
    if src.path.startswith(BUILTIN_PREFIX):
        return {"builtin": src.path, "code": file_digest(str(_DATA_DIR / "demo.py"))}
    if is_local(src.path):
        files = local_files(src.path)
        root = Path(src.path).expanduser()
        base = root if root.is_dir() else root.parent
        return {os.path.relpath(f, base): file_digest(f) for f in files}
    # Hub: datasets fingerprints the downloaded revision; loading reuses its own cache.
    return {split: load_split_raw(src, split, cfg)._fingerprint for split in filter(None, (src.split, src.eval_split))}


def _eval_split_fingerprint(src: MixSourceConfig) -> Any:
    if src.eval_split and is_local(src.eval_split) and not src.path.startswith(BUILTIN_PREFIX):
        return {f: file_digest(f) for f in local_files(src.eval_split)}
    return None


def code_digest() -> str:
    """The data stage's code (+ models/tokenizer.py, whose stop tokens end the trained spans, and the format
    records of config/formats.py): a change in formatting or masking invalidates cached results."""
    h = xxhash.xxh3_128()
    package = _DATA_DIR.parent
    for path in sorted(_DATA_DIR.glob("*.py")) + [package / "models" / "tokenizer.py", package / "config" / "formats.py"]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def cache_key(cfg: DataConfig, sources: list[MixSourceConfig], max_length: int, truncation_mode: str,
              tokenizer_hash: str, extra: Optional[dict] = None) -> str:
    """The content key; `extra`: anything else the labels depend on (the collator's masking settings)."""
    data = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_KEY}
    payload = {
        "data": data,
        "sources": [{"config": asdict(s), "content": source_fingerprint(s, cfg),
                     "eval_content": _eval_split_fingerprint(s)} for s in sources],
        "max_length": max_length,
        "truncation_mode": truncation_mode,
        "tokenizer": tokenizer_hash,
        "extra": extra or {},
        "code": code_digest(),
        "versions": [datasets.__version__, tokenizers.__version__, transformers.__version__],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def data_cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_dir() / "data"


def load(cfg: DataConfig, key: str) -> Optional[tuple[DatasetDict, dict]]:
    """(splits, stats) of a previous preparation with this key, or None. A damaged entry (a truncated or missing
    file: a disk filled up, someone's hands) is said so in one line naming the file, removed and rebuilt by the
    caller; leftover temporary entries of killed writers are removed first."""
    root = data_cache_dir(cfg)
    scratch.remove_stale(root)
    path = root / key
    if not path.exists():
        return None
    try:
        return _read_entry(path)
    except _Damaged as exc:
        log.warning("data cache entry %s is damaged (%s): rebuilding it.", path, exc)
        _discard(path)
        return None


class _Damaged(Exception):
    pass


def _read_entry(path: Path) -> tuple[DatasetDict, dict]:
    stats_file = path / STATS_FILE
    try:
        meta = json.loads(stats_file.read_text())
        saved, empty, rows = meta["saved"], meta["empty"], meta.get("rows", {})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _Damaged(f"{stats_file}: {type(exc).__name__}: {exc}") from None
    splits = {}
    for name in saved:
        try:
            ds = load_from_disk(str(path / name))
            n = len(ds)
            if name in rows and n != rows[name]:
                raise ValueError(f"{n} rows, {rows[name]} written")
            if n:
                ds[n - 1]  # reads the last record: a truncated arrow file fails here, not mid-training
        except Exception as exc:  # datasets/pyarrow raise many types for a damaged file
            raise _Damaged(f"{path / name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") \
                from None
        splits[name] = ds
    # datasets cannot save or load a split with no rows: only its schema was kept.
    try:
        splits.update({name: Dataset.from_dict({k: [] for k in feats}, features=Features.from_dict(feats))
                       for name, feats in empty.items()})
    except Exception as exc:
        raise _Damaged(f"{stats_file}: {type(exc).__name__}: {exc}") from None
    return DatasetDict(splits), meta["stats"]


def _discard(path: Path) -> None:
    """Move a damaged entry out of the way (one rename, so no reader sees it half deleted), then delete it."""
    aside = path.parent / scratch.scratch_name(path.name)
    try:
        os.rename(path, aside)
    except OSError:  # another process moved or replaced it meanwhile
        return
    shutil.rmtree(aside, ignore_errors=True)


def save(cfg: DataConfig, key: str, splits: DatasetDict, stats: dict) -> Path:
    """Write atomically: a temporary directory renamed into place, so readers never see half an entry."""
    root = data_cache_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    tmp = scratch.make_scratch_dir(final)
    try:
        saved = [name for name, ds in splits.items() if len(ds)]
        quiet = are_progress_bars_disabled()
        disable_progress_bars()  # a bar per split for a sub-second write is noise
        try:
            for name in saved:
                splits[name].save_to_disk(str(tmp / name))
        finally:
            if not quiet:
                enable_progress_bars()
        empty = {name: ds.features.to_dict() for name, ds in splits.items() if not len(ds)}
        rows = {name: len(splits[name]) for name in saved}
        (tmp / STATS_FILE).write_text(json.dumps({"stats": stats, "saved": saved, "empty": empty, "rows": rows},
                                                 indent=1))
        try:
            tmp.rename(final)
        except OSError:  # another process won the race with the same content, or a damaged entry is in the way
            try:
                _read_entry(final)
                shutil.rmtree(tmp)
            except _Damaged:
                _discard(final)
                tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
