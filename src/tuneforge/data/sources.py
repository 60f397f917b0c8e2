"""Load raw rows per source: builtin generators, hub datasets, or local files; split off held-out rows.

A source is a `MixSourceConfig` (path, split, columns, weight, cap, format). A plain `data.path`
config is a mix of one, so single sources and mixes go through the same code.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

from datasets import Dataset, DatasetDict, ReadInstruction, load_dataset
from datasets.exceptions import DatasetNotFoundError

from tuneforge.config import ConfigError, DataConfig, FormatConfig, MixSourceConfig
from tuneforge.data.demo import BUILTIN
from tuneforge.data.local_paths import BUILDERS, is_local

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"


def data_sources(cfg: DataConfig, fmt: FormatConfig) -> list[MixSourceConfig]:
    """The configured sources, each with its format filled in (`data.mix`, or `data.path` as a mix of one)."""
    if cfg.mix:
        return [replace(s, format=s.format or fmt) for s in cfg.mix]
    return [MixSourceConfig(path=cfg.path, name=cfg.name, split=cfg.split, revision=cfg.revision,
                            eval_split=cfg.eval_split, columns=dict(cfg.columns), format=fmt)]


def load_source(src: MixSourceConfig, cfg: DataConfig) -> DatasetDict:
    """{"train", "eval"} rows of one source, columns renamed as configured, train rows shuffled (seeded)."""
    ds = load_split(src, src.split, cfg)
    if src.eval_split:
        eval_ds = load_split(src, src.eval_split, cfg)
        train = ds.shuffle(seed=cfg.seed) if cfg.shuffle else ds
    elif cfg.eval_fraction > 0:
        if len(ds) < 2:
            raise ConfigError(f"data.path={src.path!r} has {len(ds)} row(s): too few to hold out "
                              f"data.eval_fraction={cfg.eval_fraction}; set data.eval_fraction=0.")
        parts = ds.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed, shuffle=cfg.shuffle)
        train, eval_ds = parts["train"], parts["test"]
    else:
        train, eval_ds = (ds.shuffle(seed=cfg.seed) if cfg.shuffle else ds), ds.select([])
    if src.max_samples:
        train = train.select(range(min(src.max_samples, len(train))))
    return DatasetDict({"train": rename(train, src), "eval": rename(eval_ds, src)})


def rename(ds: Dataset, src: MixSourceConfig) -> Dataset:
    if not src.columns:
        return ds
    missing = [c for c in src.columns if c not in ds.column_names]
    if missing:
        raise ConfigError(
            f"data.columns renames {missing}, which {src.path!r} lacks; available columns: {ds.column_names}."
        )
    clash = [new for old, new in src.columns.items() if new in ds.column_names and new not in src.columns]
    if clash:
        raise ConfigError(f"data.columns renames onto existing column(s) {clash} of {src.path!r}; "
                          f"drop or rename those first (columns: {ds.column_names}).")
    return ds.rename_columns(dict(src.columns))


ROW = "__row__"  # the row's index in its split as loaded, carried along to name malformed rows


def load_split(src: MixSourceConfig, split: str, cfg: DataConfig) -> Dataset:
    """One split (or slice, e.g. `train[:100]`) of a source, with its row numbers in column `__row__`."""
    ds = load_split_raw(src, split, cfg)
    # An explicit fingerprint spares datasets hashing the whole new column.
    fingerprint = hashlib.sha256(f"{ds._fingerprint}:{ROW}".encode()).hexdigest()[:16]
    return ds.add_column(ROW, list(range(len(ds))), new_fingerprint=fingerprint)


def load_split_raw(src: MixSourceConfig, split: str, cfg: DataConfig) -> Dataset:
    if src.path.startswith(BUILTIN_PREFIX):
        return _builtin(src.path, split, cfg)
    if ("/" in split or Path(split).suffix in BUILDERS) and is_local(split):  # eval_split may name a file
        return _local(split, "train")
    if is_local(src.path):
        return _local(src.path, split)
    try:
        return load_dataset(src.path, src.name, split=split, revision=src.revision)
    except (FileNotFoundError, ConnectionError, DatasetNotFoundError) as exc:
        raise ConfigError(
            f"data.path={src.path!r} is not a local file, directory or glob, and loading it from the hub failed "
            f"({type(exc).__name__}: {_first_line(exc)})."
        ) from exc
    except ValueError as exc:  # e.g. an unknown split or config name
        raise ConfigError(f"data.path={src.path!r} (name={src.name!r}, split={split!r}): {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _builtin(path: str, split: str, cfg: DataConfig) -> Dataset:
    name = path[len(BUILTIN_PREFIX):]
    if name not in BUILTIN:
        raise ConfigError(f"data.path={path!r}: builtin data sets are {', '.join(BUILTIN_PREFIX + b for b in BUILTIN)}.")
    ds = Dataset.from_list(BUILTIN[name](cfg.builtin_rows, seed=cfg.seed))
    return _slice(ds, split, path)


def _slice(ds: Dataset, split: str, path: str) -> Dataset:
    """datasets' split syntax (`train[:100]`, `train[10%:]`) on an in-memory set whose only split is train."""
    try:
        (instr,) = ReadInstruction.from_spec(split).to_absolute({"train": len(ds)})
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"data.split={split!r} for {path!r}: use train or a slice such as train[:100].") from exc
    return ds.select(range(instr.from_ or 0, len(ds) if instr.to is None else instr.to))


def local_files(path: str) -> list[str]:
    """The data files a local path names (a file, every data file under a directory, or a glob)."""
    p = Path(path).expanduser()
    files = sorted(str(f) for f in p.rglob("*") if f.is_file()) if p.is_dir() else sorted(glob.glob(str(p)))
    files = [f for f in files if Path(f).suffix in BUILDERS]
    if not files:
        raise ConfigError(f"data.path={path!r}: no data files ({', '.join(BUILDERS)}) found there.")
    suffixes = {Path(f).suffix for f in files}
    if len({BUILDERS[s] for s in suffixes}) > 1 or suffixes == {".csv", ".tsv"}:
        raise ConfigError(f"data.path={path!r} mixes file types {sorted(suffixes)}; point it at one type.")
    return files


def _local(path: str, split: str) -> Dataset:
    files = local_files(path)
    suffix = Path(files[0]).suffix
    builder = BUILDERS[suffix]
    kwargs = {"sep": "\t"} if suffix == ".tsv" else {}
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            # A directory's file names give its splits (train*.jsonl, test*.jsonl, ...), as on the hub.
            return load_dataset(builder, data_dir=str(p), split=split, **kwargs)
        return load_dataset(builder, data_files=files, split=split, **kwargs)
    except Exception as exc:
        if isinstance(exc, ValueError) and ("split" in str(exc).lower() or "Unknown" in str(exc)):
            raise ConfigError(f"data split {split!r} of {path!r}: {str(exc).splitlines()[0]}") from exc
        # A malformed row can surface as a ValueError too (datasets' fallback JSON parser), so this is not
        # limited to the other exception types.
        if builder == "json":
            _raise_bad_json_line(files, exc)
        raise ConfigError(f"could not read {path!r} as {builder}: {_root_cause(exc)}") from exc


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"


def _raise_bad_json_line(files: list[str], exc: Exception) -> None:
    """datasets reports a parse error without the file and line: find them, so the user can fix the line."""
    for f in files:
        with open(f, encoding="utf-8") as fh:
            head = fh.read(1).lstrip()
            fh.seek(0)
            if Path(f).suffix == ".json" and head in ("[", "{"):
                try:
                    json.load(fh)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{f}:{err.lineno}: malformed JSON ({err.msg}, column {err.colno}).") from exc
                continue
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{f}:{lineno}: malformed JSON line ({err.msg}, column {err.colno}).") from exc
    raise ConfigError(f"could not read {files[0]!r}{' and others' if len(files) > 1 else ''}: "
                      f"{_root_cause(exc)}") from exc
