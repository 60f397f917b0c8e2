"""Which config paths name local data files: no `datasets` import, so config validation stays light."""

from __future__ import annotations

from pathlib import Path

# datasets' packaged builders by file extension (.tsv is the csv builder with a tab separator).
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".txt": "text"}


def is_local(path: str) -> bool:
    return Path(path).expanduser().exists() or any(ch in path for ch in "*?[") and not path.endswith("]")


def missing_local_path(path: str) -> bool:
    """A path written as a local one (a data-file suffix, or starting with /, ./, ../ or ~) that is not there.

    Hub dataset ids have neither, so this never stops a hub load; it lets validation refuse a typo before
    the model is converted or loaded, instead of the hub lookup failing minutes later.
    """
    if "://" in path or is_local(path):
        return False
    return Path(path).suffix in BUILDERS or path.startswith(("/", "./", "../", "~"))
