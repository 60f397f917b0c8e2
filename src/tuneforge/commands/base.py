"""What a command is, and the two ways a command reads its arguments.

A command declares a `Command` (its name, one-line summary and `main(args) -> exit code`). Most commands are
Hydra apps over the shipped configs (`hydra_command`): their overrides are composed and validated here before
Hydra runs, so a bad key, type or value fails in a fraction of a second with a message that names the key and the
closest valid one, before any model is loaded. The others take a path and flags (`argparse_main`).

Every user error is one line and exit 2 (a `ConfigError`, or a usage error); a stopped run exits with its own
documented code (tasks/lifecycle.exit_code); `--debug` (or HYDRA_FULL_ERROR=1) adds the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tuneforge.config.errors import ConfigError


@dataclass(frozen=True)
class Command:
    name: str
    # One line in `tuneforge --help`; `usage` lines follow it, indented.
    summary: str
    main: Callable[[list[str]], int]
    usage: str = ""


def debug() -> bool:
    """Full tracebacks asked for: `--debug`, or Hydra's own switch (which `--debug` sets)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def user_error(command: str, exc: BaseException) -> int:
    """One line for a failure the user can fix (and the traceback when asked for): exit 2."""
    if debug():
        traceback.print_exc()
    print(f"tuneforge {command}: config error: {exc}", file=sys.stderr)
    return 2


# --- commands over a Hydra config ------------------------------------------------------------------------------

# Hydra flags that only print (no pre-validation needed).
INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc"}
# Inspection commands make no run directory and no log file (user overrides still win).
INSPECT_ARGS = ("hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=stdout")


@dataclass(frozen=True)
class HydraSpec:
    name: str
    # conf/<config_name>.yaml, merged into `schema` (registered in Hydra's ConfigStore as <config_name>_schema).
    config_name: str
    schema: type
    # The job: called with the composed config (a DictConfig; `validated` turns it into the checked dataclass).
    app: Callable[[Any], Any]
    # The command line as typed -> what Hydra reads (short forms, flags people expect, quoting).
    rewrite_args: Callable[[list[str]], list[str]] = lambda args: args
    # Checks of the composed, validated config before Hydra starts (e.g. claiming an explicit run directory).
    precheck: Callable[[Any, list[str], bool], None] = lambda cfg, overrides, multirun: None
    # After the command, whatever happened (in-process callers run several commands).
    cleanup: Callable[[], None] = lambda: None
    extra_args: tuple[str, ...] = field(default=())


def hydra_command(name: str, summary: str, usage: str = "", **spec: Any) -> Command:
    """A command that is a Hydra app (see HydraSpec for the keyword arguments); its schema is registered for
    conf/<config_name>.yaml here, so that importing the command is enough to compose its config."""
    from tuneforge.config import compose

    hydra_spec = HydraSpec(name=name, **spec)
    compose.register_schema(hydra_spec.config_name, hydra_spec.schema)
    return Command(name, summary, lambda args: run_hydra_command(hydra_spec, args), usage)


def run_hydra_command(spec: HydraSpec, args: list[str]) -> int:
    from tuneforge.config import compose, recipes
    from tuneforge.runs.redaction import restore_environment, withhold_secrets

    args = list(spec.extra_args) + spec.rewrite_args(args)
    flags, overrides, multirun = compose.split_args(args)
    previous = {}
    try:
        recipes.use_flags(flags)
        if not set(flags) & INFO_FLAGS:
            cfg = compose.checked(overrides, spec.config_name, multirun=multirun)
            spec.precheck(cfg, overrides, multirun)
        args, previous = withhold_secrets(args)  # checked above; Hydra never sees them
        _run_hydra(spec, args)
    except ConfigError as exc:
        return user_error(spec.name, exc)
    finally:
        restore_environment(previous)
        spec.cleanup()
    return 0


def _run_hydra(spec: HydraSpec, args: list[str]) -> None:
    import hydra

    from tuneforge.config.compose import hydra_args, register_all
    from tuneforge.config.paths import conf_dir

    register_all()
    sys.argv = [f"tuneforge {spec.name}"] + hydra_args(args, spec.config_name)
    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=spec.config_name)(friendly(spec.app))()


def friendly(app: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Failures a user can cause, found inside a job (e.g. a taken run directory, a stopped run), exit with
    their documented code after one clear line (lifecycle.exit_code), and no traceback unless asked for
    (a bug's traceback, exit_code None, is its report: Hydra prints it)."""

    def wrapped(dcfg):
        from tuneforge.tasks.lifecycle import exit_code

        try:
            return app(dcfg)
        except Exception as exc:
            code = exit_code(exc)
            if code is None:
                raise
            sys.exit(code)  # SystemExit passes Hydra's job wrapper untouched: no "Error executing job"

    wrapped.__name__ = app.__name__
    return wrapped


def as_object(dcfg) -> Any:
    """A composed command config as its dataclass (the schema's types already checked by Hydra)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(dcfg)


# --- the paths a command reads and writes, checked before anything loads -------------------------------------

def input_file(key: str, path: str) -> Path:
    """A file the command reads: it exists and is a file, else one line naming the key."""
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise ConfigError(f"{key}={path}: {what} (relative paths start at {Path.cwd()}); give an existing file.")
    return p


def output_path(key: str, path: str) -> Path:
    """A file or folder the command creates: its parent folder exists and is writable, else one line naming the
    key (a typo in a folder name fails here, not after minutes of loading)."""
    p = Path(path).expanduser()
    parent = p.absolute().parent
    if not parent.is_dir():
        raise ConfigError(f"{key}={path}: the folder {parent} does not exist; create it or choose another {key}.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: the folder {parent} is not writable; choose another {key}.")
    return p


# --- commands over a path and flags ----------------------------------------------------------------------------

def argparse_main(name: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace, list[str]], int],
                  known_only: bool = True) -> Callable[[list[str]], int]:
    """main(args) for an argparse command: a usage error is argparse's two lines and exit 2, a ConfigError one
    line and exit 2; `known_only=False` passes the arguments argparse does not know on to `run` (overrides)."""

    def main(args: list[str]) -> int:
        try:
            namespace, rest = (parser.parse_args(args), []) if known_only else parser.parse_known_args(args)
        except SystemExit as exc:  # --help (0) or a usage error (2): argparse has printed why
            return exc.code if isinstance(exc.code, int) else 2
        try:
            return run(namespace, rest)
        except ConfigError as exc:
            return user_error(name, exc)

    return main


def parser(name: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"tuneforge {name}", description=description)
