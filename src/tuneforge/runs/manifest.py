"""manifest.json and failed.json: what identifies a run (environment, versions, git state, inputs, command)
and why one stopped. `tuneforge reproduce` compares the versions; `tuneforge report` reads the failures."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from tuneforge.config.device import cuda_available
from tuneforge.runs.redaction import command_line, redact
from tuneforge.runs.rundir import FAILED_FILE, read_json, write_json

# Versions recorded in every manifest (and compared by `tuneforge reproduce`).
PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "hydra-core")


MANIFEST_FILE = "manifest.json"


def _version(dist: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def git_state(path: Path) -> Optional[dict]:
    """{commit, dirty} when tuneforge runs from a git checkout, else None."""
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """Versions, device and world size: what a reproduction must match."""
    import torch

    from tuneforge.config.paths import REPO_ROOT

    if cuda_available():
        device = {"type": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    else:
        device = {"type": "cpu", "name": platform.processor() or platform.machine(), "count": os.cpu_count()}
    repo = REPO_ROOT if (REPO_ROOT / ".git").exists() else None
    return {
        "tuneforge": _version("tuneforge"),
        "git": git_state(repo) if repo else None,
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "device": device,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }


def write(run_dir: Path, **fields: Any) -> dict:
    """manifest.json: the environment + what identifies this run's inputs; fields merge into an existing one
    (a resumed run keeps its history)."""
    path = Path(run_dir) / MANIFEST_FILE
    data = read_json(path) if path.is_file() else {}
    if not data:
        data = environment() | {"command": command_line(), "started_at": now()}
    data.update(fields)
    write_json(path, redact(data))
    return data


def read(run_dir: Path) -> dict:
    path = Path(run_dir) / MANIFEST_FILE
    return read_json(path) if path.is_file() else {}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_failure(run_dir: Path, exc: BaseException, **fields: Any) -> None:
    """failed.json: why a run (or sweep job) stopped, for people and for `tuneforge report`."""
    import traceback

    write_json(Path(run_dir) / FAILED_FILE, {
        "status": "failed", "error": f"{type(exc).__name__}: {exc}", "at": now(),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:], **fields,
    })


def run_identity(data, tokenizer_hash: str) -> dict:
    """The manifest fields that identify an SFT run's inputs (prepared data, tokenizer)."""
    fingerprint = Path(data.cache_path).name if data.cache_path else getattr(data.train, "_fingerprint", None)
    return {"tokenizer": {"content_hash": tokenizer_hash},
            "data": {"fingerprint": fingerprint, "cache_hit": data.cache_hit,
                     "rows": {"train": len(data.train), "eval": len(data.eval)}}}
