"""Config validation: legal values and cross-field rules, checked after composition and before any model loads.

`validate(cfg)` is the one entry point: it runs the rules below, one function per section and one for what the task
table says of the task, and never changes the config (`normalize` returns the normalised copy validation checks;
config/device.resolve decides the `auto` settings). Every rule raises `ConfigError` naming the key(s) and the fix.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tuneforge.config import library_keys
from tuneforge.config.errors import ConfigError, closest
from tuneforge.config.formats import FORMATS, TEXT_STRATEGIES
from tuneforge.config.library_args import is_quantized, refuse_foreign_keys, report_to_list
from tuneforge.config.packing_modes import AUTO, packing_mode
from tuneforge.config.packing_modes import CHOICES as PACKING_CHOICES
from tuneforge.config.schemas import (
    PACKING_ATTENTION,
    RESUME_LATEST,
    RESUME_OFF,
    SHARDED_LAUNCHERS,
    DataConfig,
    FormatConfig,
    TrainConfig,
    TuneforgeConfig,
)
from tuneforge.config.tasks import REFUSED, TASKS, format_owner, task

# What each collator builds (collator.name), for the rules that pair collators with tasks and formats.
COLLATORS = {
    "completion_only": "language-model labels for the answers only",
    "assistant_only": "language-model labels for the chat template's assistant turns",
    "lm": "language-model labels for every token",
    "padding": "no language-model labels (one class label per sequence)",
}

# Legal values for tuneforge's enum-like string keys: checked here so a typo names the key and the closest value.
# The library keys' legal values come from the libraries (their enums, Literals and `choices`, library_keys.py).
CHOICES: dict[str, tuple[str, ...]] = {
    "task": (*TASKS, *REFUSED),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.attn_implementation": ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"),
    "data.on_bad_row": ("drop", "error"),
    "data.on_long_row": ("truncate", "drop"),
    "format.strategy": tuple(FORMATS),
    "format.alpaca_style": ("auto", "chat", "classic"),
    "preview.split": ("train", "eval"),
    "collator.name": tuple(COLLATORS),
    "packing.mode": PACKING_CHOICES,
    "quant.bnb_4bit_quant_type": ("nf4", "fp4"),
    "peft.method": ("lora", "none"),
    "tokenizer.padding_side": ("left", "right"),
    "launcher.name": ("local", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"),
    "launcher.fsdp_sharding_strategy": ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"),
    "launcher.fsdp_state_dict_type": ("SHARDED_STATE_DICT", "FULL_STATE_DICT"),
    "launcher.offload_optimizer_device": ("none", "cpu", "nvme"),
    "launcher.offload_param_device": ("none", "cpu", "nvme"),
}


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _library_choices() -> dict[str, tuple]:
    out = {}
    for section in library_keys.SECTIONS.values():
        for name, key in section.keys().items():
            if key["choices"]:
                out[f"{section.name}.{name}"] = tuple(str(c) for c in key["choices"])
    out.update({f"quant.{k}": tuple(v) for k, v in library_keys.QUANT_DTYPE_CHOICES.items()})
    return out


def normalize(cfg: TuneforgeConfig) -> TuneforgeConfig:
    """A copy of `cfg` with the keys that have two spellings in one: train.report_to as a list (none: []), and
    transformers 5.25's activation_checkpointing(_kwargs) carried by gradient_checkpointing(_kwargs), the names
    tuneforge applies (either name works), and a LLaMA-Factory registry entry as data.path (DIR/dataset_info.json:NAME)
    spelled out."""
    t = cfg.train
    changes: dict[str, Any] = {"report_to": report_to_list(t.report_to)}
    if getattr(t, "activation_checkpointing", None) is not None:
        changes |= {"gradient_checkpointing": bool(t.activation_checkpointing), "activation_checkpointing": None}
    if getattr(t, "activation_checkpointing_kwargs", None) is not None:
        changes |= {"gradient_checkpointing_kwargs": t.activation_checkpointing_kwargs,
                    "activation_checkpointing_kwargs": None}
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(t, **changes))
    return _dataset_info(cfg)


def _dataset_info(cfg: TuneforgeConfig) -> TuneforgeConfig:
    """`data.path=DIR/dataset_info.json:NAME` (LLaMA-Factory's registry) spelled out: the entry's file (or hub id),
    split and formatting become data.* and format.* (a mix source's own format)."""
    from tuneforge.config import dataset_info

    if dataset_info.parse(cfg.data.path) and not cfg.data.mix:
        src, fmt = dataset_info.entry(cfg.data.path)
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **src),
                                   format=dataclasses.replace(cfg.format, **fmt))
    mix = []
    for source in cfg.data.mix:
        if dataset_info.parse(source.path):
            src, fmt = dataset_info.entry(source.path)
            source = dataclasses.replace(source, **src, format=dataclasses.replace(source.format or cfg.format, **fmt))
        mix.append(source)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mix=mix)) if cfg.data.mix else cfg


def validate(cfg: TuneforgeConfig) -> TuneforgeConfig:
    """Check values and cross-field rules, section by section, then what the task table says of the task; raise
    ConfigError naming the key(s) and the fix. Returns `cfg` unchanged."""
    validate_choices(cfg)
    validate_task(cfg)
    validate_library_keys(cfg)
    from tuneforge.config.user_code import check_paths

    check_paths(cfg.callbacks)
    validate_numbers(cfg)
    validate_chat_template(cfg.tokenizer.chat_template)
    validate_quant(cfg)
    validate_train(cfg.train)
    validate_eval(cfg)
    validate_collator_packing(cfg)
    validate_task_batches(cfg)
    validate_data(cfg.data, cfg.format)
    validate_launcher(cfg)
    validate_signs(cfg)
    return cfg


def validate_choices(cfg: TuneforgeConfig) -> None:
    """Enum-like keys, tuneforge's and the libraries', name a legal value; a refused task says why (it has no
    trainer config to check keys against)."""
    for key, allowed in {**CHOICES, **_library_choices()}.items():
        value = _get(cfg, key)
        if value is None and key not in CHOICES:
            continue  # a null library key means its default
        if str(value) not in allowed:
            raise ConfigError(
                f"{key}={value!r} is not valid; choose one of {', '.join(allowed)}.{closest(value, allowed)}"
            )
    if cfg.task in REFUSED:
        raise ConfigError(f"task={cfg.task}: {REFUSED[cfg.task]}")


def validate_chat_template(value: str) -> None:
    """keep, a named template, a .jinja file or inline Jinja: a bare word that is none of them (llama3 before that
    name existed) would otherwise become a template whose whole text is that word."""
    from pathlib import Path

    from tuneforge.config.chat_templates import NAMES

    if value == "keep" or value in NAMES or "{" in value or value.endswith(".jinja") or Path(value).expanduser().is_file():
        return
    raise ConfigError(f"tokenizer.chat_template={value!r}: not a named template ({', '.join(NAMES)}), a .jinja file "
                      f"or an inline Jinja template; keep uses the model's own.{closest(value, [*NAMES, 'keep'])}")


# numpy's random.seed (transformers.set_seed seeds it) takes 0 <= seed < 2**32: anything else fails mid-run.
SEED_RANGE = 2**32


def _numbers(node: Any, default: Any, prefix: str):
    """(dotted key, value, its default, free-form?) of every number in a config, nested sections, lists of sections
    and free-form mappings included (a mapping's numbers have no default)."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            yield from _numbers(value, getattr(default, f.name, None), f"{prefix}.{f.name}")
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _numbers(v, None, f"{prefix}.{k}")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            try:
                item_default = type(v)() if dataclasses.is_dataclass(v) else None
            except TypeError:  # a section with required fields has no default instance
                item_default = None
            yield from _numbers(v, item_default, f"{prefix}.{i}")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield prefix, node, default


def validate_finite(cfg: TuneforgeConfig) -> None:
    """Every number of every section (the libraries' keys included) is finite: a NaN learning rate or dropout trains
    garbage without an error. First, so no range rule meets a NaN (which compares False both ways)."""
    import math

    for key, value, _ in _numbers(cfg, TuneforgeConfig(), ""):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key.lstrip('.')}={value} is not a finite number; give a finite value.")


def validate_signs(cfg: TuneforgeConfig) -> None:
    """Seeds in numpy's range; no negative value unless it is the key's own negative default (-1 for max_steps: by
    epochs): the libraries read a negative max_grad_norm, warmup, limit or noise as "off", or fail late. Last: the
    section rules name a key's own limits (peft.r > 0, a mix weight > 0) more precisely."""
    for key, value, default in _numbers(cfg, TuneforgeConfig(), ""):
        key = key.lstrip(".")
        leaf = key.rsplit(".", 1)[-1]
        if (leaf == "seed" or leaf.endswith("_seed")) and not 0 <= value < SEED_RANGE:
            raise ConfigError(f"{key}={value} is out of range: a seed is an integer in [0, 2**32).")
        if value < 0 and not (isinstance(default, (int, float)) and default < 0 and value == default):
            raise ConfigError(f"{key}={value}: negative values are refused (the library would fail on it later or "
                              "silently treat it as off); give a value >= 0"
                              + (f", or leave the default {default}." if default is not None else "."))


def validate_numbers(cfg: TuneforgeConfig) -> None:
    """Counts and sizes that must be positive, fractions in range."""
    validate_finite(cfg)
    t = cfg.train
    positive = {
        "train.learning_rate": t.learning_rate,
        "train.per_device_train_batch_size": t.per_device_train_batch_size,
        "train.per_device_eval_batch_size": t.per_device_eval_batch_size,
        "train.gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train.max_length": t.max_length,
        "train.logging_steps": t.logging_steps,
        "eval.num_samples": cfg.eval.num_samples,
        "eval.max_new_tokens": cfg.eval.max_new_tokens,
        "eval.batch_size": cfg.eval.batch_size,
        "data.builtin_rows": cfg.data.builtin_rows,
    }
    if cfg.peft.method == "lora":
        positive.update({"peft.r": cfg.peft.r, "peft.lora_alpha": cfg.peft.lora_alpha})
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be > 0.")
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"train.max_steps={t.max_steps}: use a positive step count, or -1 to train by epochs.")
    if t.max_steps == -1 and t.num_train_epochs <= 0:
        raise ConfigError("train.num_train_epochs must be > 0 when train.max_steps=-1.")
    if not 0.0 <= cfg.peft.lora_dropout < 1.0:
        raise ConfigError(f"peft.lora_dropout={cfg.peft.lora_dropout} must be in [0, 1).")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={cfg.data.eval_fraction} must be in [0, 1).")
    tm = cfg.peft.target_modules
    if not (tm == "all-linear" or (isinstance(tm, (list, tuple)) and tm and all(isinstance(m, str) for m in tm))):
        raise ConfigError(
            f"peft.target_modules={tm!r}: use 'all-linear' or a list of module names, e.g. [q_proj,v_proj]."
        )


def validate_quant(cfg: TuneforgeConfig) -> None:
    """What bitsandbytes can train."""
    q = cfg.quant
    if q.load_in_4bit and q.load_in_8bit:
        raise ConfigError("quant.load_in_4bit and quant.load_in_8bit are both true: choose one (quant=none for neither).")
    if is_quantized(q) and cfg.peft.method == "none":
        bits = "4-bit" if q.load_in_4bit else "8-bit"
        raise ConfigError(
            f"quant.load_in_{bits[0]}bit=true with peft=none would train {bits} weights directly, which bitsandbytes "
            "cannot do. Use peft=lora for QLoRA, or quant=none for a full fine-tune."
        )
    if q.load_in_4bit and not q.upcast_non_quantized and q.bnb_4bit_compute_dtype == "float16":
        raise ConfigError("quant.upcast_non_quantized=false with quant.bnb_4bit_compute_dtype=float16 would keep norms "
                          "and embeddings in fp16, which overflows in training: use bfloat16, or upcast.")


def validate_train(t: TrainConfig) -> None:
    """Evaluation, saving and the best-model rules (transformers checks these only once the weights are loaded; a
    config error costs nothing here), then the run keys."""
    if t.load_best_model_at_end and t.eval_strategy == "no":
        raise ConfigError(
            "train.load_best_model_at_end=true needs evaluation: set train.eval_strategy=steps (or epoch)."
        )
    if t.eval_strategy == "steps" and not t.eval_steps:
        raise ConfigError("train.eval_strategy=steps needs train.eval_steps (a positive step count).")
    if t.load_best_model_at_end and t.save_strategy not in (t.eval_strategy, "best"):
        raise ConfigError(
            f"train.load_best_model_at_end=true keeps a saved checkpoint, so train.save_strategy "
            f"({t.save_strategy}) must match train.eval_strategy ({t.eval_strategy}) or be 'best'."
        )
    if (t.load_best_model_at_end and t.save_strategy == "steps" and t.eval_strategy == "steps"
            and t.save_steps % t.eval_steps):
        raise ConfigError(
            f"train.load_best_model_at_end=true: train.save_steps ({t.save_steps:g}) must be a multiple of "
            f"train.eval_steps ({t.eval_steps:g}), so that the best evaluation has a checkpoint."
        )
    if t.save_strategy == "steps" and t.save_steps <= 0:
        raise ConfigError("train.save_strategy=steps needs train.save_steps > 0.")
    validate_run_keys(t)


def validate_eval(cfg: TuneforgeConfig) -> None:
    if cfg.eval.sample_every_steps < 0 or cfg.eval.sample_prompts < 1:
        raise ConfigError("eval.sample_every_steps must be >= 0 (0: off) and eval.sample_prompts >= 1.")


def validate_task(cfg: TuneforgeConfig) -> None:
    """What the task table says of `task`: the rows, adapter and trainer settings it takes."""
    name, strategy = cfg.task, cfg.format.strategy
    spec = task(name)
    try:  # the trainer config's module: an experimental one (ORPO) may be missing from another TRL release
        library_keys.library_fields(spec.trainer_config)
    except library_keys.MissingLibraryClass as exc:
        raise ConfigError(f"task={name} trains with {spec.trainer_config.replace(':', '.')}, but {exc}.") from None
    # A task with no formats reads its own columns (format.* strategies unused).
    if spec.formats and strategy not in spec.formats:
        owner = format_owner(strategy)
        whose = f", whose rows train with task={owner}" if owner else ""
        raise ConfigError(f"task={name} trains on format.strategy={'|'.join(spec.formats)} rows "
                          f"(conf/format/{spec.formats[0]}.yaml); this config has format.strategy={strategy}{whose}: "
                          f"set format={spec.formats[0]}" + (f", or task={owner}." if owner else "."))
    if cfg.model.adapter and not spec.starts_from_run:
        starters = "|".join(t.name for t in TASKS.values() if t.starts_from_run)
        raise ConfigError(f"model.adapter (an SFT run to start from) is for task={starters}, not task={name}.")
    if spec.needs_adapter and cfg.peft.method == "none":
        raise ConfigError(f"task={name} with peft.method=none: the reference model is the base with the adapter "
                          f"switched off, so task={name} here needs LoRA (peft=lora).")
    for key, (value, why) in spec.fixed_train.items():
        if getattr(cfg.train, key) != value:
            raise ConfigError(f"train.{key}={getattr(cfg.train, key)} with task={name}: {why}.")
    liger = getattr(cfg.train, "liger_kernel_config", None) or {}
    if spec.fused_lm_head and liger.get("fused_linear_cross_entropy"):
        raise ConfigError(f"train.liger_kernel_config.fused_linear_cross_entropy=true with task={name}: its trainer "
                          f"({spec.trainer_config.partition(':')[2].replace('Config', 'Trainer')}) computes the loss "
                          "through its own fused LM head, which Liger's fused linear cross-entropy would replace; "
                          "leave it out (Liger's other kernels still apply with train.use_liger_kernel).")
    validate_rewards(cfg)


def validate_rewards(cfg: TuneforgeConfig) -> None:
    """The `rewards` list belongs to the tasks that learn from rewards (its entries are imported when the run
    starts, before any weights load: eval/rewards.load_rewards), and their sampling settings."""
    from tuneforge.config.user_code import is_path

    spec, learners = task(cfg.task), "|".join(t.name for t in TASKS.values() if t.rewards)
    if cfg.rewards and not spec.rewards:
        raise ConfigError(f"rewards are for task={learners} (online RL); task={cfg.task} does not sample completions.")
    if not spec.rewards:
        return
    if not cfg.rewards:
        raise ConfigError(f"task={cfg.task} learns from rewards, and `rewards` is empty: add at least one, e.g. "
                          "rewards='[{name:exact_match,kwargs:{column:answer}}]' (built-ins: exact_match, regex, "
                          "overlong, iso_date, number, date_equivalent; or your own module:function).")
    for i, entry in enumerate(cfg.rewards):
        if entry.model is not None:  # a reward model: checked, before weights load, when the rewards load
            if not isinstance(entry.model, str) or not entry.model.strip():
                raise ConfigError(f"rewards[{i}].model={entry.model!r}: give a task=reward run directory or a "
                                  "sequence-classification model (a directory or a hub id).")
            if entry.name is not None and not (isinstance(entry.name, str) and entry.name.isidentifier()):
                raise ConfigError(f"rewards[{i}].name={entry.name!r}: with model, name is what its values are logged "
                                  "as (rewards/NAME): a plain name, e.g. name=judge.")
        elif not isinstance(entry.name, str) or not (is_path(entry.name) or entry.name.isidentifier()):
            raise ConfigError(f"rewards[{i}].name={entry.name!r}: give a built-in reward's name or module:function "
                              "(or model=RUN_DIR: a reward model).")
    t, d = cfg.train, cfg.doctor
    # null: the task's library default (GRPOConfig 8, RLOOConfig 2).
    if t.num_generations is not None and t.num_generations < 2:
        raise ConfigError(f"train.num_generations={t.num_generations}: a group needs at least 2 completions (the "
                          "advantage compares them).")
    if t.max_completion_length is not None and t.max_completion_length <= 0:
        raise ConfigError(f"train.max_completion_length={t.max_completion_length} must be > 0.")
    if d.reward_prompts < 0 or not 0.0 <= d.max_no_signal <= 1.0 or t.no_signal_patience < 0:
        raise ConfigError("doctor.reward_prompts must be >= 0, doctor.max_no_signal in [0, 1] and "
                          "train.no_signal_patience >= 0 (0: never stop).")
    if t.use_vllm:
        validate_vllm(cfg)


def validate_vllm(cfg: TuneforgeConfig) -> None:
    """train.use_vllm (TRL's vLLM generation, vllm_mode=colocate|server) needs CUDA and the vllm package."""
    import importlib.util

    from tuneforge.config.device import cuda_available

    if not cuda_available():
        raise ConfigError("train.use_vllm=true: vLLM generates on CUDA GPUs only, and this machine has none; remove "
                          "it (TRL then generates with transformers).")
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("train.use_vllm=true: the vllm package is not installed; `pip install vllm` (a version TRL "
                          "supports, see `trl env`), or remove train.use_vllm.")
    if cfg.train.vllm_mode not in ("colocate", "server"):
        raise ConfigError(f"train.vllm_mode={cfg.train.vllm_mode!r}: colocate (in this process) or server "
                          "(`trl vllm-serve` on other GPUs).")


def validate_task_batches(cfg: TuneforgeConfig) -> None:
    """The collators that build what the task trains on, and whether its rows may be packed."""
    name, collator, spec = cfg.task, cfg.collator.name, task(cfg.task)
    if collator not in spec.collators:
        raise ConfigError(f"collator={collator} builds {COLLATORS[collator]}: with task={name} use "
                          f"collator={' or '.join(spec.collators)}.")
    if not spec.packs and cfg.packing.mode != AUTO and packing_mode(cfg.packing.mode).shares_rows:
        raise ConfigError(f"packing.mode={cfg.packing.mode} with task={name}: its trainer takes one sequence per row "
                          "(they pack nothing); use packing=none.")


def validate_library_keys(cfg: TuneforgeConfig) -> None:
    """Library keys that tuneforge applies itself, and keys of another task's trainer config."""
    kwargs = cfg.train.gradient_checkpointing_kwargs
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ConfigError(f"train.gradient_checkpointing_kwargs={kwargs!r}: give a mapping, e.g. {{use_reentrant: false}}.")
    if kwargs and kwargs.get("use_reentrant"):
        raise ConfigError("train.gradient_checkpointing_kwargs.use_reentrant=true: reentrant checkpointing computes no "
                          "gradient through frozen (4-bit) layers into LoRA adapters (DESIGN rule 10); leave it false.")
    refuse_foreign_keys(cfg)
    validate_lora_init(cfg)


# LoRA initialisations that need a pass over training data before the first step (PEFT's EVA, CorDA, LoRA-GA).
DATA_DRIVEN_INITS = ("eva", "corda", "lora_ga")


def validate_lora_init(cfg: TuneforgeConfig) -> None:
    """Which of PEFT's initialisations fit the base: each one a run can save and a fresh process reproduce."""
    init, p, q = cfg.peft.init_lora_weights, cfg.peft, cfg.quant
    if p.method == "lora" and p.loftq_config:
        raise ConfigError("peft.loftq_config configures PEFT's LoftQ for a full-precision base, which quantizes and "
                          "rewrites the base weights that tuneforge does not save; tuneforge applies LoftQ to the 4-bit "
                          "base (peft.init_lora_weights=loftq with quant=nf4, PEFT's replace_lora_weights_loftq), which "
                          "takes no options: remove peft.loftq_config.")
    for key in ("eva_config", "corda_config", "lora_ga_config"):
        if p.method == "lora" and getattr(p, key, None) is not None:
            raise ConfigError(f"peft.{key} configures a data-driven initialisation (peft.init_lora_weights="
                              f"{key.removesuffix('_config')}), which needs a pass over training data before the first "
                              "step that tuneforge does not run yet: remove it.")
    if p.method != "lora" or isinstance(init, bool):
        return
    name = str(init)
    if name.startswith(("pissa", "olora")) and is_quantized(q):
        raise ConfigError(
            f"peft.init_lora_weights={name} rewrites the base weights into a residual (W - BA) before training; on a "
            f"quantized base PEFT cannot (PiSSA), or the residual is re-quantized (OLoRA), so no saved adapter would "
            f"reproduce the trained model on the base reloaded from its weights. Use quant=none with {name}, or "
            "peft.init_lora_weights=loftq for a 4-bit base.")
    if name == "loftq" and not q.load_in_4bit:
        raise ConfigError("peft.init_lora_weights=loftq fits the adapters to a 4-bit base's quantization error: use it "
                          "with quant=nf4 (tuneforge applies PEFT's replace_lora_weights_loftq, which leaves the base as "
                          "loaded).")
    if name == "loftq" and not cfg.dry_run:
        from tuneforge.config.device import cuda_available, xpu_available

        if not (cuda_available() or xpu_available()):
            raise ConfigError("peft.init_lora_weights=loftq: PEFT computes the LoftQ initialisation on a CUDA or XPU "
                              "device (peft/utils/loftq_utils.py) and this machine has neither; use the default "
                              "initialisation (or gaussian) on a CPU.")
    if name in DATA_DRIVEN_INITS:
        raise ConfigError(f"peft.init_lora_weights={name} needs a data-driven initialisation pass before training, "
                          "which tuneforge does not run yet; use true (the default), gaussian, pissa, olora or loftq.")


def validate_launcher(cfg: TuneforgeConfig) -> None:
    """Launcher rules: process counts, multi-node settings, and what FSDP/DeepSpeed need with a 4-bit base."""
    la, q = cfg.launcher, cfg.quant
    for key in ("num_processes", "num_machines", "main_process_port"):
        if getattr(la, key) < 1:
            raise ConfigError(f"launcher.{key}={getattr(la, key)} must be >= 1.")
    if la.name == "local" and (la.num_processes > 1 or la.num_machines > 1):
        raise ConfigError(f"launcher=local runs one process; launcher.num_processes={la.num_processes} needs "
                          "launcher=ddp (or fsdp, deepspeed_zero2, deepspeed_zero3).")
    if la.num_processes % la.num_machines:
        raise ConfigError(f"launcher.num_processes={la.num_processes} must be a multiple of launcher.num_machines="
                          f"{la.num_machines} (the same number of processes on every machine).")
    if not 0 <= la.machine_rank < la.num_machines:
        raise ConfigError(f"launcher.machine_rank={la.machine_rank} must be in [0, launcher.num_machines="
                          f"{la.num_machines}).")
    # launcher.main_process_ip is checked at launch time: on Slurm it comes from the job's first node.
    sharded = la.name in SHARDED_LAUNCHERS
    if sharded and q.load_in_4bit:
        compute = "bfloat16" if q.bnb_4bit_compute_dtype == "auto" else q.bnb_4bit_compute_dtype
        if q.bnb_4bit_quant_storage != compute:
            raise ConfigError(
                f"launcher={la.name} shards a 4-bit base only when its storage dtype is the compute dtype: set "
                f"quant.bnb_4bit_quant_storage={compute} (is {q.bnb_4bit_quant_storage}), or use launcher=ddp.")
    validate_launcher_files(la)
    if la.name == "deepspeed_zero3" and q.load_in_4bit and not la.zero3_init_flag:
        raise ConfigError("launcher=deepspeed_zero3 with a 4-bit base (QLoRA) needs launcher.zero3_init_flag=true "
                          "(the quantized model must be built already partitioned).")
    if la.name in ("fsdp", "deepspeed_zero2", "deepspeed_zero3") and not cfg.dry_run:
        import importlib.util

        from tuneforge.config.device import cuda_available

        if la.name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"launcher={la.name} needs DeepSpeed, which is not installed: pip install "
                              "'tuneforge[deepspeed]' (dry_run=true prints the launch command and config without it).")
        if not cuda_available():
            # Accelerate turns FSDP / DeepSpeed on only for accelerator processes (accelerate/state.py): on a CPU the
            # ranks would run as plain gloo DDP (MULTI_CPU) with the sharding settings silently ignored.
            raise ConfigError(f"launcher={la.name} shards over CUDA GPUs and this machine has none (Accelerate runs "
                              "FSDP and DeepSpeed only on accelerators; on CPUs its processes would silently be plain "
                              "DDP); use launcher=ddp (gloo processes on CPUs), or dry_run=true to print the launch "
                              "command.")


def launcher_file(key: str, path: str) -> dict:
    """A user's DeepSpeed JSON / FSDP settings file as a mapping, or one line saying why it cannot be used."""
    import json
    from pathlib import Path

    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"launcher.{key}={path}: no such file (relative paths start at {Path.cwd()}).")
    try:
        data = json.loads(file.read_text()) if file.suffix == ".json" else yaml.safe_load(file.read_text())
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"launcher.{key}={path}: not valid {'JSON' if file.suffix == '.json' else 'YAML'} "
                          f"({str(exc).splitlines()[0]}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"launcher.{key}={path}: a mapping of settings, not a {type(data).__name__}.")
    return data


def validate_launcher_files(la) -> None:
    """launcher.deepspeed_config / launcher.fsdp_config: with their launcher, readable, and the ZeRO stage of a
    DeepSpeed JSON the launcher's (a stage-2 file under launcher=deepspeed_zero3 would shard differently than
    the plan, the memory estimate and the 4-bit rules above assumed)."""
    if la.deepspeed_config:
        if not la.name.startswith("deepspeed"):
            raise ConfigError(f"launcher.deepspeed_config is for launcher=deepspeed_zero2|deepspeed_zero3, not "
                              f"launcher={la.name}.")
        stage = (launcher_file("deepspeed_config", la.deepspeed_config).get("zero_optimization") or {}).get("stage")
        want = 3 if la.name == "deepspeed_zero3" else 2
        if stage is not None and stage != want:
            raise ConfigError(f"launcher.deepspeed_config={la.deepspeed_config} has zero_optimization.stage={stage}; "
                              f"launcher={la.name} is stage {want}: use launcher=deepspeed_zero{stage}"
                              if stage in (2, 3) else f"launcher.deepspeed_config: ZeRO stage {stage} is not one "
                              "tuneforge launches (2 or 3).")
    if la.fsdp_config:
        if la.name != "fsdp":
            raise ConfigError(f"launcher.fsdp_config is for launcher=fsdp, not launcher={la.name}.")
        bad = [k for k in launcher_file("fsdp_config", la.fsdp_config) if not str(k).startswith("fsdp_")]
        if bad:
            raise ConfigError(f"launcher.fsdp_config={la.fsdp_config}: {', '.join(map(str, bad))} are not Accelerate "
                              "fsdp_config keys (they start with fsdp_, e.g. fsdp_sharding_strategy).")


# transformers' INTEGRATION_TO_CALLBACK keys (+ none/all), copied: importing transformers here would cost
# seconds on every config check.
REPORT_TO = ("azure_ml", "comet_ml", "mlflow", "neptune", "tensorboard", "trackio", "wandb", "codecarbon", "clearml",
             "dagshub", "flyte", "dvclive", "swanlab", "kubeflow", "none", "all")


def validate_run_keys(t: TrainConfig) -> None:
    """report_to (a list after `normalize`), resume_from_checkpoint, nan_patience."""
    from importlib.util import find_spec

    names = [t.report_to] if isinstance(t.report_to, str) else list(t.report_to or [])
    allowed = sorted(REPORT_TO)
    for name in names:
        if name not in allowed:
            raise ConfigError(f"train.report_to={name!r} is not valid; choose from {', '.join(allowed)}.{closest(name, allowed)}")
        package = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}.get(name)
        if package and find_spec(package) is None:
            raise ConfigError(f"train.report_to={name} needs the {package} package: pip install {package} "
                              "(or train.report_to=none).")
    if "none" in names and len(names) > 1:
        raise ConfigError(f"train.report_to={names}: 'none' cannot be combined with other integrations.")
    resume = t.resume_from_checkpoint
    if resume is not None and str(resume).strip().lower() not in RESUME_OFF + RESUME_LATEST:
        from pathlib import Path

        if not Path(str(resume)).is_dir():  # checked again, in full, when training starts
            raise ConfigError(f"train.resume_from_checkpoint={resume}: no such checkpoint directory; give a "
                              "RUN/checkpoint-N directory, or auto (the latest complete checkpoint of hydra.run.dir).")
    if t.nan_patience < 1:
        raise ConfigError(f"train.nan_patience={t.nan_patience} must be >= 1 (optimizer steps in a row).")
    if t.max_loss_patience < 1:
        raise ConfigError(f"train.max_loss_patience={t.max_loss_patience} must be >= 1 (logged steps in a row).")
    validate_checkpointing(t)


def validate_checkpointing(t: TrainConfig) -> None:
    """The activation-checkpointing layer policy: needs checkpointing on, and a transformers that has it."""
    n, offload = t.gradient_checkpointing_every_n_layers, t.gradient_checkpointing_offload
    if n < 1:
        raise ConfigError(f"train.gradient_checkpointing_every_n_layers={n} must be >= 1 (1: every layer).")
    if n == 1 and not offload:
        return
    if not t.gradient_checkpointing:
        raise ConfigError("train.gradient_checkpointing_every_n_layers / _offload choose what checkpointing does: "
                          "set train.gradient_checkpointing=true, or leave them at 1 / false.")
    import inspect

    from transformers import PreTrainedModel

    enable = getattr(PreTrainedModel, "activation_checkpointing_enable", None)
    if enable is None or not {"every_n_layers", "offload"} <= set(inspect.signature(enable).parameters):
        import transformers

        raise ConfigError(f"train.gradient_checkpointing_every_n_layers / _offload need transformers' "
                          f"activation_checkpointing_enable(every_n_layers, offload); transformers "
                          f"{transformers.__version__} lacks it (5.24 has it).")


def validate_format(fmt: FormatConfig, key: str = "format") -> None:
    """Rules of one format section (the top-level one, or a mix source's): legal names, then the strategy's own
    rules (config/formats.FORMATS)."""
    for name, allowed in (("strategy", CHOICES["format.strategy"]), ("alpaca_style", CHOICES["format.alpaca_style"])):
        value = getattr(fmt, name)
        if value not in allowed:
            raise ConfigError(f"{key}.{name}={value!r} is not valid; choose one of {', '.join(allowed)}.{closest(value, allowed)}")
    FORMATS[fmt.strategy].check(fmt, key)


def validate_data(data: DataConfig, fmt: FormatConfig) -> None:
    """Data-source rules: sizes, the mix shape (weights for all sources or none), every format."""
    for key, value in (("data.max_samples", data.max_samples), ("data.num_proc", data.num_proc),
                       ("data.map_batch_size", data.map_batch_size)):
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value} must be > 0 (or null).")
    validate_format(fmt)
    validate_data_paths(data)
    if not data.mix:
        return
    weighted = [s.weight is not None for s in data.mix]
    if any(weighted) and not all(weighted):
        raise ConfigError("data.mix: set weight on every source or on none (weights are sampling probabilities).")
    for i, source in enumerate(data.mix):
        key = f"data.mix[{i}]"
        if source.weight is not None and source.weight <= 0:
            raise ConfigError(f"{key}.weight={source.weight} must be > 0.")
        if source.max_samples is not None and source.max_samples <= 0:
            raise ConfigError(f"{key}.max_samples={source.max_samples} must be > 0.")
        validate_format(source.format or fmt, f"{key}.format" if source.format else "format")
    ignored = [k for k in ("name", "revision", "eval_split") if getattr(data, k) is not None]
    ignored += [k for k in ("columns",) if getattr(data, k)] + (["path"] if data.path != DataConfig.path else [])
    if ignored:
        raise ConfigError(
            f"data.mix is set, so data.{', data.'.join(ignored)} would be ignored; "
            "put them on the mix sources (data.mix[i].path, .columns, ...)."
        )


def validate_data_paths(data: DataConfig) -> None:
    """Local data files named in the config exist (hub ids are checked when they load)."""
    from pathlib import Path

    from tuneforge.config.local_paths import missing_local_path

    named = [("data.path", data.path), ("data.eval_split", data.eval_split)] if not data.mix else []
    for i, source in enumerate(data.mix):
        named += [(f"data.mix[{i}].path", source.path), (f"data.mix[{i}].eval_split", source.eval_split)]
    for key, path in named:  # a split name (eval_split=test) never looks like a local path
        if path and missing_local_path(path):
            raise ConfigError(f"{key}={path!r}: no such file or directory (relative paths start at {Path.cwd()}). "
                              "Give an existing local file, directory or glob, or a hub dataset id.")


def _is_template(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(t, int) for t in value)


def validate_collator_packing(cfg: TuneforgeConfig) -> None:
    """Collator/packing rules: each names both keys and what to use instead."""
    col, mode = cfg.collator, cfg.packing.mode
    # auto is decided on the device (device_defaults.auto_packing_mode), which packs only where allowed.
    packed = mode != AUTO and packing_mode(mode).shares_rows
    if col.pad_to_multiple_of is not None and col.pad_to_multiple_of <= 0:
        raise ConfigError(f"collator.pad_to_multiple_of={col.pad_to_multiple_of} must be > 0 (or null).")
    for key in ("response_template", "instruction_template"):
        value = getattr(col, key)
        if value is None:
            continue
        if col.name != "completion_only":
            raise ConfigError(f"collator.{key} is only used by collator=completion_only, not collator={col.name}; "
                              "remove it or use collator=completion_only.")
        if not _is_template(value):
            raise ConfigError(f"collator.{key}={value!r}: give a non-empty string or a list of token ids.")
    if col.instruction_template is not None and col.response_template is None:
        raise ConfigError("collator.instruction_template needs collator.response_template (where each response starts).")
    if col.name == "padding" and packed:
        raise ConfigError(f"packing.mode={mode} with collator=padding: the padding collator takes one sequence per "
                          "row with one label; use packing=none.")
    if packed and cfg.model.attn_implementation not in PACKING_ATTENTION:
        raise ConfigError(
            f"packing.mode={mode} with model.attn_implementation={cfg.model.attn_implementation}: that "
            "implementation ignores the restarting position ids, so packed sequences would attend to each other; "
            f"use model.attn_implementation=sdpa (or {', '.join(a for a in PACKING_ATTENTION if a != 'sdpa')}), "
            "or packing=none."
        )
    strategy = cfg.format.strategy
    if col.name == "assistant_only" and strategy in TEXT_STRATEGIES:
        raise ConfigError(f"collator=assistant_only masks chat-template assistant turns, but format.strategy={strategy} "
                          "yields plain text; use collator=completion_only (with collator.response_template).")
    if (col.name == "completion_only" and strategy == "text" and col.response_template is None
            and not cfg.format.response_template):
        raise ConfigError("format.strategy=text with collator=completion_only needs to know where completions start: "
                          "set collator.response_template (e.g. '### Assistant:'), or format.response_template, "
                          "or use collator=lm to train every token.")
