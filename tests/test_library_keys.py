"""Every field of SFTConfig (and TrainingArguments), LoraConfig and BitsAndBytesConfig is a key of ours: set to a
valid non-default value on the command line, it composes and arrives unchanged in the object the run builds
(no model is loaded). Fields tuneforge owns are refused, naming the key that replaces them."""

from __future__ import annotations

import dataclasses
import enum
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuneforge.config import library_args, library_keys
from tuneforge.config.compose import load_config
from tuneforge.config.errors import ConfigError

RUN = Path("/nonexistent/run")

# Values the generic rule below cannot pick (free-form strings, numbers with a meaning, mappings the library
# reads), and the companions some values need to be valid at all (the library's own cross-field rules).
VALUES: dict[str, object] = {
    "train.optim_args": "amsgrad=True",
    "train.metric_for_best_model": "eval_loss",
    "train.run_name": "my-run",
    "train.project": "my-project",
    "train.hub_model_id": "me/my-model",
    "train.hub_token": "hf_not_a_real_token",
    "train.hub_revision": "main",
    "train.trackio_space_id": "me/space",
    "train.trackio_bucket_id": "me/bucket",
    "train.trackio_static_space_id": "me/static",
    "train.lr_scheduler_kwargs": {"power": 2.0},
    "train.liger_kernel_config": {"rms_norm": False},
    "train.accelerator_config": {"even_batches": False},
    "train.include_for_metrics": ["inputs"],
    "train.label_names": ["labels"],
    "train.optim_target_modules": ["q_proj"],
    "train.debug": "underflow_overflow",
    "train.torch_compile_backend": "eager",
    "train.torch_compile_mode": "reduce-overhead",
    "train.ddp_backend": "gloo",
    "train.dataloader_multiprocessing_context": "spawn",
    "train.length_column_name": "n_tokens",
    "train.log_level": "info",
    "train.log_level_replica": "error",
    "train.report_to": ["tensorboard"],
    "train.warmup_steps": 0.1,
    "train.eval_delay": 1.0,
    "train.logging_steps": 3.0,
    "train.save_steps": 6.0,
    "train.eval_steps": 3.0,
    "train.use_liger_kernel": False,  # true needs the liger-kernel package (refused clearly without it)
    "train.bf16": True,
    "train.use_cpu": True,
    "train.data_seed": 7,
    "train.max_length": 256,
    "train.truncation_mode": "keep_end",
    "train.router_aux_loss_coef": 0.01,
    "peft.target_modules": ["q_proj", "v_proj"],
    "peft.exclude_modules": ["k_proj"],
    "peft.init_lora_weights": "gaussian",
    "peft.layers_to_transform": [0, 1],
    "peft.layers_pattern": "layers",
    "peft.rank_pattern": {"q_proj": 8},
    "peft.alpha_pattern": {"q_proj": 16},
    "peft.modules_to_save": ["lm_head"],
    "peft.megatron_config": {"num_layers": 2},
    "peft.megatron_core": "megatron.core2",
    "peft.layer_replication": [[0, 2]],
    "peft.target_parameters": ["mlp.experts.gate_up_proj"],
    "peft.alora_invocation_tokens": [1, 2],
    "peft.bias": "lora_only",
    # Nested config objects, given as mappings of their fields (PEFT builds the object).
    "peft.arrow_config": {"top_k": 2},
    "peft.kasa_config": {"beta": 0.5},
    "peft.monteclora_config": {"num_samples": 4},
    "peft.velora_config": {"num_groups": 8},
    "peft.runtime_config": {"ephemeral_gpu_offload": True},
    "peft.use_bdlora": {"nblocks": 4},
    "quant.llm_int8_skip_modules": ["lm_head"],
    "quant.bnb_4bit_compute_dtype": "bfloat16",
    "quant.bnb_4bit_quant_storage": "bfloat16",
    "quant.bnb_4bit_quant_type": "fp4",
}
# Companions: another key's value that this one needs (transformers, PEFT and bitsandbytes refuse it alone).
NEEDS: dict[str, dict[str, object]] = {
    "train.fp16": {"train.bf16": False},  # one mixed precision at a time
    "train.fp16_full_eval": {"train.bf16": False},
    "train.bf16_full_eval": {"train.bf16": True},
    "train.load_best_model_at_end": {"train.eval_strategy": "steps", "train.eval_steps": 3.0, "train.save_steps": 6.0},
    "train.metric_for_best_model": {"train.eval_strategy": "steps", "train.eval_steps": 3.0},
    "train.eval_on_start": {"train.eval_strategy": "steps", "train.eval_steps": 3.0},
    "train.eval_strategy": {"train.eval_steps": 3.0},
    "train.dataloader_prefetch_factor": {"train.dataloader_num_workers": 1},
    "train.dataloader_pin_memory": {"train.use_cpu": False},  # use_cpu turns pinning off
    "peft.layers_to_transform": {"peft.target_modules": ["q_proj"]},  # not with the "all-linear" string
    "peft.layers_pattern": {"peft.layers_to_transform": [0], "peft.target_modules": ["q_proj"]},
    "train.dataloader_persistent_workers": {"train.dataloader_num_workers": 1},
    "train.torch_compile_backend": {"train.torch_compile": True},
    "train.torch_compile_mode": {"train.torch_compile": True},
    "train.hub_strategy": {"train.push_to_hub": True},
    "train.fp16": {"train.bf16": False},
    "train.save_strategy": {"train.load_best_model_at_end": False},
    "peft.use_qalora": {"peft.use_dora": False},
    "peft.lora_bias": {"peft.init_lora_weights": True},
    "peft.qalora_group_size": {"peft.use_qalora": True},
    "quant.llm_int8_threshold": {"quant.load_in_4bit": False, "quant.load_in_8bit": True},
    "quant.llm_int8_skip_modules": {"quant.load_in_4bit": False, "quant.load_in_8bit": True},
    "quant.llm_int8_enable_fp32_cpu_offload": {"quant.load_in_4bit": False, "quant.load_in_8bit": True},
    "quant.llm_int8_has_fp16_weight": {"quant.load_in_4bit": False, "quant.load_in_8bit": True},
    "quant.load_in_8bit": {"quant.load_in_4bit": False},
    "quant.load_in_4bit": {"peft.method": "lora"},
}
# What each field may not be checked against, and why (everything else is).
NOT_WALKED = {
    "train.resume_from_checkpoint": "tuneforge resolves it (auto | true | a path) and hands it to trainer.train(); "
                                    "tests/test_runs_e2e.py resumes through it",
    "train.gradient_checkpointing": "applied to the model by tuneforge (test_gradient_checkpointing_keys_reach_the_model)",
    "train.gradient_checkpointing_kwargs": "applied to the model by tuneforge (same test)",
    "train.activation_checkpointing": "transformers 5.25's name for gradient_checkpointing (same test)",
    "train.activation_checkpointing_kwargs": "the same for the kwargs (same test)",
    "train.parallelism_config": "an accelerate ParallelismConfig needs a distributed launch",
    "train.ddp_backend": "read by torch.distributed when the TrainingArguments are built: only in a launched process "
                         "(launcher=ddp picks it)",
    "train.tf32": "TrainingArguments refuses tf32 without an Ampere-or-newer CUDA GPU (test_tf32_is_refused_on_a_cpu)",
    "peft.megatron_config": "read only with megatron_core installed",
    "peft.loftq_config": "refused: tuneforge's LoftQ (4-bit, replace_lora_weights_loftq) takes no options "
                         "(tests/test_lora_variants.py refusals)",
    "peft.eva_config": "refused with the data-driven initialisations (the same test)",
    "peft.corda_config": "the same",
    "peft.lora_ga_config": "the same",
}


def _sections(task: str = "sft"):
    return {"train": library_args.trainer_target(task), "peft": library_args.LORA, "quant": library_args.BNB}


def _value(key: str, spec: dict):
    """A valid value different from tuneforge's default."""
    if key in VALUES:
        return VALUES[key]
    section, name = key.split(".", 1)
    default = library_keys.SECTIONS[section].keys()[name]["default"]
    kind = spec["kind"]
    if spec["choices"]:
        return next(str(c) for c in spec["choices"] if str(c) != str(default))
    if kind == "bool":
        return not default if default is not None else True
    if kind == "int":
        return (default or 0) + 3
    if kind == "float":
        return (default or 0.0) + 0.25
    raise AssertionError(f"{key} ({kind}, default {default!r}) needs an entry in VALUES")


def _hydra(value) -> str:
    """A value as a person types it in a Hydra override."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_hydra(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra(v) for v in value) + "]"
    if isinstance(value, str) and any(c in value for c in "=,[]{}() "):
        return f"'{value}'"
    return str(value)


def _override(key: str, value) -> str:
    return f"{key}={_hydra(value)}"


def _arrived(obj, name: str):
    value = getattr(obj, name)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, set):
        return sorted(value)
    if isinstance(value, list):
        return [v.value if isinstance(v, enum.Enum) else v for v in value]
    return value


def _build(cfg):
    return {"train": library_args.trainer_arguments(cfg, RUN), "peft": library_args.lora_config(cfg.peft),
            "quant": library_args.quantization_config(cfg.quant)}


def _walk(task: str = "sft") -> list[str]:
    keys = []
    for section, target in _sections(task).items():
        for name in library_keys.library_fields(target):
            key = f"{section}.{name}"
            if name in library_keys.SECTIONS[section].owned or key in NOT_WALKED:
                continue
            keys.append(key)
    return keys


def _expected(key: str, value, obj_value):
    if isinstance(value, dict) and isinstance(obj_value, dict) and set(value) < set(obj_value):
        return {**obj_value, **value}  # a nested config object: the fields given, the rest its defaults
    if isinstance(value, list) and isinstance(obj_value, tuple):
        return tuple(value)
    if key == "train.debug":  # TrainingArguments splits the option string into a list
        return value.split()
    return value


def _check(keys: list[str], task: str) -> list[str]:
    """Set every key in `keys` (with its companions) in one composition, build, and compare; the failures."""
    extra = ["task=classification", "collator=padding"] if task == "classification" else []
    values = {key: _value(key, library_keys.library_fields(_sections(task)[key.split(".")[0]])[key.split(".", 1)[1]])
              for key in keys}
    companions = [_override(k, v) for key in keys for k, v in NEEDS.get(key, {}).items()]
    cfg = load_config([*extra, *companions, *(_override(k, v) for k, v in values.items())])
    built = _build(cfg)
    failures = []
    for key, value in values.items():
        section, name = key.split(".", 1)
        obj = built[section]
        if key == "quant.load_in_4bit" and value is False:
            if obj is not None:  # neither 4- nor 8-bit: the weights load unquantized, no BitsAndBytesConfig
                failures.append(f"{key}=false still built {obj}")
            continue
        got = _arrived(obj, name)
        want = _expected(key, value, got)
        if got != want and not (isinstance(want, float) and got == pytest.approx(want)):
            failures.append(f"{key}: set {want!r}, the {type(obj).__name__} holds {got!r}")
    return failures


def _check_each(keys: list[str], task: str) -> list[str]:
    failures = []
    for key in keys:
        try:
            failures += _check([key], task)
        except ConfigError as exc:
            failures.append(f"{key}: {exc}")
    return failures


@pytest.mark.filterwarnings("ignore:The `'keep_end'` truncation mode is deprecated:FutureWarning")
@pytest.mark.parametrize("task", ["sft", "classification"])
def test_every_library_field_arrives_unchanged(task):
    """Every key (with its companions) composed from the command line and built, no model: the value the user
    typed is the value the library object holds. Keys that need the same companions go in groups of 25 (one
    composition each: 0.2 s); a group that fails is retried key by key, so a failure names its key."""
    walked = [k for k in _walk(task) if task == "sft" or k.startswith("train.")]
    assert len(walked) > (100 if task == "sft" else 80)
    by_companions: dict[str, list[str]] = {}
    for key in walked:
        by_companions.setdefault(repr(sorted(NEEDS.get(key, {}).items())), []).append(key)
    failures = []
    for keys in by_companions.values():
        for batch in (keys[i:i + 25] for i in range(0, len(keys), 25)):
            try:
                found = _check(batch, task)
            except ConfigError as exc:
                found = [str(exc)]
            failures += _check_each(batch, task) if found and len(batch) > 1 else found
    assert not failures, "\n".join(failures)


def test_walk_covers_every_field_but_the_documented_ones():
    """Every field of the three classes is walked, owned (refused below) or listed in NOT_WALKED with a reason;
    each NOT_WALKED key is still a key of ours."""
    for section, target in _sections().items():
        fields = set(library_keys.library_fields(target))
        # Owned keys of another task's trainer config (GRPOConfig's reward_weights) are not this class's fields.
        owned = set(library_keys.SECTIONS[section].owned) & fields
        walked = {k.split(".", 1)[1] for k in _walk() if k.startswith(section + ".")}
        skipped = {k.split(".", 1)[1] for k in NOT_WALKED if k.startswith(section + ".")}
        assert fields == walked | owned | skipped, (section, fields - walked - owned - skipped)
        assert skipped <= set(library_keys.SECTIONS[section].keys())


@pytest.mark.parametrize("section", ["train", "peft", "quant"])
def test_owned_and_renamed_library_keys_name_their_replacement(section):
    sec = library_keys.SECTIONS[section]
    for name, replacement in {**sec.owned, **sec.renamed}.items():
        with pytest.raises(ConfigError) as exc:
            load_config([f"{section}.{name}=1"])
        assert replacement in str(exc.value), (name, str(exc.value))


@pytest.mark.parametrize("override, expected", [
    ("train.lora_r=8", "Did you mean peft.r?"),
    ("train.lora_alpha=8", "Did you mean 'peft.lora_alpha'?"),
    ("peft.load_in_4bit=true", "Did you mean 'quant.load_in_4bit'?"),
    ("train.packing=true", "use packing=bfd"),
    ("train.max_seq_length=512", "use train.max_length"),
    ("train.warmup_ratio=0.03", "use train.warmup_steps"),
    ("train.adam_beta3=0.9", "Did you mean 'train.adam_beta2'?"),
    ("train.lr_scheduler_type=cosin", "Did you mean 'cosine'?"),
    ("peft.bias=some", "choose one of none, all, lora_only"),
])
def test_unknown_and_wrong_keys_suggest_the_real_ones(override, expected):
    with pytest.raises(ConfigError) as exc:
        load_config([override])
    assert expected in str(exc.value)


def test_a_key_of_another_task_is_refused():
    load_config(["train.loss_type=dft"])  # an SFTConfig field: fine for task=sft
    with pytest.raises(ConfigError, match=r"train.loss_type is a DPOConfig/GRPOConfig/KTOConfig/SFTConfig key, but task=classification "
                                          r"trains with TrainingArguments"):
        load_config(["recipe=classify-demo", "train.loss_type=dft"])
    assert load_config(["recipe=classify-demo", "train.max_length=64"]).train.max_length == 64  # read by every task


def test_the_library_refuses_what_it_cannot_do_before_anything_loads():
    cfg = load_config(["train.tf32=true"])
    if torch.cuda.is_available():
        pytest.skip("tf32 is legal on this CUDA machine")
    with pytest.raises(ConfigError, match=r"train.\*: SFTConfig refused these settings: --tf32 requires Ampere"):
        library_args.check(cfg)


def test_hydra_style_mappings_and_lists():
    cfg = load_config(["data.columns={sentence: prompt, translation_extra: completion}",
                       "train.lr_scheduler_kwargs={min_lr: 1.0e-5}", "peft.target_modules=[q_proj,v_proj]",
                       "peft.rank_pattern={q_proj: 8}", "peft.alpha_pattern.q_proj=16"])
    assert cfg.data.columns == {"sentence": "prompt", "translation_extra": "completion"}
    assert cfg.peft.rank_pattern == {"q_proj": 8} and cfg.peft.alpha_pattern == {"q_proj": 16}
    lora = library_args.lora_config(cfg.peft)
    assert lora.target_modules == {"q_proj", "v_proj"} and lora.rank_pattern == {"q_proj": 8}
    args = library_args.trainer_arguments(load_config(["train.lr_scheduler_type=cosine_with_min_lr",
                                                       "train.lr_scheduler_kwargs={min_lr: 1.0e-5}"]), RUN)
    assert args.lr_scheduler_kwargs == {"min_lr": 1e-5}
    assert load_config(["data.columns.sentence=prompt"]).data.columns == {"sentence": "prompt"}
    with pytest.raises(ConfigError, match="train.liger_kernel_config.rms_norm"):  # typed values stay typed
        load_config(["train.liger_kernel_config={rms_norm: maybe}"])


def test_gradient_checkpointing_keys_reach_the_model():
    """tuneforge applies checkpointing itself (before LoRA wraps the model): the user's kwargs are merged into
    that call; transformers 5.25's activation_checkpointing names the same switch; reentrant is refused."""
    from tuneforge.config.library_args import checkpointing_kwargs

    cfg = load_config(["train.gradient_checkpointing=true", "train.gradient_checkpointing_kwargs={preserve_rng_state: false}"])
    assert checkpointing_kwargs(cfg.train) == {"use_reentrant": False, "preserve_rng_state": False}
    assert load_config(["train.gradient_checkpointing=true", "train.activation_checkpointing=false"]).train.gradient_checkpointing is False
    with pytest.raises(ConfigError, match="use_reentrant=true"):
        load_config(["train.gradient_checkpointing_kwargs={use_reentrant: true}"])
    args = library_args.trainer_arguments(cfg, RUN)  # the Trainer must not enable it a second time
    assert not args.gradient_checkpointing and not getattr(args, "activation_checkpointing", False)


def test_tuneforge_defaults_that_differ_from_the_library_are_listed_with_a_reason():
    """The one place: library_keys.TRAIN/PEFT/QUANT.defaults. Each differs from the library's default and says why;
    the composed config carries them."""
    for section in library_keys.SECTIONS.values():
        library = {}
        for target in dict.fromkeys(section.classes.values()):
            library.update(library_keys.library_fields(target))
        for name, d in section.defaults.items():
            assert name in library and d.why, (section.name, name)
    cfg = load_config(["recipe=sweep-demo"])  # a recipe that leaves these alone
    assert cfg.train.optim == "adamw_torch" and cfg.peft.r == 16 and cfg.quant.bnb_4bit_quant_type == "nf4"
    args = library_args.trainer_arguments(cfg, RUN)
    assert args.bf16 is torch.cuda.is_available() and args.report_to == ["tensorboard"]


def test_callbacks_key_takes_trainer_callback_classes():
    from tuneforge.config import user_code

    with pytest.raises(ConfigError, match="is not module:Class"):
        load_config(["callbacks=[not a path]"])
    (hook,) = user_code.load(["transformers:PrinterCallback"])
    assert type(hook).__name__ == "PrinterCallback"
    with pytest.raises(ConfigError, match="cannot import nowhere.at_all:Hook"):
        user_code.load(["nowhere.at_all:Hook"])
    with pytest.raises(ConfigError, match="is not a transformers TrainerCallback class"):
        user_code.load(["collections:OrderedDict"])


def test_keys_command_lists_types_defaults_and_replacements(capsys):
    from tuneforge.commands import keys

    assert keys.main(["train"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("train.adam_beta2 "))
    assert "float" in line and "0.999" in line and "SFTConfig" in line
    assert any(l.startswith("train.learning_rate ") and "tuneforge default" in l for l in out.splitlines())
    assert any(l.startswith("train.packing ") and "use packing=bfd" in l for l in out.splitlines())
    assert keys.main(["train", "--task", "classification"]) == 0
    classification = capsys.readouterr().out
    assert "train.loss_type " not in classification and "train.max_length " in classification  # SFT-only vs every task
    assert keys.main(["nope"]) == 2


WATCH_BITSANDBYTES = """
import importlib.abc, logging, sys

seen = []

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "bitsandbytes":  # whether tuneforge's filter is on its import-time logger yet
            seen.append(bool(logging.getLogger("bitsandbytes.backends.cpu.ops").filters))

sys.meta_path.insert(0, Watch())
import tuneforge.cli
from tuneforge.config.schemas import TuneforgeConfig  # what every command reads first: derived here, cold
print(seen)
"""


def test_a_cold_schema_cache_imports_the_libraries_behind_the_noise_filters(tmp_path):
    """On a new machine the schemas are derived when the CLI first reads a config, which imports PEFT and so
    bitsandbytes; on a CPU with AVX512-BF16 that import logs a kernel-download failure (seen in `make demo`
    from a fresh clone). Observed by the import itself, so the check does not depend on the processor."""
    env = {**os.environ, "TUNEFORGE_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", WATCH_BITSANDBYTES], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["[True]"]
    assert list((tmp_path / "schemas").glob("*.json"))  # the cache really was cold and got written
