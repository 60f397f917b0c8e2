"""Compose a config the way the CLI does, and turn Hydra/OmegaConf failures into errors for people.

The CLI composes once here before handing over to `hydra.main`, so that a bad key, type or value
fails fast (before any model loads), exits non-zero and names the key with the closest valid one.
"""

from __future__ import annotations

import copy
import re
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from tuneforge.config import library_keys, peer_keys, recipes
from tuneforge.config.errors import ConfigError, closest
from tuneforge.config.paths import conf_dir
from tuneforge.config.schemas import GROUPS, MixSourceConfig, TuneforgeConfig, register_configs, schema_keys
from tuneforge.config.validation import normalize, validate, validate_choices

# The schema each primary config (conf/NAME.yaml) is merged into: `train`'s, and each command's own
# (register_schema, from the command table).
SCHEMAS: dict[str, type] = {"config": TuneforgeConfig}


def register_schema(config_name: str, schema: type) -> None:
    """A command's config schema, for conf/<config_name>.yaml (whose defaults name <config_name>_schema)."""
    SCHEMAS[config_name] = schema
    if config_name != "config":
        ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)


def _is_mapping(tp) -> bool:
    """Dict[...] or Optional[Dict[...]]: a free-form mapping (new sub-keys are legal)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return any(_is_mapping(a) for a in args if a is not type(None))
    return origin is dict or tp is dict


def mapping_keys(schema: Any, prefix: str = "") -> list[str]:
    """Dotted keys of a schema whose values are free-form mappings: data.columns, peft.rank_pattern, ..."""
    out = []
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        tp = hints[f.name]
        if _is_mapping(tp):
            out.append(prefix + f.name)
        elif is_dataclass(tp):
            out += mapping_keys(tp, f"{prefix}{f.name}.")
    return out


def _in_mapping(key: str, schema_cls: Any) -> bool:
    """`key` is a mapping key of the schema, or a key inside one (data.mix.N.columns included)."""
    mappings = mapping_keys(schema_cls)
    return (any(key == m or key.startswith(m + ".") for m in mappings)
            or (schema_cls is TuneforgeConfig and re.fullmatch(r"data\.mix\.\d+\.columns(\..+)?", key) is not None))


def _as_mapping_overrides(overrides: list[str], schema_cls: Any) -> list[str]:
    """`data.columns={a: b}` and `data.columns.a=b` the Hydra way: a plain override of (a key inside) a mapping,
    or a mapping value, merges with new keys allowed (`++`), where Hydra alone would refuse a key the default
    mapping lacks."""
    def merges(ov) -> bool:
        return _in_mapping(ov.key_or_group, schema_cls) or (not ov.is_sweep_override() and isinstance(ov.value(), dict))

    return ["++" + raw if not raw.startswith(("+", "~")) and merges(ov) else raw
            for raw, ov in zip(overrides, _parse(overrides))]


def register_all() -> None:
    """Schemas + recipes into Hydra's ConfigStore (idempotent)."""
    register_configs()
    cs = ConfigStore.instance()
    # Recipes live in the top-level recipes/ directory (and the user's recipe folders), not under conf/: register
    # each one as the `recipe` group so `recipe=NAME` works the same for editable and regular installs.
    for name, (path, _) in recipes.available().items():
        cs.store(group="recipe", name=name, node=recipes.load(path), package="_global_")


def group_options(group: str) -> list[str]:
    """Names selectable for a config group (`model=NAME`)."""
    if group == "recipe":
        return sorted({*recipes.available(), *_recipe_files})
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


# Recipe files given by path in this process: {stored name: file}.
_recipe_files: dict[str, Path] = {}


def _recipe_name(value: str) -> str:
    """A `recipe=` value as Hydra's option name: a recipe file (by path, or a user recipe by name) is stored under a
    name of its own first. A user recipe by name too: Hydra itself would find one in `--config-dir DIR`/recipe/
    and package it under `recipe.` unless its file starts with `# @package _global_`."""
    user = recipes.available().get(value)
    if not recipes.is_path(value) and not (user and user[1] == "user"):
        return value
    path = user[0] if user and not recipes.is_path(value) else Path(value).expanduser()
    name = recipes.store_name(path)
    _recipe_files[name] = path
    ConfigStore.instance().store(group="recipe", name=name, node=recipes.load(path), package="_global_")
    return name


def recipe_files(overrides: list[str]) -> list[str]:
    """`recipe=path/to/file.yaml` (a sweep of files too) rewritten to the name the file is stored under."""
    out = []
    for raw, ov in zip(overrides, _parse(overrides)):
        if ov.key_or_group != "recipe" or ov.is_delete() or raw.startswith("+"):
            out.append(raw)
        elif ov.is_sweep_override():
            out.append("recipe=" + ",".join(_recipe_name(v) for v in ov.sweep_string_iterator()))
        else:
            out.append(f"recipe={_recipe_name(str(ov.value()))}")
    return out


def first_job_overrides(overrides: list[str]) -> list[str]:
    """A multirun's overrides with every sweep at its first value: what its first job composes."""
    return _sweep_variants(overrides)[0][1]


def _sweep_variants(overrides: list[str]) -> list[tuple[str, list[str]]]:
    """For a multirun: the overrides with every sweep at its first value, then once per other value of each sweep
    (the rest at their first), each labelled with the value it checks: every value a job would get is validated
    before the first job starts (a bad third value is one line and exit 2, not a failed job among good ones).
    Values of different sweeps are not combined: a sweep's size grows as their product."""
    parsed = _parse(overrides)
    values = []
    for raw, ov in zip(overrides, parsed):
        if ov.is_sweep_override():
            try:
                values.append([f"{ov.get_key_element()}={v}" for v in ov.sweep_string_iterator()] or [raw])
            except Exception:  # interval()/range sweeps of sweeper plugins: leave them to the job
                values.append(None)
        else:
            values.append([raw])
    first = [v[0] for v in values if v]
    variants = [("", first)]
    for i, vals in enumerate(values):
        for value in (vals or [])[1:]:
            at = sum(1 for v in values[:i] if v)
            variants.append((value, first[:at] + [value] + first[at + 1:]))
    return variants


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
        if key in valid or _in_mapping(key, schema) or _valid_list_item(key):
            continue
        raise ConfigError(unknown_key_message(key, valid | groups))


def unknown_key_message(key: str, valid: set[str]) -> str:
    """Why `key` is not a key, and the closest one: a library key tuneforge sets itself names the tuneforge key
    that replaces it; a renamed one its new name; an Axolotl or LLaMA-Factory key name what it is in tuneforge
    (config/peer_keys.py, the table `tuneforge import` uses); a key of another section that section's (train.lora_r ->
    peft.r); else the nearest name in the same section, then anywhere."""
    section, _, leaf = key.partition(".")
    if section in library_keys.SECTIONS and leaf:
        sec = library_keys.SECTIONS[section]
        if leaf in sec.owned:
            return f"{key} is set by tuneforge itself; use {sec.owned[leaf]}."
        if leaf in sec.renamed:
            return f"unknown config key '{key}' (configs are strict): use {sec.renamed[leaf]}."
    strict = f"unknown config key '{key}' (configs are strict)."
    name = leaf or section
    peer = peer_keys.explain(name)
    if peer and (not leaf or section not in {k.partition(".")[0] for k in valid}):  # a pasted Axolotl/LLaMA-Factory key
        return f"unknown config key '{key}': {peer}"
    same_leaf = sorted(k for k in valid if leaf and k.rsplit(".", 1)[-1] == leaf and k != key)
    if same_leaf:
        return f"{strict} Did you mean '{same_leaf[0]}'?"
    if peer:  # a peer's name under a tuneforge section (train.lora_r)
        target = peer_keys.lookup(name)[0][1].target
        return f"{strict} Did you mean {target}? ({peer})" if target else f"{strict} {peer}"
    for sec in library_keys.SECTIONS.values():
        if leaf in sec.renamed:
            return f"{strict} Did you mean {sec.renamed[leaf]}?"
    in_section = sorted(k for k in valid if k.startswith(section + "."))
    return strict + (closest(key, in_section) or closest(key, sorted(valid)))


def explain(exc: BaseException) -> str:
    """The most specific message in an exception chain, with the full key when OmegaConf knows it."""
    chain = []
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in reversed(chain):
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            first = str(e).splitlines()[0]
            if isinstance(e, ConfigKeyError) and " not in " in first:  # a key in a YAML file the schema lacks
                return unknown_key_message(e.full_key, set(schema_keys(TuneforgeConfig)))
            return f"{e.full_key}: {first}"
    return str(chain[0]).strip()


def compose_config(overrides: list[str] | None = None, config_name: str = "config", return_hydra: bool = False):
    """Compose + check keys and types (no value rules). Returns the DictConfig."""
    overrides = list(overrides or [])
    register_all()
    overrides = recipe_files(overrides)
    check_override_keys(overrides, SCHEMAS[config_name])
    overrides = _as_mapping_overrides(overrides, SCHEMAS[config_name])
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="tuneforge"):
            return compose(config_name=config_name, overrides=overrides, return_hydra_config=return_hydra)
    except ConfigError:
        raise
    except Exception as exc:  # Hydra/OmegaConf composition errors
        raise ConfigError(explain(exc)) from exc
    finally:
        GlobalHydra.instance().clear()


def load_config(overrides: list[str] | None = None, multirun: bool = False) -> TuneforgeConfig:
    """The validated `train` config for these overrides (what every command that trains uses)."""
    overrides = list(overrides or [])
    if not multirun:
        return to_validated(compose_config(overrides))
    variants = _sweep_variants(overrides)
    for label, variant in variants[1:]:
        try:
            to_validated(compose_config(variant))
        except ConfigError as exc:
            raise ConfigError(f"sweep value {label}: {exc}") from None
    return to_validated(compose_config(variants[0][1]))


def checked(overrides: list[str], config_name: str = "config", multirun: bool = False) -> Any:
    """The config a command would run with, composed and checked before Hydra starts: the validated train config,
    or a command's own config as its dataclass."""
    if config_name == "config":
        return load_config(overrides, multirun=multirun)
    return OmegaConf.to_object(compose_config(overrides, config_name=config_name))


# The last config validated in this process, by its YAML: the CLI checks a config before Hydra runs, and the job
# Hydra then starts composes the same one again; it is validated once.
_validated: dict[str, TuneforgeConfig] = {}


def to_validated(cfg) -> TuneforgeConfig:
    """DictConfig (from Hydra) -> validated TuneforgeConfig (normalised, `auto` settings decided for this device)."""
    try:
        plain = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
        key = OmegaConf.to_yaml(plain)
        if key in _validated:
            return copy.deepcopy(_validated[key])
        obj = normalize(OmegaConf.to_object(plain))
    except OmegaConfBaseException as exc:
        raise ConfigError(explain(exc)) from exc
    from tuneforge.config import device

    validate_choices(obj)  # legal names first: the device defaults read them
    # `auto` settings depend on the device the job runs on, so they are decided here, in the job.
    checked = validate(device.resolve(obj))
    _validated.clear()
    _validated[key] = checked
    return copy.deepcopy(checked)


# Hydra flags that take a value (the next argument is theirs, not an override).
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun", "--shell-completion", "-sc"}


def split_args(args: list[str]) -> tuple[list[str], list[str], bool]:
    """(hydra flags, overrides, multirun?)"""
    flags, overrides, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            flags.append(arg)
            if arg in _FLAGS_WITH_VALUE and i + 1 < len(args) and not args[i + 1].startswith("-") and "=" not in args[i + 1]:
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides, any(f in ("-m", "--multirun") for f in flags)


# Keys whose values are a person's text (a prompt), never Hydra syntax.
FREE_TEXT_KEYS = ("prompt", "answer")


def _hydra_quoted(text: str) -> str:
    """`text` as one single-quoted Hydra value that parses back to exactly `text`: quotes and `${` (which OmegaConf
    would resolve) escaped, and the backslashes before them or at the end doubled (Hydra's and OmegaConf's rule)."""
    escaped = {"'": "\\'", "${": "\\${", "": ""}
    return "'" + re.sub(r"(\\*)('|\$\{|\Z)", lambda m: m.group(1) * 2 + escaped[m.group(2)], text) + "'"


def quote_free_text(args: list[str]) -> list[str]:
    """`prompt=Rewrite this date (YYYY-MM-DD): July 4th, 1976` (or `answer=...`) as Hydra would need it typed:
    quoted. Without this, parentheses, commas, spaces or quotes in a prompt failed as a Hydra grammar error. A value
    the user already quoted the Hydra way is left as it is."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
        out.append(f"{key}={_hydra_quoted(value)}" if eq and key in FREE_TEXT_KEYS and not quoted else arg)
    return out


def hydra_args(args: list[str], config_name: str = "config") -> list[str]:
    """The command line for Hydra itself with its mapping overrides merged the way compose_config merges them
    (`peft.rank_pattern={q_proj: 8}`), so a run composes exactly what was checked."""
    _, overrides, _ = split_args(args)
    merged = dict(zip(overrides, _as_mapping_overrides(recipe_files(overrides), SCHEMAS[config_name])))
    return [merged.get(arg, arg) for arg in args]
