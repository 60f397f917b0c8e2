"""THE alias table of the peers' key names: Axolotl's and LLaMA-Factory's config keys, each with the tuneforge key
it is, or why it is not imported. `tuneforge import` writes recipes from it, and the unknown-key message reads it
(a pasted `sequence_len=2048` says "Axolotl's sequence_len is train.max_length in tuneforge", not a spelling guess).

A key whose name is a tuneforge key's last part (learning_rate, lora_alpha, per_device_train_batch_size, max_samples:
the libraries' field names both tools pass on) is that key and needs no entry (`same_name`). Names are from each tool's public
documentation (Axolotl: docs/config-reference; LLaMA-Factory: examples/ and its hparams dataclasses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from tuneforge.config.chat_templates import NAMES as NAMED_TEMPLATES
from tuneforge.config.tasks import REFUSED, TASKS

TOOLS = {"axolotl": "Axolotl", "llamafactory": "LLaMA-Factory"}

# Why a key is not imported.
NO_EQUIVALENT, ALWAYS, REFUSED_BY_DESIGN = "no equivalent", "tuneforge always does this", "refused by design"
# A converter's entry for the parts of a value it does not import: [(sub-key, why)].
SKIPPED = "_skipped"


@dataclass(frozen=True)
class Alias:
    # The tuneforge key it is ("" when it is not imported; "task" for the task name).
    target: str = ""
    # Not imported: NO_EQUIVALENT | ALWAYS | REFUSED_BY_DESIGN, and `note` says what to use instead.
    skip: str = ""
    note: str = ""
    # The source value -> {tuneforge key: value} (default: {target: value}); may raise ValueError (not importable).
    convert: Optional[Callable[[Any], dict[str, Any]]] = None

    def values(self, value: Any) -> dict[str, Any]:
        return self.convert(value) if self.convert else {self.target: value}


def _key(target: str, note: str = "", convert=None) -> Alias:
    return Alias(target=target, note=note, convert=convert)


def _skip(why: str, note: str) -> Alias:
    return Alias(skip=why, note=note)


class TaskRefused(ValueError):
    """A source's task that tuneforge refuses by name (config/tasks.REFUSED) or does not have yet."""


def _task(name: str) -> dict[str, Any]:
    """task=NAME when tuneforge runs it; refused by name (with the alternative) until the task exists."""
    if name in TASKS:
        return {"task": name}
    raise TaskRefused(REFUSED.get(name, f"task={name} does not exist in tuneforge yet (tasks: {', '.join(TASKS)})"))


def _attn(value: Any) -> dict[str, Any]:
    names = {True: "flash_attention_2", "fa2": "flash_attention_2", "sdpa": "sdpa", "disabled": "eager",
             "eager": "eager", "auto": "sdpa"}
    if value in (False, None):
        return {}
    if value not in names:
        raise ValueError(f"no tuneforge attention implementation for {value!r}")
    return {"model.attn_implementation": names[value]}


def _template(value: Any, names: dict[str, str]) -> dict[str, Any]:
    """A peer's chat-template name -> tuneforge's named template (config/chat_templates.NAMES), or not imported."""
    name = names.get(value, value)
    if name != "keep" and name not in NAMED_TEMPLATES:
        raise ValueError(f"chat template {value!r} has no tuneforge equivalent (named templates: "
                         f"{', '.join(NAMED_TEMPLATES)}; or keep the model's own)")
    return {"tokenizer.chat_template": name}


def _bits(value: Any) -> dict[str, Any]:
    if value in (None, "", 0):
        return {"quant.load_in_4bit": False}
    if int(value) == 4:
        return {"quant.load_in_4bit": True}
    if int(value) == 8:
        return {"quant.load_in_4bit": False, "quant.load_in_8bit": True}
    raise ValueError(f"{value}-bit quantization: tuneforge quantizes with bitsandbytes, 4 or 8 bits")


def _adapter(value: Any) -> dict[str, Any]:
    if value == "qlora":
        return {"peft.method": "lora", "quant.load_in_4bit": True}
    if value == "lora":
        return {"peft.method": "lora"}
    raise ValueError(f"adapter: {value}: tuneforge trains LoRA adapters (peft.method=lora) or the whole model")


def _finetuning_type(value: Any) -> dict[str, Any]:
    if value == "lora":
        return {"peft.method": "lora"}
    if value == "full":
        return {"peft.method": "none", "quant.load_in_4bit": False}
    raise ValueError(f"finetuning_type: {value}: tuneforge trains LoRA (peft.method=lora) or the whole model "
                     "(peft.method=none); freezing layers has no equivalent")


def _target_modules(value: Any) -> dict[str, Any]:
    if value in ("all", "all-linear"):
        return {"peft.target_modules": "all-linear"}
    if isinstance(value, str):
        return {"peft.target_modules": [v.strip() for v in value.split(",") if v.strip()]}
    return {"peft.target_modules": list(value)}


def _report(tool: str) -> Callable[[Any], dict[str, Any]]:
    return lambda value: {"train.report_to": [tool]} if value else {}


def _bf16(value: Any) -> dict[str, Any]:
    return {"train.bf16": None if value == "auto" else bool(value)}


def _rl(value: Any) -> dict[str, Any]:
    # Axolotl's rl names the loss; TRL's DPOTrainer runs several of them (train.loss_type).
    if value in ("dpo", "ipo"):
        return {**_task("dpo"), **({"train.loss_type": ["ipo"]} if value == "ipo" else {})}
    return _task({"kto": "kto", "orpo": "orpo", "simpo": "simpo", "grpo": "grpo"}.get(value, str(value)))


def _reward() -> dict[str, Any]:
    """A reward model: task=reward, whose pairs are batched by the padding collator (one score per sequence)."""
    return {**_task("reward"), "collator.name": "padding"}


def _stage(value: Any) -> dict[str, Any]:
    if value == "pt":  # pre-training on raw text: every token trained
        return {"task": "sft", "format.strategy": "text", "collator.name": "lm"}
    if value == "rm":
        return _reward()
    return _task({"sft": "sft", "dpo": "dpo", "kto": "kto", "ppo": "ppo"}.get(value, str(value)))


def _pref_loss(value: Any) -> dict[str, Any]:
    if value in ("sigmoid", "hinge", "ipo"):
        return {"train.loss_type": [value]}
    if value == "orpo":  # ORPO's task (LLaMA-Factory runs it as stage: dpo with this loss)
        return _task("orpo")
    raise ValueError(f"pref_loss: {value} is not a loss tuneforge's task=dpo runs (sigmoid, hinge, ipo; orpo: "
                     "task=orpo)")


def _deepspeed(value: Any) -> dict[str, Any]:
    """A DeepSpeed JSON path -> the launcher of its ZeRO stage with the file (launcher.deepspeed_config)."""
    import json
    from pathlib import Path

    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise ValueError(f"{value} is not here (relative paths start at the working directory); with the file: "
                         "launcher=deepspeed_zero2|deepspeed_zero3 launcher.deepspeed_config=FILE.json")
    stage = (json.loads(path.read_text()).get("zero_optimization") or {}).get("stage")
    if stage not in (2, 3):
        raise ValueError(f"{value}: ZeRO stage {stage}; tuneforge launches stage 2 or 3 (launcher=deepspeed_zero2|3)")
    return {"launcher.name": f"deepspeed_zero{stage}", "launcher.deepspeed_config": str(value)}


# Axolotl's `fsdp:` options and fsdp_config keys -> launcher.* (tuneforge wraps transformer layers itself).
_FSDP_SHARDING = {"full_shard": "FULL_SHARD", "shard_grad_op": "SHARD_GRAD_OP", "hybrid_shard": "HYBRID_SHARD",
                  "no_shard": "NO_SHARD"}
_FSDP_KEYS = {"fsdp_offload_params": "launcher.fsdp_offload_params", "offload_params": "launcher.fsdp_offload_params",
              "fsdp_sharding_strategy": "launcher.fsdp_sharding_strategy",
              "fsdp_state_dict_type": "launcher.fsdp_state_dict_type", "state_dict_type": "launcher.fsdp_state_dict_type",
              "fsdp_use_orig_params": "launcher.fsdp_use_orig_params", "use_orig_params": "launcher.fsdp_use_orig_params",
              "fsdp_cpu_ram_efficient_loading": "launcher.fsdp_cpu_ram_efficient_loading",
              "cpu_ram_efficient_loading": "launcher.fsdp_cpu_ram_efficient_loading"}


def _fsdp(value: Any) -> dict[str, Any]:
    options = value.split() if isinstance(value, str) else list(value or [])
    if not options:
        return {}
    out: dict[str, Any] = {"launcher.name": "fsdp"}
    for option in options:
        if option in _FSDP_SHARDING:
            out["launcher.fsdp_sharding_strategy"] = _FSDP_SHARDING[option]
        elif option == "offload":
            out["launcher.fsdp_offload_params"] = True
    return out


def _fsdp_config(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("fsdp_config is a mapping of FSDP settings")
    out, left = {}, []
    for key, v in value.items():
        if key in _FSDP_KEYS:
            out[_FSDP_KEYS[key]] = str(v).upper() if key.endswith("state_dict_type") or key.endswith("sharding_strategy") else v
        else:
            left.append(key)
    why = (f"{NO_EQUIVALENT}: tuneforge wraps transformer layers itself (launcher.fsdp_* keys, or "
           "launcher.fsdp_config=FILE for your own settings)")
    if left and not out:
        raise ValueError(why.partition(": ")[2])
    return {**out, SKIPPED: [(k, why) for k in left]} if left else out


_RUN_DIR = "every run gets its own new directory (hydra.run.dir); tuneforge never writes into an old one"
_TRACKER_ENV = "set it in the environment ({env}) and train.report_to=[{tool}]"

# Keys both tools share with the same meaning.
_SHARED = {
    "output_dir": _skip(ALWAYS, _RUN_DIR),
    "deepspeed": _key("launcher.deepspeed_config", "the launcher of the JSON's ZeRO stage, with the file", _deepspeed),
    "trust_remote_code": _key("model.trust_remote_code"),
    "warmup_ratio": _key("train.warmup_steps", "transformers 5: a warmup_steps below 1 is a fraction of the steps"),
    "bf16": _key("train.bf16", convert=_bf16),
    "report_to": _key("train.report_to", convert=lambda v: {"train.report_to": [v] if isinstance(v, str) else v}),
}

AXOLOTL: dict[str, Alias] = {
    **_SHARED,
    "base_model": _key("model.name_or_path"),
    "base_model_config": _skip(NO_EQUIVALENT, "the model's own config is read from model.name_or_path"),
    "revision_of_model": _key("model.revision"),
    "tokenizer_config": _key("tokenizer.name_or_path"),
    "model_type": _skip(ALWAYS, "the model class comes from the task (AutoModelForCausalLM for sft/dpo/kto/orpo, "
                                "AutoModelForSequenceClassification with one output for reward)"),
    "num_labels": _skip(ALWAYS, "the task sizes the head: one output for task=reward, one per label for "
                                "task=classification"),
    "tokenizer_type": _skip(ALWAYS, "AutoTokenizer reads the tokenizer class from model.name_or_path"),
    "is_llama_derived_model": _skip(ALWAYS, "nothing depends on the architecture's family"),
    "strict": _skip(ALWAYS, "configs are always strict: an unknown key fails before anything loads"),
    "adapter": _key("peft.method", "lora | qlora (qlora: quant.load_in_4bit=true)", _adapter),
    "load_in_4bit": _key("quant.load_in_4bit"),
    "load_in_8bit": _key("quant.load_in_8bit", convert=lambda v: {"quant.load_in_8bit": bool(v),
                                                                  **({"quant.load_in_4bit": False} if v else {})}),
    "lora_r": _key("peft.r"),
    "lora_target_modules": _key("peft.target_modules", convert=_target_modules),
    "lora_target_linear": _key("peft.target_modules", "true: every linear layer (all-linear)",
                               lambda v: {"peft.target_modules": "all-linear"} if v else {}),
    "lora_modules_to_save": _key("peft.modules_to_save"),
    "lora_fan_in_fan_out": _key("peft.fan_in_fan_out"),
    "peft_use_dora": _key("peft.use_dora"),
    "peft_use_rslora": _key("peft.use_rslora"),
    "lora_model_dir": _key("model.adapter", "an adapter to start from (task=dpo|kto: an SFT run)"),
    "sequence_len": _key("train.max_length"),
    "sample_packing": _key("packing.mode", "true: best-fit-decreasing packing (packed rows never attend to each other)",
                           lambda v: {"packing.mode": "bfd" if v else "none"}),
    "pad_to_sequence_len": _skip(NO_EQUIVALENT, "batches are padded to their longest row "
                                 "(collator.pad_to_multiple_of rounds it up)"),
    "eval_sample_packing": _skip(ALWAYS, "the held-out split is never packed"),
    "datasets": _key("data.path", "path/type/split/name of each data set (several: data.mix)"),
    "test_datasets": _skip(NO_EQUIVALENT, "a held-out split of the same source: data.eval_split or data.eval_fraction"),
    "dataset_prepared_path": _key("data.cache_dir"),
    "dataset_processes": _key("data.num_proc"),
    "shuffle_merged_datasets": _key("data.shuffle"),
    "val_set_size": _key("data.eval_fraction"),
    "micro_batch_size": _key("train.per_device_train_batch_size"),
    "eval_batch_size": _key("train.per_device_eval_batch_size"),
    "num_epochs": _key("train.num_train_epochs"),
    "optimizer": _key("train.optim"),
    "lr_scheduler": _key("train.lr_scheduler_type"),
    "warmup_steps": _key("train.warmup_steps"),
    "train_on_inputs": _key("collator.name", "false: prompts masked (completion_only); true: every token (lm)",
                            lambda v: {"collator.name": "lm" if v else "completion_only"}),
    "group_by_length": _key("train.train_sampling_strategy", convert=lambda v: {
        "train.train_sampling_strategy": "group_by_length"} if v else {}),
    "gradient_checkpointing_kwargs": _key("train.gradient_checkpointing_kwargs"),
    "flash_attention": _key("model.attn_implementation", "true: flash_attention_2", _attn),
    "sdp_attention": _key("model.attn_implementation", convert=lambda v: {"model.attn_implementation": "sdpa"} if v else {}),
    "xformers_attention": _skip(NO_EQUIVALENT, "model.attn_implementation=sdpa|flash_attention_2"),
    "evals_per_epoch": _skip(NO_EQUIVALENT, "train.eval_strategy=steps with train.eval_steps"),
    "saves_per_epoch": _skip(NO_EQUIVALENT, "train.save_strategy=steps with train.save_steps"),
    "early_stopping_patience": _skip(NO_EQUIVALENT, "callbacks=[transformers:EarlyStoppingCallback] is not "
                                     "configurable from a recipe; write your own callback (callbacks=[module:Class])"),
    "local_rank": _skip(ALWAYS, "the launcher sets each process's rank"),
    "special_tokens": _key("tokenizer.pad_token", "pad_token only: the end-of-turn token comes from the chat template",
                           lambda v: {"tokenizer.pad_token": v["pad_token"]} if "pad_token" in (v or {}) else {}),
    "tokens": _key("tokenizer.add_tokens"),
    "chat_template": _key("tokenizer.chat_template", "the chat format by name", lambda v: _template(v, {
        "tokenizer_default": "keep", "qwen_25": "qwen2.5", "phi_3": "phi3", "mistral_v7_tekken": "mistral",
        "mistral_v2v3": "mistral", "gemma3": "gemma"})),
    "fsdp": _key("launcher.name", "launcher=fsdp, its sharding strategy and offload", _fsdp),
    "fsdp_config": _key("launcher.fsdp_offload_params", "the launcher.fsdp_* settings tuneforge has", _fsdp_config),
    "wandb_project": _key("train.report_to", _TRACKER_ENV.format(env="WANDB_PROJECT", tool="wandb"), _report("wandb")),
    "wandb_entity": _skip(NO_EQUIVALENT, _TRACKER_ENV.format(env="WANDB_ENTITY", tool="wandb")),
    "wandb_watch": _skip(NO_EQUIVALENT, _TRACKER_ENV.format(env="WANDB_WATCH", tool="wandb")),
    "wandb_name": _key("train.run_name"),
    "wandb_log_model": _skip(NO_EQUIVALENT, _TRACKER_ENV.format(env="WANDB_LOG_MODEL", tool="wandb")),
    "mlflow_tracking_uri": _key("train.report_to", _TRACKER_ENV.format(env="MLFLOW_TRACKING_URI", tool="mlflow"),
                                _report("mlflow")),
    "mlflow_experiment_name": _skip(NO_EQUIVALENT, _TRACKER_ENV.format(env="MLFLOW_EXPERIMENT_NAME", tool="mlflow")),
    "hub_model_id": _key("train.hub_model_id"),
    "rl": _key("task", "dpo | ipo (task=dpo, train.loss_type=[ipo]) | kto | orpo", _rl),
    "rl_beta": _key("train.beta"),
    "orpo_alpha": _key("train.beta", "ORPO's lambda, the odds-ratio term's weight (task=orpo)"),
    "dpo_beta": _key("train.beta"),
    "reward_model": _key("task", "a reward model (task=reward)", lambda v: _reward() if v else {}),
    "neftune_noise_alpha": _key("train.neftune_noise_alpha"),
    "torch_compile": _key("train.torch_compile"),
    "plugins": _skip(NO_EQUIVALENT, "Liger's kernels: train.use_liger_kernel (on by default where CUDA is)"),
    "liger_fused_linear_cross_entropy": _skip(REFUSED_BY_DESIGN, "TRL's SFTTrainer refuses Liger's fused linear "
                                              "cross-entropy; the other Liger kernels: train.use_liger_kernel"),
    "unfrozen_parameters": _skip(NO_EQUIVALENT, "peft.modules_to_save trains whole modules beside LoRA"),
    "debug": _skip(NO_EQUIVALENT, "tuneforge doctor / tuneforge preview show the prepared rows and their masks"),
}

LLAMAFACTORY: dict[str, Alias] = {
    **_SHARED,
    "model_name_or_path": _key("model.name_or_path"),
    "adapter_name_or_path": _key("model.adapter", "an adapter to start from (task=dpo|kto: an SFT run)"),
    "stage": _key("task", "sft | pt (task=sft on text, every token trained) | dpo | kto | rm (task=reward)", _stage),
    "do_train": _skip(ALWAYS, "the command (tuneforge train) says what runs"),
    "do_eval": _skip(ALWAYS, "train.eval_strategy, or the command tuneforge eval"),
    "do_predict": _skip(ALWAYS, "the command tuneforge eval"),
    "finetuning_type": _key("peft.method", "lora | full (peft.method=none, unquantized)", _finetuning_type),
    "lora_rank": _key("peft.r"),
    "lora_target": _key("peft.target_modules", "all: every linear layer (all-linear)", _target_modules),
    "additional_target": _key("peft.modules_to_save", convert=lambda v: {
        "peft.modules_to_save": [m.strip() for m in v.split(",")] if isinstance(v, str) else v}),
    "quantization_bit": _key("quant.load_in_4bit", "4 | 8 (bitsandbytes)", _bits),
    "quantization_method": _skip(ALWAYS, "bitsandbytes is tuneforge's quantizer (quant.*)"),
    "double_quantization": _key("quant.bnb_4bit_use_double_quant"),
    "template": _key("tokenizer.chat_template", "the chat format by name", lambda v: _template(v, {
        "qwen": "qwen2.5", "phi": "phi3", "default": "keep", "empty": "keep"})),
    "dataset": _key("data.path", "NAME of dataset_info.json (DIR/dataset_info.json:NAME)"),
    "dataset_dir": _key("data.path", "the folder of dataset_info.json"),
    "eval_dataset": _skip(NO_EQUIVALENT, "a held-out split of the same source: data.eval_split or data.eval_fraction"),
    "cutoff_len": _key("train.max_length"),
    "overwrite_cache": _key("data.cache", "true: prepare the data again (data.cache=false)",
                            lambda v: {"data.cache": not v}),
    "preprocessing_num_workers": _key("data.num_proc"),
    "val_size": _key("data.eval_fraction"),
    "plot_loss": _skip(ALWAYS, "every run writes loss.png"),
    "overwrite_output_dir": _skip(ALWAYS, _RUN_DIR),
    "packing": _key("packing.mode", "true: best-fit-decreasing packing", lambda v: {"packing.mode": "bfd" if v else "none"}),
    "neat_packing": _key("packing.mode", "packed rows never attend to each other in tuneforge's packing",
                         lambda v: {"packing.mode": "bfd"} if v else {}),
    "train_on_prompt": _key("collator.name", "true: every token trained (lm)",
                            lambda v: {"collator.name": "lm" if v else "completion_only"}),
    "mask_history": _skip(NO_EQUIVALENT, "tuneforge trains every assistant turn (collator=assistant_only)"),
    "new_special_tokens": _key("tokenizer.add_special_tokens", convert=lambda v: {
        "tokenizer.add_special_tokens": [t.strip() for t in v.split(",")] if isinstance(v, str) else v}),
    "resize_vocab": _skip(ALWAYS, "the embeddings grow when added tokens need rows"),
    "flash_attn": _key("model.attn_implementation", "fa2 | sdpa | disabled (eager) | auto (sdpa)", _attn),
    "enable_liger_kernel": _key("train.use_liger_kernel"),
    "use_unsloth": _skip(NO_EQUIVALENT, "tuneforge trains with transformers/TRL/PEFT kernels (Liger: train.use_liger_kernel)"),
    "pref_beta": _key("train.beta"),
    "pref_loss": _key("train.loss_type", "sigmoid | hinge | ipo | orpo (task=orpo)", _pref_loss),
    "pissa_init": _key("peft.init_lora_weights", convert=lambda v: {"peft.init_lora_weights": "pissa"} if v else {}),
    "streaming": _skip(NO_EQUIVALENT, "tuneforge prepares and caches the data before training (data.max_samples caps it)"),
    "upcast_layernorm": _skip(ALWAYS, "prepare_model_for_kbit_training upcasts the non-quantized weights "
                              "(quant.upcast_non_quantized)"),
}

TABLES = {"axolotl": AXOLOTL, "llamafactory": LLAMAFACTORY}


def same_name(key: str, valid: list[str]) -> Optional[str]:
    """The one tuneforge key (of `valid`, dotted) whose last part is `key`; None when none or several are."""
    found = [k for k in valid if k.count(".") == 1 and k.rsplit(".", 1)[-1] == key]
    return found[0] if len(found) == 1 else None


def lookup(key: str) -> list[tuple[str, Alias]]:
    """[(tool, alias)] for a peer key name (the last part of a dotted key), in TOOLS order."""
    return [(tool, TABLES[tool][key]) for tool in TOOLS if key in TABLES[tool]]


def explain(key: str) -> Optional[str]:
    """What a pasted peer key is in tuneforge, for the unknown-key message; None for a name no peer uses. Keys
    whose name the libraries share (learning_rate, ...) are not peer names: the caller's own rules answer."""
    found = lookup(key)
    if not found:
        return None
    owners = " and ".join(f"{TOOLS[tool]}'s" for tool, _ in found)
    alias = found[0][1]
    if any(a.target != alias.target or a.skip != alias.skip for _, a in found):  # the tools mean different things
        return "; ".join(_sentence(f"{TOOLS[tool]}'s", key, a) for tool, a in found)
    return _sentence(owners, key, alias)


def _sentence(owners: str, key: str, alias: Alias) -> str:
    if alias.target:
        return f"{owners} {key} is {alias.target} in tuneforge" + (f" ({alias.note})." if alias.note else ".")
    return f"{owners} {key} is not a tuneforge key ({alias.skip}): {alias.note}."
