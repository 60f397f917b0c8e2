"""Config sections derived from the libraries they feed: `train.*` from TRL's SFTConfig (and the other tasks'
trainer configs), `peft.*` from PEFT's LoraConfig, `quant.*` from transformers' BitsAndBytesConfig.

Every field of those classes is a key of ours, by its own name and type, so a key added in a new library
release works without a change here. What tuneforge changes is written once, in the section tables at the
bottom: its own keys, the defaults it sets differently (each with the reason), the library keys it sets
itself (refused, naming the tuneforge key to use) and library keys that were renamed.

Reading a library class costs seconds of imports (trl imports transformers, peft, bitsandbytes...), which a
config error must not pay: what is read is cached as JSON under the tuneforge cache, keyed by the installed
versions of the libraries.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import importlib
import inspect
import json
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from tuneforge.config.errors import ConfigError
from tuneforge.config.tasks import TASKS

# Bump when the cached description's format changes.
SPEC_VERSION = 3
# The distributions whose code defines the described classes (SFTConfig inherits TrainingArguments, ...).
_DISTRIBUTIONS = ("trl", "transformers", "peft", "accelerate")

_PRIMITIVES = {"bool": bool, "int": int, "float": float, "str": str, "any": Any}


# --- reading a library class -------------------------------------------------------------------------------

def _json_default(value: Any) -> tuple[bool, Any]:
    """(representable, JSON value) of a library default."""
    if isinstance(value, enum.Enum):
        value = value.value
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False, None
    return True, value


def _primitive(tp: Any) -> Optional[str]:
    for name, py in _PRIMITIVES.items():
        if tp is py and name != "any":
            return name
    return None


def _kind(hint: Any) -> tuple[str, bool, Optional[list]]:
    """(kind, optional, choices) of a type hint, in the small vocabulary OmegaConf can check: bool, int, float,
    str, list[X], dict[str,X] (X one of those or any), or any (checked when the library object is built)."""
    if hint is Any or hint is None:
        return "any", True, None
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "str", False, [m.value for m in hint]
    if (name := _primitive(hint)) is not None:
        return name, False, None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        if all(isinstance(a, str) for a in args):
            return "str", False, list(args)
        return "any", True, None
    if origin in (Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        optional = len(members) < len(args)
        enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
        rest = [m for m in members if m not in enums]
        if enums and all(r is str for r in rest):  # `SchedulerType | str`: a string of the enum's values
            return "str", optional, [m.value for m in enums[0]]
        if set(members) == {int, float}:
            return "float", optional, None
        if len(members) == 1:
            kind, _, choices = _kind(members[0])
            return kind, optional or kind == "any", choices
        return "any", True, None
    if origin in (list, List) or hint is list:
        inner = _primitive(args[0]) if args else None
        return (f"list[{inner}]" if inner else "list[any]"), False, None
    if origin in (dict, Dict) or hint is dict:
        inner = _primitive(args[1]) if len(args) == 2 and args[0] is str else None
        return (f"dict[str,{inner}]" if inner else "dict[str,any]"), False, None
    return "any", True, None


def _describe(cls: type) -> dict[str, dict]:
    """{field: {kind, optional, default, choices, help}} of a library config class (dataclass fields, or the
    keyword arguments of its __init__ for classes that are not dataclasses, like BitsAndBytesConfig)."""
    out = {}
    # BitsAndBytesConfig is a dataclass by inheritance only (its one field, quant_method, is no keyword of its
    # own __init__): the fields describe a class only when they are what its __init__ takes.
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    if dataclasses.is_dataclass(cls) and params == {f.name for f in dataclasses.fields(cls) if f.init}:
        hints = typing.get_type_hints(cls)
        entries = []
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                continue  # required: none of the described classes has one
            entries.append((f.name, hints.get(f.name, Any), default, f.metadata.get("help", ""),
                            f.metadata.get("choices")))
    else:
        entries = [(p.name, p.annotation if p.annotation is not inspect.Parameter.empty else type(p.default),
                    p.default, "", None) for p in inspect.signature(cls.__init__).parameters.values()
                   if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty]
    for name, hint, default, help_text, listed in entries:
        kind, optional, choices = _kind(hint if hint is not type(None) else Any)
        if listed and kind == "str":  # TrainingArguments' metadata lists legal values of plain str fields
            choices = [str(c) for c in listed]
        representable, value = _json_default(default)
        if not representable:  # e.g. a nested config object: null here means "the library's default"
            kind, optional, value = "any", True, None
        out[name] = {"kind": kind, "optional": optional or value is None, "default": value,
                     "representable": representable, "choices": choices,
                     "help": " ".join(str(help_text).split())}
    return out


def _versions() -> dict[str, Optional[str]]:
    found = {}
    for dist in _DISTRIBUTIONS:
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = None
    return found


def _cache_file() -> Path:
    from tuneforge.config.paths import cache_dir

    key = hashlib.sha256(json.dumps([SPEC_VERSION, _versions()], sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "schemas" / f"{key}.json"


class MissingLibraryClass(ConfigError):
    """A task's trainer config that the installed library lacks (TRL's experimental ORPOConfig in another release)."""


@lru_cache(maxsize=1)
def _cached() -> dict[str, dict]:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def library_fields(target: str) -> dict[str, dict]:
    """The fields of `module:Class` (cached per library versions)."""
    cached = _cached()
    if target in cached:
        return cached[target]
    module, _, name = target.partition(":")
    import warnings

    with warnings.catch_warnings():  # importing some libraries warns about others; not the user's business
        warnings.simplefilter("ignore")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            dist = module.partition(".")[0]
            raise MissingLibraryClass(f"the installed {dist} {_versions().get(dist) or ''} has no {name} in {module} "
                                      f"(TRL 1.16 has it): install a {dist} release that has it, e.g. "
                                      f"pip install '{dist}==1.16.*'") from None
        described = _describe(cls)
    cached[target] = described
    _store(cached)
    return described


def _store(data: dict) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, sort_keys=True)
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs the next run the imports
        pass


# --- sections ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Own:
    """A key tuneforge adds (not a library field)."""

    annotation: Any
    default: Any
    doc: str


@dataclass(frozen=True)
class Default:
    """tuneforge's default for a library key, and why it differs from the library's."""

    value: Any
    why: str
    # The type when tuneforge's value needs a wider one than the library's (`None` = auto for a bool).
    annotation: Any = None


@dataclass
class Section:
    """One config section over one library class per task (`"*"`: every task)."""

    name: str
    classes: dict[str, str]
    own: dict[str, Own] = field(default_factory=dict)
    defaults: dict[str, Default] = field(default_factory=dict)
    # Library keys tuneforge sets itself: refused, with the tuneforge key that replaces them.
    owned: dict[str, str] = field(default_factory=dict)
    # Library keys tuneforge reads and applies itself instead of passing them on, and how.
    applied: dict[str, str] = field(default_factory=dict)
    # Names older library releases use, with what replaces them (other tools' names: config/peer_keys.py).
    renamed: dict[str, str] = field(default_factory=dict)
    # Library keys of one task's class that tuneforge itself reads for every task.
    every_task: dict[str, str] = field(default_factory=dict)
    _keys: Optional[dict] = field(default=None, repr=False, compare=False)

    def classes_for(self, task: str) -> list[str]:
        return [self.classes[task]] if task in self.classes else [self.classes["*"]]

    def library(self) -> dict[str, dict[str, dict]]:
        """{class target: its fields}, every task's class the installed libraries have (a task whose class is
        missing is refused by name when it is chosen: validation.validate_task)."""
        out = {}
        for target in dict.fromkeys(self.classes.values()):
            try:
                out[target] = library_fields(target)
            except MissingLibraryClass:
                continue
        return out

    def keys(self) -> dict[str, dict]:
        """Every key of the section: {name: {annotation, default, origin, unset_none, choices, help}}."""
        if self._keys is None:
            self._keys = self._derive_keys()
        return self._keys

    def _derive_keys(self) -> dict[str, dict]:
        merged: dict[str, dict] = {}
        for target, fields_ in self.library().items():
            for name, spec in fields_.items():
                if name in self.owned:
                    continue
                entry = merged.setdefault(name, {"specs": {}, "choices": spec["choices"], "help": spec["help"]})
                entry["specs"][target] = spec
        out = {}
        for name, entry in merged.items():
            specs = list(entry["specs"].values())
            first = specs[0]
            defaults = {json.dumps(s["default"], sort_keys=True) for s in specs}
            kinds = {(s["kind"], s["optional"]) for s in specs}
            kind, optional = first["kind"], first["optional"]
            choices = entry["choices"]
            if len(kinds) > 1 or any(s["choices"] != choices for s in specs):
                # One name, different meanings (SFTConfig's loss_type is "nll"|"dft", DPOConfig's a list of
                # losses): the task's class checks the value when it is built.
                kind, optional, choices = "any", True, None
            # Classes that disagree on a default (SFTConfig's learning rate is not TrainingArguments'): null
            # here means "the task's own library default".
            unset_none = len(defaults) > 1 or not all(s["representable"] for s in specs)
            default = None if unset_none else first["default"]
            if kind.startswith("dict[") and default is None:
                # OmegaConf cannot merge a mapping into a null typed mapping (`train.liger_kernel_config={a: b}`
                # fails): the empty mapping stands for "not set" instead, and is not passed on.
                default, unset_none, optional = {}, True, False
            annotation = _annotation(kind, optional or default is None)
            if name in self.defaults:
                d = self.defaults[name]
                default, unset_none = d.value, False
                annotation = d.annotation if d.annotation is not None else _annotation(kind, optional or d.value is None)
            out[name] = {"annotation": annotation, "default": default, "unset_none": unset_none,
                         "choices": choices, "help": entry["help"],
                         "origin": [t.partition(":")[2] for t in entry["specs"]],
                         "tuneforge_default": self.defaults[name].why if name in self.defaults else None}
        for name, own in self.own.items():
            out[name] = {"annotation": own.annotation, "default": own.default, "unset_none": False,
                         "choices": None, "help": own.doc, "origin": ["tuneforge"], "tuneforge_default": None}
        return dict(sorted(out.items()))

    def dataclass(self, class_name: str, module: str) -> type:
        """The typed schema Hydra merges this section into, importable (and so picklable) as module.class_name."""
        fields_ = []
        for name, key in self.keys().items():
            default = key["default"]
            if isinstance(default, (list, dict)):
                spec = field(default_factory=lambda d=default: json.loads(json.dumps(d)))
            else:
                spec = field(default=default)
            fields_.append((name, key["annotation"], spec))
        cls = dataclasses.make_dataclass(class_name, fields_, namespace={"__doc__": f"`{self.name}.*` keys."})
        cls.__module__, cls.__qualname__ = module, class_name
        return cls


def _annotation(kind: str, optional: bool) -> Any:
    if kind.startswith("list["):
        tp = List[_PRIMITIVES[kind[5:-1]]]
    elif kind.startswith("dict[str,"):
        tp = Dict[str, _PRIMITIVES[kind[9:-1]]]
    else:
        tp = _PRIMITIVES[kind]
    return Optional[tp] if optional and tp is not Any else tp


_DTYPES = ["float32", "bfloat16", "float16"]

# Measured reason for the precision defaults (README "Defaults that differ from the libraries"): on a 2-core
# AMD EPYC, a plain TRL script with TRL's defaults (bf16 autocast, activation checkpointing) took 115-120 s per
# step of the demo, and 20 s/step in fp32 without checkpointing.
_CPU_PRECISION = ("auto: bf16 on CUDA devices that support it, fp32 elsewhere. TRL's default (bf16 autocast "
                  "everywhere) took 115-120 s/step on a 2-core AMD EPYC, fp32 20 s/step")

TRAIN = Section(
    name="train",
    # Each task's trainer config (config/tasks.py): `train.*` are the fields of the task's own.
    classes={t.name: t.trainer_config for t in TASKS.values()},
    own={
        "nan_patience": Own(int, 1, "stop after this many optimizer steps in a row whose gradient (or logged "
                            "loss) is NaN/inf; such steps are skipped, so the last checkpoint stays the last good "
                            "one"),
        "max_loss": Own(Optional[float], None, "the loss watchdog: stop (saving a checkpoint, exit 4) when the logged "
                        "training loss stays above this for train.max_loss_patience logged steps in a row (null: off)"),
        "max_loss_patience": Own(int, 3, "logged steps in a row above train.max_loss before the watchdog stops the run"),
        "gradient_checkpointing_every_n_layers": Own(int, 1, "checkpoint one decoder layer in n (1: all); the "
                                                     "others keep their activations (speed for memory)"),
        "no_signal_patience": Own(int, 3, "task=grpo|rloo: stop (exit code 5) when every group of completions "
                                  "scored alike (no learning signal) for this many logged steps in a row; 0: never"),
        "gradient_checkpointing_offload": Own(bool, False, "checkpointed layers' saved inputs wait in pinned "
                                              "host memory (frees layers x tokens x hidden on the GPU)"),
        "fused_lm_head": Own(Optional[bool], None, "SFT: TRL's fused, chunked LM head and loss (no full logits: "
                             "saves GPU memory) instead of the model's own; auto (null): on with CUDA, off elsewhere "
                             "(on a CPU the demo's step took 1.26x the lean reference's with it, 1.02x without: config/device.py)"),
        "token_metrics": Own(bool, False, "SFT: log entropy and mean_token_accuracy, computed for the optimizer "
                             "steps that log only (and for evaluation)"),
    },
    defaults={
        "learning_rate": Default(2e-4, "a LoRA learning rate; SFTConfig's 2e-5 is a full fine-tune's"),
        "num_train_epochs": Default(1.0, "one pass; set max_steps or more epochs explicitly"),
        "max_length": Default(512, "also the data stage's truncation length (rows longer are truncated, counted)"),
        "logging_steps": Default(5.0, "short CPU runs show their loss curve"),
        "save_total_limit": Default(2, "checkpoints hold optimizer states: the newest two are kept"),
        "report_to": Default(["tensorboard"], "TensorBoard logs in the run directory (runs/)", Any),
        "optim": Default("adamw_torch", "the same optimizer kernel on every device (fused AdamW's numerics "
                         "differ by device)"),
        "gradient_checkpointing": Default(True, "on (TRL's default); applied by tuneforge with use_reentrant="
                                          "False and the layer policy (train.gradient_checkpointing_*)"),
        "bf16": Default(None, _CPU_PRECISION, Optional[bool]),
        "use_cpu": Default(None, "auto: true when the machine has no accelerator (transformers needs it for bf16 "
                           "on a CPU)", Optional[bool]),
        "dataloader_pin_memory": Default(None, "auto: on with an accelerator; on a CPU pinning does nothing and "
                                         "torch warns", Optional[bool]),
        "use_liger_kernel": Default(None, "auto: on where CUDA and liger-kernel are available (1.84-1.90x "
                                    "tokens/s with bfd packing on an H100, benchmarks/README.md)", Optional[bool]),
        "data_seed": Default(None, "null: train.seed, so the data order depends on the seed alone", Optional[int]),
    },
    owned={
        "output_dir": "hydra.run.dir (every run gets its own directory, never reused)",
        "dataset_text_field": "format.text_column",
        "dataset_kwargs": "data.* and format.* (tuneforge prepares and caches the data itself)",
        "dataset_num_proc": "data.num_proc",
        "shuffle_dataset": "data.shuffle",
        "packing": "packing=bfd (or packing=wrapped, packing=padding_free)",
        "packing_strategy": "packing=bfd or packing=wrapped",
        "padding_free": "packing=padding_free",
        "eval_packing": "packing=... (the held-out split is never packed)",
        "completion_only_loss": "collator=completion_only",
        "assistant_only_loss": "collator=assistant_only",
        "pad_to_multiple_of": "collator.pad_to_multiple_of",
        "pad_token": "tokenizer.pad_token",
        "eos_token": "tokenizer.chat_template (the end-of-turn token comes from the chat template)",
        "chat_template_path": "tokenizer.chat_template",
        "model_init_kwargs": "model.* (model.dtype, model.attn_implementation, model.revision) and quant.*",
        "trust_remote_code": "model.trust_remote_code",
        "remove_unused_columns": "nothing: tuneforge keeps exactly the columns it built",
        "logging_nan_inf_filter": "train.nan_patience (non-finite losses are never averaged away)",
        "include_num_input_tokens_seen": "nothing: tuneforge counts tokens itself (metrics.json tokens_seen)",
        "local_rank": "launcher.* (set by the launcher for each process)",
        "do_train": "the command (tuneforge train)",
        "do_eval": "train.eval_strategy, or the command tuneforge eval",
        "do_predict": "the command tuneforge eval",
        # The launcher starts the processes and hands Accelerate its DeepSpeed/FSDP plugin; the trainer never reads
        # these (a DeepSpeed JSON given here would bypass the launcher's process setup).
        "deepspeed": "launcher=deepspeed_zero2 or launcher=deepspeed_zero3 (your own DeepSpeed JSON: "
                     "launcher.deepspeed_config=FILE.json)",
        "fsdp": "launcher=fsdp (launcher.fsdp_* keys, or your own FSDP settings: launcher.fsdp_config=FILE)",
        "fsdp_config": "launcher=fsdp (launcher.fsdp_* keys, or your own FSDP settings: launcher.fsdp_config=FILE)",
        "reward_weights": "rewards[].weight (one weight per entry of the rewards list)",
    },
    applied={
        "gradient_checkpointing": "applied to the model (non-reentrant, with the layer policy) before LoRA",
        "gradient_checkpointing_kwargs": "merged into the checkpointing call (use_reentrant must stay false)",
        "activation_checkpointing": "transformers 5.25's name for gradient_checkpointing (the same switch)",
        "activation_checkpointing_kwargs": "the same as gradient_checkpointing_kwargs",
        "resume_from_checkpoint": "auto | true | a checkpoint path, resolved in the run directory",
    },
    every_task={"max_length": "the tokenizer's truncation length in the data stage (classification too)"},
    renamed={
        "max_seq_length": "train.max_length",
        "warmup_ratio": "train.warmup_steps (transformers 5: a float below 1 is a fraction of the total steps)",
        "evaluation_strategy": "train.eval_strategy",
        "group_by_length": "train.train_sampling_strategy=group_by_length",
        "per_gpu_train_batch_size": "train.per_device_train_batch_size",
        "per_gpu_eval_batch_size": "train.per_device_eval_batch_size",
        "no_cuda": "train.use_cpu",
        "overwrite_output_dir": "nothing: a run never reuses a directory (hydra.run.dir)",
    },
)

PEFT = Section(
    name="peft",
    classes={"*": "peft:LoraConfig"},
    own={
        "method": Own(str, "lora", "lora | none (none: a full fine-tune of the unquantized model)"),
        "train_new_tokens": Own(bool, True, "train the embedding rows of tokens the tokenizer config added (PEFT "
                                "trainable_token_indices); PAD is never included"),
    },
    defaults={
        "r": Default(16, "rank 16 on every linear layer: the QLoRA paper's setting, LoraConfig's is 8"),
        "lora_alpha": Default(32, "alpha = 2r"),
        "lora_dropout": Default(0.05, "light regularisation for small data sets"),
        "target_modules": Default("all-linear", "every linear layer (QLoRA), not PEFT's per-model default", Any),
    },
    owned={
        "task_type": "task= (tuneforge sets CAUSAL_LM or SEQ_CLS)",
        "peft_type": "peft.method",
        "auto_mapping": "nothing (set by PEFT)",
        "peft_version": "nothing (set by PEFT)",
        "base_model_name_or_path": "model.name_or_path",
        "revision": "model.revision",
        "inference_mode": "nothing: training makes trainable adapters; tuneforge infer/eval load them for inference",
        "trainable_token_indices": "peft.train_new_tokens (the added tokens' ids are found by tuneforge)",
    },
    # Axolotl's and LLaMA-Factory's names (lora_r, lora_rank, lora_target_modules): config/peer_keys.py.
    renamed={"rank": "peft.r"},
)

QUANT = Section(
    name="quant",
    classes={"*": "transformers:BitsAndBytesConfig"},
    own={
        "upcast_non_quantized": Own(bool, True, "prepare_model_for_kbit_training's fp32 copy of every weight that "
                                    "is not quantized (DESIGN rule 10); false keeps the compute dtype, as TRL does"),
    },
    defaults={
        "load_in_4bit": Default(True, "QLoRA by default (quant=none for unquantized weights)"),
        "bnb_4bit_quant_type": Default("nf4", "NF4 (the QLoRA paper), not bitsandbytes' fp4"),
        "bnb_4bit_use_double_quant": Default(True, "double quantization saves ~0.4 bit per weight"),
        "bnb_4bit_compute_dtype": Default("auto", "auto: bfloat16 where the device supports it, else float32", str),
        "bnb_4bit_quant_storage": Default(None, "null: uint8 (bitsandbytes' default); FSDP/ZeRO-3 need the "
                                          "compute dtype", Optional[str]),
        "llm_int8_skip_modules": Default(None, "null: bitsandbytes' default (the LM head stays unquantized)",
                                         Optional[List[str]]),
    },
)

# Names of dtypes the two dtype keys take (checked by validation).
QUANT_DTYPE_CHOICES = {"bnb_4bit_compute_dtype": ["auto", *_DTYPES], "bnb_4bit_quant_storage": [*_DTYPES, "uint8"]}

SECTIONS = {s.name: s for s in (TRAIN, PEFT, QUANT)}
