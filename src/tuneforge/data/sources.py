"""Load raw rows per source: builtin generators, hub datasets, or local files; split off held-out rows.

A source is a `MixSourceConfig` (path, split, columns, weight, cap, format). A plain `data.path`
config is a mix of one, so single sources and mixes go through the same code.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator, Optional

from datasets import Dataset, DatasetDict, ReadInstruction, load_dataset
from datasets.data_files import DataFilesDict, get_data_patterns
from datasets.exceptions import DatasetNotFoundError

from tuneforge.config.errors import ConfigError
from tuneforge.config.local_paths import BUILDERS, is_local
from tuneforge.config.schemas import DataConfig, FormatConfig, MixSourceConfig
from tuneforge.data.demo import BUILTIN
from tuneforge.data.formats import check_columns

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"


def data_sources(cfg: DataConfig, fmt: FormatConfig) -> list[MixSourceConfig]:
    """The configured sources, each with its format filled in (`data.mix`, or `data.path` as a mix of one)."""
    if cfg.mix:
        return [replace(s, format=s.format or fmt) for s in cfg.mix]
    return [MixSourceConfig(path=cfg.path, name=cfg.name, split=cfg.split, revision=cfg.revision,
                            eval_split=cfg.eval_split, columns=dict(cfg.columns), format=fmt)]


@dataclass
class SkippedLines:
    """Malformed JSON lines left out of a split's local files (data.on_bad_row=drop): how many per file, and
    where the first few are (`FILE:LINE`), for the data report."""
    counts: dict[str, int] = field(default_factory=dict)
    first: list[str] = field(default_factory=list)

    def add(self, file: str, lineno: int) -> None:
        self.counts[file] = self.counts.get(file, 0) + 1
        if len(self.first) < SKIPPED_EXAMPLES:
            self.first.append(f"{file}:{lineno}")


SKIPPED_EXAMPLES = 5


def load_source(src: MixSourceConfig, cfg: DataConfig, check_format: bool = True,
                skipped: Optional[dict[str, SkippedLines]] = None) -> DatasetDict:
    """{"train", "eval"} rows of one source, columns renamed as configured, train rows shuffled (seeded).
    `check_format`: refuse rows that lack `src.format`'s columns (before any check on the row count, which
    would point at the wrong fix). `skipped`: filled with the malformed lines left out of each split, for the
    caller's data report; without it, they are logged here."""
    report_here, skipped = skipped is None, {} if skipped is None else skipped
    ds = _checked(src, src.split, cfg, check_format, skipped.setdefault("train", SkippedLines()))
    if src.eval_split:
        eval_ds = _checked(src, src.eval_split, cfg, check_format, skipped.setdefault("eval", SkippedLines()))
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
    for lines in skipped.values() if report_here else ():
        if lines.counts:
            log.warning("left out %d malformed JSON line(s) of %s (data.on_bad_row=drop); first: %s",
                        sum(lines.counts.values()), ", ".join(lines.counts), ", ".join(lines.first))
    return DatasetDict({"train": train, "eval": eval_ds})


def _checked(src: MixSourceConfig, split: str, cfg: DataConfig, check_format: bool, skipped: SkippedLines) -> Dataset:
    ds = rename(load_split(src, split, cfg, skipped), src)
    if check_format:
        where = repr(split) if names_file(split) else f"{split} split of {src.path!r}"
        check_columns(src.format, [c for c in ds.column_names if c != ROW], where, src.columns or None)
    return ds


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


def load_split(src: MixSourceConfig, split: str, cfg: DataConfig, skipped: Optional[SkippedLines] = None) -> Dataset:
    """One split (or slice, e.g. `train[:100]`) of a source, with its row numbers in column `__row__`;
    `skipped` is filled with the malformed JSON lines left out (data.on_bad_row=drop)."""
    ds = load_split_raw(src, split, cfg, skipped)
    # An explicit fingerprint spares datasets hashing the whole new column.
    fingerprint = hashlib.sha256(f"{ds._fingerprint}:{ROW}".encode()).hexdigest()[:16]
    return ds.add_column(ROW, list(range(len(ds))), new_fingerprint=fingerprint)


def names_file(split: str) -> bool:
    """Whether a split setting names a local file instead (data.eval_split may)."""
    return ("/" in split or Path(split).suffix in BUILDERS) and is_local(split)


def load_split_raw(src: MixSourceConfig, split: str, cfg: DataConfig, skipped: Optional[SkippedLines] = None) -> Dataset:
    skipped = SkippedLines() if skipped is None else skipped
    if src.path.startswith(BUILTIN_PREFIX):
        return _builtin(src.path, split, cfg)
    if names_file(split):
        return _local(split, "train", "data.eval_split", cfg.on_bad_row, skipped)
    if is_local(src.path):
        return _local(src.path, split, "data.path", cfg.on_bad_row, skipped)
    try:
        with _quiet_loaders():
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


# datasets' loaders log the parse or decode error they are about to raise; tuneforge translates every such
# error into one line naming the file (and line), so the log record only printed the same failure twice, raw.
_LOADER_LOGGERS = ("datasets.packaged_modules.json.json", "datasets.packaged_modules.csv.csv")


@contextmanager
def _quiet_loaders() -> Iterator[None]:
    """A local file read without the loaders' log records and without datasets' "Generating split" bar (seconds
    of work; the data report is its line)."""
    from tuneforge.runs.console import without_bars

    loggers = [logging.getLogger(name) for name in _LOADER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with without_bars(transformers_bars=False):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_TEXT_BUILDERS = ("json", "csv", "text")
_HEAD_BYTES = 1 << 20  # decoded before loading: a binary or non-UTF-8 file is named up front, cheaply


def _check_text(f: str, where: str, whole: bool = False) -> None:
    """Refuse an empty, binary or non-UTF-8 text file by name (datasets would fail deep inside with a decode
    error that names neither). Reads the first _HEAD_BYTES, or the whole file."""
    decoder, offset, blank = codecs.getincrementaldecoder("utf-8")(), 0, True
    limit = None if whole else _HEAD_BYTES
    with open(f, "rb") as fh:
        while chunk := fh.read(min(_HEAD_BYTES, limit - offset) if limit else _HEAD_BYTES):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise ConfigError(f"{where}: {f} is not UTF-8 text (byte 0x{chunk[err.start]:02x} at offset "
                                  f"{offset + err.start}); convert it to UTF-8.") from None
            if (nul := chunk.find(b"\0")) >= 0:  # valid UTF-8, but no text file holds NUL (UTF-16 does)
                raise ConfigError(f"{where}: {f} is not UTF-8 text (NUL byte at offset {offset + nul}: binary or "
                                  "UTF-16?); convert it to UTF-8.")
            blank = blank and not chunk.strip()
            offset += len(chunk)
            if limit and offset >= limit:
                return
    if blank:
        raise ConfigError(f"{where}: {f} is empty: no rows.")


def _local(path: str, split: str, key: str, on_bad_row: str, skipped: SkippedLines) -> Dataset:
    files = local_files(path)
    suffix = Path(files[0]).suffix
    builder = BUILDERS[suffix]
    where = f"{key}={path!r}"
    for f in files:
        if builder in _TEXT_BUILDERS:
            _check_text(f, where)
        elif os.path.getsize(f) == 0:
            raise ConfigError(f"{where}: {f} is empty: no rows.")
    kwargs = {"sep": "\t"} if suffix == ".tsv" else {}
    p = Path(path).expanduser()
    try:
        with _quiet_loaders():
            if p.is_dir():
                # A directory's file names give its splits (train*.jsonl, test*.jsonl, ...), as on the hub.
                return load_dataset(builder, data_dir=str(p), split=split, **kwargs)
            return load_dataset(builder, data_files=files, split=split, **kwargs)
    except Exception as exc:
        if "corresponds to no data" in _root_cause(exc):  # e.g. a CSV file with a header and nothing after it
            raise ConfigError(f"{where}: no rows in {', '.join(files)}.") from exc
        if isinstance(exc, ValueError) and ("split" in str(exc).lower() or "Unknown" in str(exc)):
            raise ConfigError(f"data split {split!r} of {path!r}: {str(exc).splitlines()[0]}") from exc
        for f in files if builder in _TEXT_BUILDERS else ():  # a bad byte past those checked up front?
            _check_text(f, where, whole=True)
        # A malformed row can surface as a ValueError too (datasets' fallback JSON parser), so this is not
        # limited to the other exception types.
        if builder == "json":
            bad = _malformed_json(files)  # lazy: data.on_bad_row=error needs the first only
            if on_bad_row == "drop":
                bad = list(bad)
                if bad and all(lineno for _, lineno, _ in bad):  # line 0: a whole JSON document, no line to drop
                    return _load_without(p, files, split, bad, skipped, exc)
            _raise_bad_json_line(files, exc, bad)
        raise ConfigError(f"could not read {path!r} as {builder}: {_root_cause(exc)}") from exc


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"


def _malformed_json(files: list[str]) -> Iterator[tuple[str, int, json.JSONDecodeError]]:
    """(file, line, error) of each JSON line that does not parse; line 0 for a whole-file JSON document (an
    array) that does not, which no single line can be dropped from. Lines are split on b"\\n" only, as
    datasets' reader splits them."""
    for f in files:
        with open(f, "rb") as fh:
            if Path(f).suffix == ".json" and fh.read(1024).lstrip()[:1] in (b"[", b"{"):
                fh.seek(0)
                try:
                    json.load(fh)
                    continue
                except json.JSONDecodeError as err:
                    if err.msg != "Extra data":  # else a .json file of JSON lines: scanned line by line below
                        yield f, 0, err
                        continue
            fh.seek(0)
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    yield f, lineno, err


def _raise_bad_json_line(files: list[str], exc: Exception,
                         bad: Iterable[tuple[str, int, json.JSONDecodeError]]) -> None:
    """datasets reports a parse error without the file and line: name the first, so the user can fix it."""
    if first := next(iter(bad), None):
        f, lineno, err = first
        if lineno == 0:
            raise ConfigError(f"{f}:{err.lineno}: malformed JSON ({err.msg}, column {err.colno}).") from exc
        raise ConfigError(f"{f}:{lineno}: malformed JSON line ({err.msg}, column {err.colno}); "
                          "data.on_bad_row=drop skips and counts such lines.") from exc
    raise ConfigError(f"could not read {files[0]!r}{' and others' if len(files) > 1 else ''}: "
                      f"{_root_cause(exc)}") from exc


def _load_without(p: Path, files: list[str], split: str, bad: list[tuple[str, int, json.JSONDecodeError]],
                  skipped: SkippedLines, exc: Exception) -> Dataset:
    """data.on_bad_row=drop: load the files again with their malformed lines left out (cleaned copies in a
    temporary directory, so datasets infers the same schema as for a clean file), and count what was left out
    of this split's files."""
    by_file: dict[str, set[int]] = {}
    for f, lineno, _ in bad:
        by_file.setdefault(f, set()).add(lineno)
    # A directory's file names give its splits; resolved here as datasets resolves them for data_dir.
    split_files = ({str(k): list(v) for k, v in DataFilesDict.from_patterns(get_data_patterns(str(p)),
                                                                          base_path=str(p)).items()}
                   if p.is_dir() else {"train": files})
    with tempfile.TemporaryDirectory(prefix="tuneforge-clean-") as tmp:
        cleaned = {f: _without_lines(f, lines, Path(tmp) / str(i)) for i, (f, lines) in enumerate(by_file.items())}
        data_files = {name: [c for c in (cleaned.get(f, f) for f in fs) if c] for name, fs in split_files.items()}
        name = _split_name(split) if p.is_dir() else "train"
        if not data_files.get(name):  # every line malformed: nothing to drop down to
            _raise_bad_json_line(files, exc, bad)
        with _quiet_loaders():
            # keep_in_memory + a private cache: nothing outlives the temporary copies.
            ds = load_dataset("json", data_files={k: v for k, v in data_files.items() if v}, split=split,
                              cache_dir=str(Path(tmp) / "cache"), keep_in_memory=True)
    ours = set(split_files.get(name, ()))
    for f, lineno, _ in bad:
        if f in ours:
            skipped.add(f, lineno)
    return ds


def _split_name(split: str) -> str:
    """`test` of `test[:10%]`, by datasets' own parser (a slice may combine splits: the first names it)."""
    try:
        return ReadInstruction.from_spec(split)._relative_instructions[0].splitname
    except (ValueError, IndexError):
        return split


def _without_lines(f: str, drop: set[int], dest_dir: Path) -> Optional[str]:
    """A copy of `f` without lines `drop` (same file name: a directory's splits come from the names); None when
    no line is left."""
    dest_dir.mkdir()
    dest, kept = dest_dir / Path(f).name, 0
    with open(f, "rb") as src, open(dest, "wb") as out:
        for lineno, line in enumerate(src, 1):
            if lineno not in drop and line.strip():
                out.write(line if line.endswith(b"\n") else line + b"\n")
                kept += 1
    return str(dest) if kept else None
