"""Your own TrainerCallbacks in a run: `callbacks=[my_package.module:MyCallback]` (each class is imported and
instantiated without arguments, then added to the Trainer after tuneforge's own callbacks)."""

from __future__ import annotations

import importlib
import re

from tuneforge.config.errors import ConfigError

_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def check_paths(paths: list[str]) -> None:
    """The shape `module:Class` (imported when the run starts, not at config time: imports cost seconds)."""
    for path in paths:
        if not isinstance(path, str) or not _PATH.fullmatch(path):
            raise ConfigError(f"callbacks: {path!r} is not module:Class, e.g. callbacks=[my_package.hooks:PrintLoss].")


def load(paths: list[str]) -> list:
    """Instances of the named TrainerCallback classes."""
    from transformers import TrainerCallback

    out = []
    for path in paths:
        module, _, name = path.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"callbacks: cannot import {path} ({exc}); is its package on PYTHONPATH?") from None
        if not (isinstance(cls, type) and issubclass(cls, TrainerCallback)):
            raise ConfigError(f"callbacks: {path} is not a transformers TrainerCallback class.")
        out.append(cls())
    return out
