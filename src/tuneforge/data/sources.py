"""Load raw rows: builtin generators, hub datasets, or local files; split off a held-out set."""

from __future__ import annotations

import glob
import logging
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from tuneforge.config import ConfigError, DataConfig
from tuneforge.data.demo import BUILTIN

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
# datasets' packaged builders by file extension.
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_raw(cfg: DataConfig) -> DatasetDict:
    """{"train": ..., "eval": ...} with the columns renamed as configured."""
    if cfg.path.startswith(BUILTIN_PREFIX):
        ds = _builtin(cfg)
    elif _is_local(cfg.path):
        ds = _local(cfg)
    else:
        ds = load_dataset(cfg.path, cfg.name, split=cfg.split, revision=cfg.revision)
    splits = _split(ds, cfg)
    if cfg.columns:
        missing = [c for c in cfg.columns if c not in splits["train"].column_names]
        if missing:
            raise ConfigError(
                f"data.columns renames {missing}, which the data lacks; available columns: "
                f"{splits['train'].column_names}."
            )
        splits = DatasetDict({k: v.rename_columns(dict(cfg.columns)) for k, v in splits.items()})
    return splits


def _builtin(cfg: DataConfig) -> Dataset:
    name = cfg.path[len(BUILTIN_PREFIX):]
    if name not in BUILTIN:
        raise ConfigError(f"data.path={cfg.path!r}: builtin data sets are {', '.join(BUILTIN_PREFIX + b for b in BUILTIN)}.")
    return Dataset.from_list(BUILTIN[name](cfg.builtin_rows, seed=cfg.seed))


def _is_local(path: str) -> bool:
    return Path(path).expanduser().exists() or any(ch in path for ch in "*?[")


def _local(cfg: DataConfig) -> Dataset:
    path = Path(cfg.path).expanduser()
    files = sorted(str(p) for p in path.rglob("*") if p.is_file()) if path.is_dir() else sorted(glob.glob(str(path)))
    files = [f for f in files if Path(f).suffix in _BUILDERS]
    if not files:
        raise ConfigError(f"data.path={cfg.path!r}: no data files ({', '.join(_BUILDERS)}) found there.")
    suffixes = {Path(f).suffix for f in files}
    builders = {_BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise ConfigError(f"data.path={cfg.path!r} mixes file types {sorted(suffixes)}; point it at one type.")
    kwargs = {"delimiter": "\t"} if suffixes == {".tsv"} else {}
    return load_dataset(builders.pop(), data_files=files, split=cfg.split, **kwargs)


def _split(ds: Dataset, cfg: DataConfig) -> DatasetDict:
    if cfg.eval_split:
        eval_ds = load_dataset(cfg.path, cfg.name, split=cfg.eval_split, revision=cfg.revision)
        train = ds
    elif cfg.eval_fraction > 0:
        parts = ds.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed, shuffle=True)
        train, eval_ds = parts["train"], parts["test"]
    else:
        train, eval_ds = ds, ds.select([])
    if cfg.max_samples:
        train = train.select(range(min(cfg.max_samples, len(train))))
    return DatasetDict({"train": train, "eval": eval_ds})
