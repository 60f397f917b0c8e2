"""Temporary folders beside what they become (a cache entry, the converted model, an adapter, a file): named after
the process writing them, so that one a killed writer left behind is recognised and removed the next time its
folder is opened, while a live writer's is left alone."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

# .<target name>.partial-<writer pid>-<random>
MARK = ".partial-"


def scratch_name(target: str) -> str:
    return f".{target}{MARK}{os.getpid()}-{secrets.token_hex(4)}"


def make_scratch_dir(target: Path) -> Path:
    """A new empty folder beside `target`, for writing it; renamed onto `target` when whole."""
    tmp = Path(target).parent / scratch_name(Path(target).name)
    tmp.mkdir()  # not mkdtemp: its 0700 would become the final folder's mode, ignoring the umask
    return tmp


def _writer(path: Path) -> Optional[int]:
    pid = path.name.rpartition(MARK)[2].split("-", 1)[0]
    return int(pid) if path.name.startswith(".") and MARK in path.name and pid.isdigit() else None


def _writer_alive(pid: int, made_at: float) -> bool:
    """The writer still runs: its process exists and started before the folder was made (a reused pid of a
    younger process is not the writer)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    started = _start_time(pid)
    return started is None or started <= made_at + 1


def _start_time(pid: int) -> Optional[float]:
    """When process `pid` started (Linux /proc), or None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def remove_stale(folder: Path) -> list[Path]:
    """Remove the temporary folders and files in `folder` whose writer has ended (a kill, a crash); returns them."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for path in entries:
        pid = _writer(path)
        if pid is None or pid == os.getpid():
            continue
        try:
            made_at = path.lstat().st_mtime
        except OSError:
            continue
        if _writer_alive(pid, made_at):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
        log.info("Removed %s, left by a writer that did not finish (process %d).", path, pid)
    return removed
