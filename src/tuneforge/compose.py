"""Compose a config the way the CLI does, and turn Hydra/OmegaConf failures into errors for people.

The CLI composes once here before handing over to `hydra.main`, so that a bad key, type or value
fails fast (before any model loads), exits non-zero and names the key with the closest valid one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tuneforge.config import (
    GROUPS,
    ConfigError,
    EvaluateConfig,
    InferConfig,
    MergeCommandConfig,
    MixSourceConfig,
    TuneforgeConfig,
    closest,
    register_configs,
    schema_keys,
)
from tuneforge.paths import conf_dir, recipes_dir
from tuneforge.validation import validate

SCHEMAS = {"config": TuneforgeConfig, "infer": InferConfig, "evaluate": EvaluateConfig,
           "merge": MergeCommandConfig}
# Keys whose values are free-form mappings (new sub-keys are legal).
_MAPPING_KEYS = ("data.columns",)


def register_all() -> None:
    """Schemas + recipes into Hydra's ConfigStore (idempotent)."""
    register_configs()
    cs = ConfigStore.instance()
    # Recipes live in the top-level recipes/ directory, not under conf/: register each one as the
    # `recipe` group so `recipe=NAME` works the same for editable and regular installs.
    for path in sorted(recipes_dir().glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")


def group_options(group: str) -> list[str]:
    """Names selectable for a config group (`model=NAME`)."""
    if group == "recipe":
        return sorted(p.stem for p in recipes_dir().glob("*.yaml"))
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def _first_of_sweeps(overrides: list[str]) -> list[str]:
    """For a multirun, check the first value of every sweep; each job is validated again when it runs."""
    parsed = _parse(overrides)
    out = []
    for raw, ov in zip(overrides, parsed):
        if ov.is_sweep_override():
            try:
                first = next(iter(ov.sweep_string_iterator()))
            except Exception:  # interval()/range sweeps of sweeper plugins: leave them to the job
                continue
            out.append(f"{ov.get_key_element()}={first}")
        else:
            out.append(raw)
    return out


def _parse(overrides: list[str]):
    try:
        return OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as exc:
        raise ConfigError(
            f"{str(exc).splitlines()[0]} -- values with brackets, commas or spaces need quotes, "
            "e.g. data.split='train[:100]'"
        ) from None


def _valid_list_item(key: str) -> bool:
    """`data.mix.0.weight=...`: an element of a list-of-dataclass key."""
    match = re.fullmatch(r"data\.mix\.\d+(?:\.(.+))?", key)
    return bool(match) and (match.group(1) is None or match.group(1) in schema_keys(MixSourceConfig))


def check_override_keys(overrides: list[str], schema: Any) -> None:
    """Reject unknown keys and group options before composing, with a suggestion."""
    valid = set(schema_keys(schema))
    groups = set(GROUPS) | {"recipe", "launcher"} if schema is TuneforgeConfig else set()
    for ov in _parse(overrides):
        key = ov.key_or_group
        if key.startswith("hydra.") or key == "hydra" or key.startswith("hydra/"):
            continue
        if key in groups and not ov.is_delete():
            options = group_options(key)
            for value in ([ov.value()] if not ov.is_sweep_override() else list(ov.sweep_string_iterator())):
                if isinstance(value, str) and value not in options:
                    raise ConfigError(
                        f"{key}={value}: no such {key} config. Available: {', '.join(options) or '(none)'}."
                        f"{closest(value, options)}"
                    )
            continue
        if key in valid or any(key.startswith(m + ".") for m in _MAPPING_KEYS) or _valid_list_item(key):
            continue
        candidates = sorted(valid | groups)
        raise ConfigError(f"unknown config key '{key}' (configs are strict).{closest(key, candidates)}")


def _explain(exc: BaseException) -> str:
    """The most specific message in an exception chain, with the full key when OmegaConf knows it."""
    chain = []
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in reversed(chain):
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            first = str(e).splitlines()[0]
            return f"{e.full_key}: {first}"
    return str(chain[0]).strip()


def compose_config(overrides: list[str] | None = None, config_name: str = "config", return_hydra: bool = False):
    """Compose + check keys and types (no value rules). Returns the DictConfig."""
    overrides = list(overrides or [])
    register_all()
    check_override_keys(overrides, SCHEMAS[config_name])
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="tuneforge"):
            return compose(config_name=config_name, overrides=overrides, return_hydra_config=return_hydra)
    except ConfigError:
        raise
    except Exception as exc:  # Hydra/OmegaConf composition errors
        raise ConfigError(_explain(exc)) from exc
    finally:
        GlobalHydra.instance().clear()


def load_config(overrides: list[str] | None = None, multirun: bool = False) -> TuneforgeConfig:
    """The validated `train` config for these overrides (what every command that trains uses)."""
    overrides = list(overrides or [])
    if multirun:
        overrides = _first_of_sweeps(overrides)
    return to_validated(compose_config(overrides))


def to_validated(cfg) -> TuneforgeConfig:
    """DictConfig (from Hydra) -> validated TuneforgeConfig."""
    try:
        plain = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
        obj = OmegaConf.to_object(plain)
    except OmegaConfBaseException as exc:
        raise ConfigError(_explain(exc)) from exc
    from tuneforge import device_defaults

    # `auto` settings depend on the device the job runs on, so they are decided here, in the job.
    return validate(device_defaults.resolve(validate(obj)))


