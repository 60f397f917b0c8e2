"""Secrets never reach a file: which keys hold them, their values redacted in configs, override lists and the
command line, and the hub token handed to huggingface_hub through the environment of this process only."""

from __future__ import annotations

import os
import re
import shlex
import sys
from typing import Any, Optional

REDACTED = "***REDACTED***"


# Tokenizer special-token names end in `_token` but are vocabulary, not credentials.
_NOT_SECRET = {"pad_token", "bos_token", "eos_token", "unk_token", "sep_token", "cls_token", "mask_token",
               "add_special_tokens", "add_tokens"}


_SECRET_KEY = re.compile(r"(?:^|_)(?:token|api_key|apikey|secret|password)$", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """`model.token`, `hf_token`, `wandb_api_key`, ... (the last dotted part decides)."""
    name = str(key).rsplit(".", 1)[-1].lstrip("+~")
    return name not in _NOT_SECRET and bool(_SECRET_KEY.search(name))


def redact(obj: Any) -> Any:
    """A copy of a config mapping with the values of secret keys replaced (None stays None), and
    `key=value` pairs inside strings (override lists, Hydra's override_dirname) redacted too."""
    if isinstance(obj, dict):
        return {k: (REDACTED if v is not None and is_secret_key(k) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_arg(obj)
    return obj


_PAIR = re.compile(r"([+~]?[\w.\-/]+)=([^,\s]+)")


def redact_arg(arg: str) -> str:
    """`model.token=hf_abc` -> `model.token=***REDACTED***`, wherever such a pair occurs in the string."""
    if "=" not in arg:
        return arg
    key, _, value = arg.partition("=")
    if value and is_secret_key(key.strip().lstrip("- ")):  # one argument: all of its value
        return f"{key}={REDACTED}"
    return _PAIR.sub(lambda m: f"{m.group(1)}={REDACTED}" if is_secret_key(m.group(1)) else m.group(0), arg)


_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")


def redact_url(url: str) -> str:
    """`postgresql://user:pw@host/db` -> `postgresql://user:***REDACTED***@host/db` (a storage URL in a file)."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}{REDACTED}@", url)


def command_line(argv: Optional[list[str]] = None) -> str:
    argv = list(sys.argv if argv is None else argv)
    return " ".join(argv[:1] + [shlex.quote(redact_arg(a)) for a in argv[1:]])


# A secret a command line may carry -> the environment variable its library reads it from.
SECRET_ENV = {"model.token": "HF_TOKEN"}


def withhold_secrets(args: list[str]) -> tuple[list[str], dict[str, Optional[str]]]:
    """The command line Hydra gets, with the secrets redacted; they go to this process's environment instead (its
    launched ranks inherit it): Hydra writes its overrides into .hydra/ and multirun.yaml and prints a sweep's job
    list before any tuneforge code runs in a job, and on a sweep it refuses, no job ever runs to redact them.
    Returns (args, the environment's previous values, for `restore_environment`)."""
    kept, previous = [], {}
    for arg in args:
        key, eq, value = arg.partition("=")
        env = SECRET_ENV.get(key.lstrip("+~"))
        if not eq or env is None:
            kept.append(arg)
            continue
        value = value.strip("'\"")
        if not value or value.lower() in ("null", "none", REDACTED.lower()):
            kept.append(arg)
            continue
        previous.setdefault(env, os.environ.get(env))
        os.environ[env] = value
        kept.append(f"{key}='{REDACTED}'")  # what every file and the job list show: a secret was given
    return kept, previous


def restore_environment(previous: dict[str, Optional[str]]) -> None:
    for env, value in previous.items():
        if value is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = value


def use_token(model_cfg) -> None:
    """model.token -> HF_TOKEN for this process only (huggingface_hub reads it); never written anywhere."""
    token = getattr(model_cfg, "token", None)
    if token and token != REDACTED:
        os.environ["HF_TOKEN"] = token
