"""Checkpoints a resume can trust: which checkpoint-N directories are whole, and what
`train.resume_from_checkpoint` (auto | true | a path) resolves to."""

from __future__ import annotations

import json
import logging
import struct
import zipfile
from pathlib import Path
from typing import Any, Optional

from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import RESUME_LATEST, RESUME_OFF

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


def resume_requested(value: Any) -> bool:
    """`train.resume_from_checkpoint`: null/false = start fresh; auto/true/a path = resume."""
    return value is not None and str(value).strip().lower() not in RESUME_OFF


_WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


def file_problem(path: Path) -> Optional[str]:
    """Why a file tuneforge or a library wrote cannot be read back whole, or None: JSON that does not parse, a
    safetensors file shorter than its header says, a torch zip (optimizer.pt) without its end record."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if path.stat().st_size < 8 + n + end:
                return f"{path} is truncated"
        elif path.suffix in (".pt", ".bin") and not zipfile.is_zipfile(path):
            return f"{path} is truncated"
    except FileNotFoundError:
        return f"{path} is missing"
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        return (f"{path} is truncated or damaged "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'})")
    return None


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why a checkpoint directory cannot be resumed from (a kill while writing it, a damaged file), or None."""
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    state = path / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (written last: the save was interrupted)"
    weights = [path / w for w in _WEIGHTS if (path / w).is_file()]
    if not weights:
        return "no model/adapter weights"
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (path / name).is_file():
            return f"no {name}"
    for file in (state, *weights, path / "optimizer.pt", path / "scheduler.pt"):
        if problem := file_problem(file):
            return problem
    return None


def checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-N directories, oldest first."""
    found = [p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_complete_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint that is whole; half-written ones are skipped (and said so)."""
    for ckpt in reversed(checkpoints(run_dir)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        log.warning("Skipping %s for the previous whole checkpoint: %s.", ckpt, problem)
    return None


def resolve_resume(value: Any, run_dir: Path) -> Optional[str]:
    """`train.resume_from_checkpoint` -> the checkpoint path to give the Trainer, or None (start fresh).

    auto: the latest complete checkpoint in the run directory, or a fresh start when there is none;
    true: the same, but having none is an error; a path: that checkpoint, which must be complete."""
    if not resume_requested(value):
        return None
    text = str(value).strip()
    if text.lower() in RESUME_LATEST:
        ckpt = latest_complete_checkpoint(run_dir)
        if ckpt is None and text.lower() != "auto":
            raise ConfigError(f"train.resume_from_checkpoint={text}: no complete checkpoint in {run_dir}. "
                              "Use auto to start fresh when there is none.")
        if ckpt is None:
            log.info("train.resume_from_checkpoint=auto: no checkpoint in %s yet, starting from step 0.", run_dir)
            return None
        return str(ckpt)
    problem = checkpoint_problem(Path(text))
    if problem:
        raise ConfigError(f"train.resume_from_checkpoint={text}: cannot resume from it ({problem}).")
    return text


# What a checkpoint holds (weights of this shape, on this base, with this tokenizer; the optimizer's state): keys a
# resume may not change. Anything else (more steps, other logging, eval settings) may differ.
HELD_BY_CHECKPOINT = ("task", "model", "tokenizer", "peft", "quant", "train.optim")
# Keys of those sections that change nothing stored (the token is redacted in the saved config).
_NOT_HELD = {"model.token", "model.cache_dir", "model.attn_implementation", "tokenizer.padding_side"}


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out |= _flat(v, f"{prefix}{k}.")
        return out
    return {prefix.rstrip("."): obj}


def resume_changes(saved: dict, new: dict) -> list[str]:
    """`key: saved -> new` for each key a checkpoint holds that a resume's config changes (both configs as plain,
    validated dicts)."""
    saved_flat, new_flat = _flat(saved), _flat(new)
    held = lambda key: any(key == h or key.startswith(h + ".") for h in HELD_BY_CHECKPOINT) and key not in _NOT_HELD
    return [f"{k}: {saved_flat.get(k)!r} -> {new_flat.get(k)!r}" for k in sorted(set(saved_flat) | set(new_flat))
            if held(k) and saved_flat.get(k) != new_flat.get(k)]


def at_last_step(checkpoint: Optional[str], max_steps: int) -> bool:
    """The checkpoint is at the run's last step (`max_steps`, or by epochs the step count it planned): what a kill
    while the final adapter was being written leaves. Nothing is left to train."""
    if not checkpoint:
        return False
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    last = max_steps if max_steps > 0 else state.get("max_steps", 0)
    return last > 0 and state.get("global_step", 0) >= last
