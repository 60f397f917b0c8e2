"""Your own code in a run, imported strictly (a name that does not import is an error, never replaced by something
else): TrainerCallbacks, `callbacks=[my_package.module:MyCallback]` (each class is imported and instantiated without
arguments, then added to the Trainer after tuneforge's own callbacks), and functions such as reward functions
(`rewards=[{name: my_rewards:score}]`, eval/rewards.py checks what they take and return)."""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any, Callable

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


def is_path(name: str) -> bool:
    """`name` has the shape module:function (else it names something built in)."""
    return isinstance(name, str) and bool(_PATH.fullmatch(name))


def load_function(path: str, key: str) -> Callable[..., Any]:
    """The function `module:function`, imported with the working directory on sys.path (as TRL does: a file next
    to your recipe imports). Anything short of a callable is a ConfigError naming `key`, never a fallback."""
    module, _, name = path.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        found = importlib.import_module(module)
    except Exception as exc:  # any failure inside the user's module is the user's to see, with its cause
        raise ConfigError(f"{key}: cannot import module {module!r} of {path} ({type(exc).__name__}: {exc}); is it "
                          f"a file in the working directory ({cwd}) or a package on PYTHONPATH?") from None
    if not hasattr(found, name):
        public = [n for n in dir(found) if not n.startswith("_") and callable(getattr(found, n))]
        raise ConfigError(f"{key}: module {module!r} ({getattr(found, '__file__', '?')}) has no {name!r}; its "
                          f"functions: {', '.join(public) or 'none'}.")
    fn = getattr(found, name)
    if not callable(fn):
        raise ConfigError(f"{key}: {path} is a {type(fn).__name__}, not a function.")
    return fn
