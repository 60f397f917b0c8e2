"""The one mapping from a config section to the library object it feeds: the task's trainer config
(SFTConfig, TrainingArguments, ...), LoraConfig and BitsAndBytesConfig.

Every key of the section that is a field of the target class is passed by its own name; what tuneforge
decides on top (the run directory, `auto` values, what its data stage already did) is listed in
`trainer_decisions`, the one place that says what differs from passing the user's keys through.
`check(cfg)` builds all three without a model, so a value or combination the library refuses fails before
anything loads.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from pathlib import Path
from typing import Any, Optional

from tuneforge.config import library_keys
from tuneforge.config.device import accelerator_available, compute_dtype, resolved_bf16
from tuneforge.config.errors import ConfigError, closest
from tuneforge.config.tasks import task


def library_class(target: str) -> type:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def trainer_target(name: str) -> str:
    """`module:Class` of the trainer config of `task=name`."""
    return task(name).trainer_config


def section_kwargs(section: library_keys.Section, values: Any, target: str) -> dict[str, Any]:
    """The section's values for the fields of `target`: every library field by its name, except the keys
    tuneforge applies itself and the nulls that mean "the library's own default"."""
    keys = section.keys()
    fields = library_keys.library_fields(target)
    out = {}
    for name in fields:
        if name not in keys or name in section.applied:
            continue
        value = getattr(values, name)
        if keys[name]["unset_none"] and (value is None or (value == {} and fields[name]["default"] is None)):
            continue  # not set: the library's own default
        out[name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    """OmegaConf containers (a DictConfig section) -> plain lists and dicts, which the libraries expect."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _nested(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A mapping given for a field typed as a nested config class (LoraConfig.eva_config: EvaConfig, ...)
    becomes that class, as the library expects."""
    hints = typing.get_type_hints(cls)
    for name, value in kwargs.items():
        if not isinstance(value, dict):
            continue
        hint = hints.get(name)
        members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if any(m is dict or typing.get_origin(m) is dict for m in members):
            continue  # the library takes the mapping as it is (LoraConfig.loftq_config)
        for member in members:
            if isinstance(member, type) and dataclasses.is_dataclass(member):
                kwargs[name] = member(**value)
                break
    return kwargs


# --- the trainer config ------------------------------------------------------------------------------------

def trainer_decisions(cfg, run_dir: Path) -> dict[str, Any]:
    """What tuneforge sets in the trainer config itself, over the user's keys. Each entry says why."""
    t = cfg.train
    accel = accelerator_available()
    decided: dict[str, Any] = {
        "output_dir": str(run_dir),
        # auto values (library_keys.TRAIN.defaults gives the reasons).
        "bf16": resolved_bf16(t),
        "use_cpu": (not accel) if t.use_cpu is None else t.use_cpu,
        "dataloader_pin_memory": accel if t.dataloader_pin_memory is None else t.dataloader_pin_memory,
        "data_seed": t.seed if t.data_seed is None else t.data_seed,
        "use_liger_kernel": bool(t.use_liger_kernel),
        "report_to": report_to_list(t.report_to),
        # Checkpointing is applied to the model before LoRA wraps it (models/adapters.enable_checkpointing);
        # transformers 5.25 names the switch activation_checkpointing, earlier releases gradient_checkpointing.
        "activation_checkpointing": False,
        "gradient_checkpointing": False,
        # NaN/inf must show in the logs (faults.StopOnNaN stops on it), not be averaged away.
        "logging_nan_inf_filter": False,
    }
    decided |= task(cfg.task).trainer_settings(cfg)
    fields = library_keys.library_fields(trainer_target(cfg.task))
    return {k: v for k, v in decided.items() if k in fields}


def report_to_list(report_to) -> list[str]:
    """train.report_to as the list the Trainer takes: a name or a list of names; none is none of them."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [] if names == ["none"] else names


def trainer_arguments(cfg, run_dir: Path):
    """The task's trainer config (SFTConfig for sft, TrainingArguments for classification) for `train.*`."""
    target = trainer_target(cfg.task)
    kwargs = section_kwargs(library_keys.TRAIN, cfg.train, target) | trainer_decisions(cfg, run_dir)
    cls = library_class(target)
    return _build(cls, _nested(cls, kwargs), "train")


def checkpointing_kwargs(train) -> dict[str, Any]:
    """The kwargs of the checkpointing call: the user's `train.gradient_checkpointing_kwargs`, non-reentrant
    unless said otherwise (validation refuses use_reentrant=true: frozen inputs and PEFT break with it)."""
    return {"use_reentrant": False, **(_plain(train.gradient_checkpointing_kwargs) or {})}


# --- PEFT and bitsandbytes ---------------------------------------------------------------------------------

LORA = "peft:LoraConfig"
BNB = "transformers:BitsAndBytesConfig"


def lora_config(peft_cfg, task_type: str = "CAUSAL_LM", new_token_ids: Optional[list[int]] = None):
    """LoraConfig from `peft.*`; the task type and the new tokens' rows are tuneforge's."""
    kwargs = section_kwargs(library_keys.PEFT, peft_cfg, LORA)
    # Only the new rows of the embedding train (not the whole matrix, as modules_to_save would).
    kwargs["trainable_token_indices"] = list(new_token_ids) if new_token_ids and peft_cfg.train_new_tokens else None
    kwargs["task_type"] = task_type
    cls = library_class(LORA)
    return _build(cls, _nested(cls, kwargs), "peft")


def is_quantized(quant) -> bool:
    return bool(quant.load_in_4bit or quant.load_in_8bit)


def quantization_config(quant):
    """BitsAndBytesConfig from `quant.*` (None without 4- or 8-bit): dtype names become torch dtypes."""
    if not is_quantized(quant):
        return None
    import torch

    kwargs = section_kwargs(library_keys.QUANT, quant, BNB)
    kwargs["bnb_4bit_compute_dtype"] = compute_dtype(quant.bnb_4bit_compute_dtype)
    if quant.bnb_4bit_quant_storage:
        kwargs["bnb_4bit_quant_storage"] = getattr(torch, quant.bnb_4bit_quant_storage)
    return _build(library_class(BNB), kwargs, "quant")


def _build(cls: type, kwargs: dict[str, Any], section: str):
    import warnings

    try:
        with warnings.catch_warnings():
            # transformers 5.25 warns that `gradient_checkpointing` is deprecated whenever TRL's config class
            # passes it; tuneforge sets it to false and applies checkpointing itself.
            warnings.filterwarnings("ignore", message=r"`gradient_checkpointing` is deprecated", category=FutureWarning)
            return cls(**kwargs)
    except (ValueError, TypeError, NotImplementedError) as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(f"{section}.*: {cls.__name__} refused these settings: {message}") from None


def check(cfg) -> None:
    """Build every library object of a run without a model: the libraries' own checks, before anything loads."""
    trainer_arguments(cfg, Path("/nonexistent/tuneforge-check"))
    if cfg.peft.method == "lora":
        lora_config(cfg.peft)
    quantization_config(cfg.quant)


def foreign_keys(cfg) -> list[str]:
    """`train.*` keys set to a non-default value that the task's trainer config does not have."""
    fields = library_keys.library_fields(trainer_target(cfg.task))
    keys = library_keys.TRAIN.keys()
    out = []
    for name, key in keys.items():
        if key["origin"] == ["tuneforge"] or name in fields or name in library_keys.TRAIN.every_task:
            continue
        if _plain(getattr(cfg.train, name)) != key["default"]:
            out.append(name)
    return out


def refuse_foreign_keys(cfg) -> None:
    foreign = foreign_keys(cfg)
    if foreign:
        target = trainer_target(cfg.task).partition(":")[2]
        owners = {o for name in foreign for o in library_keys.TRAIN.keys()[name]["origin"]}
        raise ConfigError(f"train.{foreign[0]} is a {'/'.join(sorted(owners))} key, but task={cfg.task} trains with "
                          f"{target}, which has no {foreign[0]}{' (also set: ' + ', '.join(foreign[1:]) + ')' if foreign[1:] else ''}. "
                          f"Remove it, or choose the task it belongs to.{closest(foreign[0], library_keys.library_fields(trainer_target(cfg.task)))}")
