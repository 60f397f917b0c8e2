"""Config schemas (one dataclass per Hydra group), ConfigStore registration and validation.

Keys mirror the library each section feeds: `train.*` are SFTConfig/TrainingArguments names,
`peft.*` LoraConfig names, `quant.*` BitsAndBytesConfig names. Hydra merges the YAML files of
`conf/` into these typed schemas, so an unknown key or a wrong type fails at composition; the
cross-field rules live in `validate()`, the one place they are checked.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config problem a person can fix: names the key and what to do."""


@dataclass
class ModelConfig:
    # "embedded:smollm2-135m-instruct", a hub id, or a local directory.
    name_or_path: str = "embedded:smollm2-135m-instruct"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # auto | float32 | bfloat16 | float16: dtype of the non-quantized weights.
    dtype: str = "auto"
    # sdpa honours packed position ids on CPU and GPU; eager is the reference.
    attn_implementation: str = "sdpa"
    # Where the embedded model's safetensors conversion is cached (default: $TUNEFORGE_CACHE or the user cache).
    cache_dir: Optional[str] = None
    # Hub token for gated/private models. Prefer the HF_TOKEN environment variable; a value set here is used
    # for this process only and is redacted from every file tuneforge writes.
    token: Optional[str] = None


@dataclass
class TokenizerConfig:
    # None: the model's own tokenizer.
    name_or_path: Optional[str] = None
    # auto: PAD must differ from EOS (UNK when it exists and differs, else a new <|pad|>) | unk | new | none | a literal token.
    pad_token: str = "auto"
    # keep | chatml | path to a .jinja file | an inline Jinja template.
    chat_template: str = "keep"
    add_special_tokens: list[str] = field(default_factory=list)
    add_tokens: list[str] = field(default_factory=list)
    # Side used for training batches; generation always pads on the left.
    padding_side: str = "right"


@dataclass
class FormatConfig:
    # instruction | conversational | alpaca | text | template
    strategy: str = "instruction"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    # conversational: a list of {role, content} (or ShareGPT {from, value}) messages.
    messages_column: str = "messages"
    text_column: str = "text"
    # alpaca: instruction/input/output columns (input is optional and omitted when empty).
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    # alpaca: auto (chat template when the tokenizer has one, else the classic Alpaca prompt) | chat | classic
    alpaca_style: str = "auto"
    system_prompt: Optional[str] = None
    # For strategy=template: a format string over the row's columns, and where the response starts.
    # For strategy=text: optional; when set, the text after it is trained (else the collator's template decides).
    template: Optional[str] = None
    response_template: Optional[str] = None
    # text/template/classic alpaca: append the tokenizer's EOS when the text does not end with it (trained).
    append_eos: bool = True
    # task=classification: the label column (class names or integer ids); the text comes from text_column.
    label_column: str = "label"


@dataclass
class MixSourceConfig:
    """One source of a data mix (`data.mix`): where the rows come from and how they are formatted."""

    path: str = MISSING
    name: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    eval_split: Optional[str] = None
    columns: dict[str, str] = field(default_factory=dict)
    # Sampling probability of this source (normalised over the mix); set for every source or none.
    weight: Optional[float] = None
    # Row cap for this source (applied after the held-out split).
    max_samples: Optional[int] = None
    # None: the top-level `format` section.
    format: Optional[FormatConfig] = None


@dataclass
class DataConfig:
    # builtin:dates (the demo set), a hub dataset id, or a local file/directory/glob (json, jsonl, csv, tsv,
    # parquet, txt). Ignored when `mix` is set.
    path: str = "builtin:dates"
    name: Optional[str] = None
    # A split name or a slice in datasets' syntax: train, train[:100], train[10%:].
    split: str = "train"
    revision: Optional[str] = None
    # Held-out split: an existing split name, else a seeded fraction of the training rows.
    eval_split: Optional[str] = None
    eval_fraction: float = 0.1
    # Cap on training rows (taken after shuffling); with `mix` + weights, the mixed total.
    max_samples: Optional[int] = None
    # Shuffle the training rows (seeded) before capping them.
    shuffle: bool = True
    seed: int = 42
    # Rows the builtin generators produce.
    builtin_rows: int = 600
    # Rename source columns to the names the format expects, e.g. {sentence: prompt}.
    columns: dict[str, str] = field(default_factory=dict)
    # Several sources, each with its own columns/format/weight; replaces path/name/split/columns.
    mix: list[MixSourceConfig] = field(default_factory=list)
    num_proc: Optional[int] = None
    # Rows per `datasets.map` batch: larger batches keep the tokenizer busier (fewer pauses between batches);
    # lower it for very long rows (memory).
    map_batch_size: int = 2000
    # drop | error: what to do with malformed rows (always counted and reported).
    on_bad_row: str = "drop"
    # Reuse tokenized data keyed by the data content, the format and the tokenizer content.
    cache: bool = True
    # None: <tuneforge cache>/data ($TUNEFORGE_CACHE or the user cache dir).
    cache_dir: Optional[str] = None


@dataclass
class CollatorConfig:
    # completion_only (masks prompts) | assistant_only (chat-template assistant turns) | lm (trains every token)
    # | padding (classification). Masks are built when the data is tokenized; the collator only pads/flattens.
    name: str = "completion_only"
    # completion_only, text rows without trained spans: where a response starts. A string (found in the text,
    # i.e. in context) or token ids as tokenized in context (e.g. tokenizer.encode("\n### Assistant:")[2:]).
    response_template: Optional[Any] = None
    # With response_template: where a user turn starts, so multi-turn text trains every response and no prompt.
    instruction_template: Optional[Any] = None
    # Pad each batch (or padding-free row) to a multiple of this, e.g. 8 or 64 for GPU kernels.
    pad_to_multiple_of: Optional[int] = None


@dataclass
class PackingConfig:
    # none | padding_free (each batch flattened into one row: no padding) | bfd (best-fit-decreasing rows of
    # train.max_length) | wrapped (concatenate and cut into rows of train.max_length). Packed sequences never
    # attend to each other: position ids restart per sequence, and a start-up probe checks it.
    # auto (the shipped default): bfd on CUDA, none on CPU (tuneforge/device_defaults.py).
    mode: str = "none"


@dataclass
class QuantConfig:
    load_in_4bit: bool = True
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    # auto: bfloat16 where the device supports it, else float32.
    bnb_4bit_compute_dtype: str = "auto"
    bnb_4bit_quant_storage: Optional[str] = None


@dataclass
class PeftConfig:
    # lora | none (none = full fine-tune of the unquantized model)
    method: str = "lora"
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # "all-linear" or a list of module names.
    target_modules: Any = "all-linear"
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    # Train the embeddings of tokens added by the tokenizer config (PEFT trainable_token_indices); a new
    # token starting as the mean embedding means nothing until trained. PAD is never included.
    train_new_tokens: bool = True


@dataclass
class TrainConfig:
    learning_rate: float = 2e-4
    max_steps: int = -1
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    # keep_start | keep_end (SFTConfig.truncation_mode)
    truncation_mode: str = "keep_start"
    warmup_steps: float = 0.0
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    logging_steps: int = 5
    seed: int = 42
    gradient_checkpointing: bool = True
    # Checkpoints (adapter + optimizer + RNG states) every save_steps, the newest save_total_limit kept.
    save_strategy: str = "steps"
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    # Continue from a checkpoint (transformers' name): auto (the latest complete checkpoint in the run
    # directory, or a fresh start if none) | true (the same; none is an error) | a checkpoint path | null.
    # With hydra.run.dir=RUN, resuming into RUN is allowed (a run directory is otherwise never reused).
    resume_from_checkpoint: Optional[str] = None
    # tuneforge-only (not an SFTConfig name): stop after this many optimizer steps in a row whose gradient
    # (or logged loss) is NaN/inf; such steps are skipped, so the last checkpoint stays the last good one.
    nan_patience: int = 1
    eval_strategy: str = "no"
    eval_steps: Optional[int] = None
    load_best_model_at_end: bool = False
    # With load_best_model_at_end / save_strategy=best: None = eval loss (lower is better), as in transformers.
    metric_for_best_model: Optional[str] = None
    greater_is_better: Optional[bool] = None
    # tensorboard | wandb | mlflow | ... | none | all (as in transformers); a name or a list of names.
    report_to: Any = field(default_factory=lambda: ["tensorboard"])
    dataloader_num_workers: int = 0
    # auto: bf16 on CUDA devices that support it, fp32 elsewhere.
    bf16: Optional[bool] = None
    # Liger's RMSNorm/RoPE/SwiGLU kernels (SFTConfig.use_liger_kernel); null: on where CUDA and
    # liger-kernel are available (pip install 'tuneforge[gpu]'), off elsewhere.
    use_liger_kernel: Optional[bool] = None


@dataclass
class EvalConfig:
    # Score generations on held-out prompts before and after training.
    before_after: bool = True
    num_samples: int = 40
    max_new_tokens: int = 32
    batch_size: int = 20
    max_input_tokens: int = 1024
    # exact_match is the demo's main metric.
    metric: str = "exact_match"
    # `tuneforge eval`: also score the base model (the same weights with the adapter off).
    compare_base: bool = False
    # During training: answer the first `sample_prompts` held-out prompts every N steps (0: off),
    # into RUN/samples.jsonl and the log.
    sample_every_steps: int = 0
    sample_prompts: int = 4


@dataclass
class PreviewConfig:
    """`tuneforge preview`: formatted samples with their loss masks, and data statistics."""

    # Samples printed (`n=5` on the command line is short for preview.n=5).
    n: int = 5
    # Where preview.html and the histogram go; None: outputs/preview/<date>/<time>.
    output_dir: Optional[str] = None
    # Which prepared split to show: train | eval.
    split: str = "train"


@dataclass
class DoctorConfig:
    # Run the checks at the start of `train` (errors stop it before any weights load).
    enabled: bool = True
    # Error when more than this fraction of rows has every label -100.
    max_fully_masked: float = 0.01
    # Also write the report as JSON here (`tuneforge doctor --json` writes doctor.json).
    json_path: Optional[str] = None


@dataclass
class LauncherConfig:
    """How `tuneforge train` starts its processes: keys of an Accelerate config file / `accelerate launch` flags."""

    # local (this process) | ddp | fsdp | deepspeed_zero2 | deepspeed_zero3 (others re-run through `accelerate launch`)
    name: str = "local"
    # Processes over all machines (one per GPU; on a CPU, gloo processes).
    num_processes: int = 1
    num_machines: int = 1
    # This machine's rank (0 = the main machine); on Slurm, default from SLURM_NODEID.
    machine_rank: int = 0
    # Address of the machine with machine_rank 0 (needed when num_machines > 1; on Slurm, the first node).
    main_process_ip: Optional[str] = None
    main_process_port: int = 29500
    # GPUs of this machine to use: all, or e.g. "0,1".
    gpu_ids: str = "all"
    # fsdp: FULL_SHARD | SHARD_GRAD_OP | HYBRID_SHARD | NO_SHARD
    fsdp_sharding_strategy: str = "FULL_SHARD"
    fsdp_offload_params: bool = False
    # Load weights on rank 0 only and broadcast (QLoRA + FSDP: keeps host RAM at one copy).
    fsdp_cpu_ram_efficient_loading: bool = True
    # Frozen (4-bit base) and trainable (LoRA) parameters share FSDP units: needs original parameters.
    fsdp_use_orig_params: bool = True
    fsdp_state_dict_type: str = "SHARDED_STATE_DICT"
    # deepspeed_*: where ZeRO offloads optimizer states / parameters: none | cpu | nvme
    offload_optimizer_device: str = "none"
    offload_param_device: str = "none"
    # deepspeed_zero3: build the model already partitioned (needed for QLoRA under ZeRO-3).
    zero3_init_flag: bool = True
    # A path to your own Accelerate config file: used instead of the generated one (the keys above still apply
    # as `accelerate launch` flags for num_processes / machines).
    accelerate_config: Optional[str] = None


@dataclass
class TuneforgeConfig:
    """The `train` command's whole config."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    format: FormatConfig = field(default_factory=FormatConfig)
    collator: CollatorConfig = field(default_factory=CollatorConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    doctor: DoctorConfig = field(default_factory=DoctorConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    # sft (causal LM) | classification
    task: str = "sft"
    # Print what would run, load nothing.
    dry_run: bool = False


@dataclass
class InferConfig:
    """The `infer` command's config."""

    run_dir: str = MISSING
    prompt: Optional[str] = None
    prompts_file: Optional[str] = None
    # JSONL of {prompt, completion} per answer (answers are printed too).
    output_file: Optional[str] = None
    chat: bool = False
    max_new_tokens: int = 128
    max_input_tokens: int = 1024
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class EvaluateConfig:
    """The `eval` command's config: a run directory and the `eval.*` settings."""

    run_dir: str = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class MergeConfig:
    # dequantized: merge into the de-quantized NF4 weights the adapter was trained on (faithful) |
    # original: merge into the original full-precision weights (common practice; drift is measured).
    base: str = "dequantized"
    check_prompts: int = 4
    check_max_new_tokens: int = 24


@dataclass
class MergeCommandConfig:
    """The `merge` command's config."""

    run_dir: str = MISSING
    out: Optional[str] = None
    merge: MergeConfig = field(default_factory=MergeConfig)


GROUPS = ("model", "tokenizer", "data", "format", "collator", "packing", "quant", "peft", "train", "eval")


def register_configs() -> None:
    """Register the schemas Hydra merges every YAML file into."""
    cs = ConfigStore.instance()
    cs.store(name="tuneforge_schema", node=TuneforgeConfig)
    cs.store(name="infer_schema", node=InferConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="merge_schema", node=MergeCommandConfig)


# Legal values for the enum-like string keys: checked here so a typo names the key and the closest value.
CHOICES: dict[str, tuple[str, ...]] = {
    "task": ("sft", "classification"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.attn_implementation": ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"),
    "data.on_bad_row": ("drop", "error"),
    "format.strategy": ("instruction", "conversational", "alpaca", "text", "template"),
    "format.alpaca_style": ("auto", "chat", "classic"),
    "preview.split": ("train", "eval"),
    "collator.name": ("completion_only", "assistant_only", "lm", "padding"),
    "packing.mode": ("auto", "none", "wrapped", "bfd", "padding_free"),
    "quant.bnb_4bit_quant_type": ("nf4", "fp4"),
    "quant.bnb_4bit_compute_dtype": ("auto", "float32", "bfloat16", "float16"),
    "peft.method": ("lora", "none"),
    "peft.bias": ("none", "all", "lora_only"),
    "train.truncation_mode": ("keep_start", "keep_end"),
    "train.eval_strategy": ("no", "steps", "epoch"),
    "train.save_strategy": ("no", "steps", "epoch", "best"),
    "tokenizer.padding_side": ("left", "right"),
    "launcher.name": ("local", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"),
    "launcher.fsdp_sharding_strategy": ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"),
    "launcher.fsdp_state_dict_type": ("SHARDED_STATE_DICT", "FULL_STATE_DICT"),
    "launcher.offload_optimizer_device": ("none", "cpu", "nvme"),
    "launcher.offload_param_device": ("none", "cpu", "nvme"),
}


# train.resume_from_checkpoint words: start fresh / resume from the latest complete checkpoint (else: a path).
RESUME_OFF = ("", "false", "none", "null", "no")
RESUME_LATEST = ("auto", "true", "yes")

# Attention implementations whose transformers mask builder isolates packed sequences by their restarting
# position ids (with no attention mask and no KV cache), measured: tests/test_packing.py.
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
# Format strategies that produce plain text (no chat-template assistant turns).
TEXT_STRATEGIES = ("text", "template")


def closest(word: str, candidates) -> str:
    """' Did you mean X?' for the nearest candidate, or ''."""
    match = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: TuneforgeConfig) -> TuneforgeConfig:
    """Check values and cross-field rules; raise ConfigError naming the key(s) and the fix."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(
                f"{key}={value!r} is not valid; choose one of {', '.join(allowed)}.{closest(value, allowed)}"
            )
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

    # Cross-field rules.
    if cfg.quant.load_in_4bit and cfg.peft.method == "none":
        raise ConfigError(
            "quant.load_in_4bit=true with peft=none would train 4-bit weights directly, which bitsandbytes cannot do. "
            "Use peft=lora for QLoRA, or quant=none for a full fine-tune."
        )
    if t.load_best_model_at_end and t.eval_strategy == "no":
        raise ConfigError(
            "train.load_best_model_at_end=true needs evaluation: set train.eval_strategy=steps (or epoch)."
        )
    if t.eval_strategy == "steps" and not t.eval_steps:
        raise ConfigError("train.eval_strategy=steps needs train.eval_steps (a positive step count).")
    # transformers checks these only once the weights are loaded; a config error costs nothing here.
    if t.load_best_model_at_end and t.save_strategy not in (t.eval_strategy, "best"):
        raise ConfigError(
            f"train.load_best_model_at_end=true keeps a saved checkpoint, so train.save_strategy "
            f"({t.save_strategy}) must match train.eval_strategy ({t.eval_strategy}) or be 'best'."
        )
    if (t.load_best_model_at_end and t.save_strategy == "steps" and t.eval_strategy == "steps"
            and t.save_steps % t.eval_steps):
        raise ConfigError(
            f"train.load_best_model_at_end=true: train.save_steps ({t.save_steps}) must be a multiple of "
            f"train.eval_steps ({t.eval_steps}), so that the best evaluation has a checkpoint."
        )
    if cfg.eval.sample_every_steps < 0 or cfg.eval.sample_prompts < 1:
        raise ConfigError("eval.sample_every_steps must be >= 0 (0: off) and eval.sample_prompts >= 1.")
    if t.save_strategy == "steps" and t.save_steps <= 0:
        raise ConfigError("train.save_strategy=steps needs train.save_steps > 0.")
    validate_run_keys(t)
    validate_collator_packing(cfg)
    if cfg.task == "sft" and cfg.collator.name == "padding":
        raise ConfigError(
            "collator=padding builds no language-model labels; with task=sft use collator=completion_only, "
            "assistant_only or lm."
        )
    if cfg.task == "classification" and cfg.collator.name != "padding":
        raise ConfigError(
            f"task=classification with collator={cfg.collator.name}: causal-LM collators build next-token labels; "
            "use collator=padding."
        )
    if cfg.packing.mode not in ("none", "auto") and cfg.task == "classification":
        raise ConfigError("packing.mode must be none for task=classification (one label per sequence).")
    validate_data(cfg.data, cfg.format)
    validate_launcher(cfg)
    return cfg


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
    sharded = la.name == "fsdp" or la.name == "deepspeed_zero3"
    if sharded and q.load_in_4bit:
        compute = "bfloat16" if q.bnb_4bit_compute_dtype == "auto" else q.bnb_4bit_compute_dtype
        if q.bnb_4bit_quant_storage != compute:
            raise ConfigError(
                f"launcher={la.name} shards a 4-bit base only when its storage dtype is the compute dtype: set "
                f"quant.bnb_4bit_quant_storage={compute} (is {q.bnb_4bit_quant_storage}), or use launcher=ddp.")
    if la.name == "deepspeed_zero3" and q.load_in_4bit and not la.zero3_init_flag:
        raise ConfigError("launcher=deepspeed_zero3 with a 4-bit base (QLoRA) needs launcher.zero3_init_flag=true "
                          "(the quantized model must be built already partitioned).")
    if la.name in ("fsdp", "deepspeed_zero2", "deepspeed_zero3") and not cfg.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"launcher={la.name} shards over CUDA GPUs and this machine has none; use launcher=ddp "
                              "(gloo processes on CPUs), or dry_run=true to print the launch command.")


# transformers' INTEGRATION_TO_CALLBACK keys (+ none/all), copied: importing transformers here would cost
# seconds on every config check.
REPORT_TO = ("azure_ml", "comet_ml", "mlflow", "neptune", "tensorboard", "trackio", "wandb", "codecarbon", "clearml",
             "dagshub", "flyte", "dvclive", "swanlab", "kubeflow", "none", "all")


def validate_run_keys(t: TrainConfig) -> None:
    """report_to (normalised to a list), nan_patience."""
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
    t.report_to = [] if names == ["none"] else names
    resume = t.resume_from_checkpoint
    if resume is not None and str(resume).strip().lower() not in RESUME_OFF + RESUME_LATEST:
        from pathlib import Path

        if not Path(str(resume)).is_dir():  # checked again, in full, when training starts
            raise ConfigError(f"train.resume_from_checkpoint={resume}: no such checkpoint directory; give a "
                              "RUN/checkpoint-N directory, or auto (the latest complete checkpoint of hydra.run.dir).")
    if t.nan_patience < 1:
        raise ConfigError(f"train.nan_patience={t.nan_patience} must be >= 1 (optimizer steps in a row).")


def validate_format(fmt: FormatConfig, key: str = "format") -> None:
    """Rules of one format section (the top-level one, or a mix source's)."""
    for name, allowed in (("strategy", CHOICES["format.strategy"]), ("alpaca_style", CHOICES["format.alpaca_style"])):
        value = getattr(fmt, name)
        if value not in allowed:
            raise ConfigError(f"{key}.{name}={value!r} is not valid; choose one of {', '.join(allowed)}.{closest(value, allowed)}")
    if fmt.strategy == "template" and not fmt.template:
        raise ConfigError(f"{key}.strategy=template needs {key}.template, e.g. '### Question: {{prompt}}\\n### Answer: {{completion}}'.")
    if fmt.strategy == "template" and not fmt.response_template:
        raise ConfigError(
            f"{key}.strategy=template needs {key}.response_template (the text that starts the answer) "
            "so that the prompt can be masked."
        )
    if fmt.strategy == "template" and fmt.response_template not in fmt.template:
        raise ConfigError(
            f"{key}.response_template={fmt.response_template!r} does not occur in {key}.template={fmt.template!r}; "
            "it must be the literal text just before the completion."
        )


def validate_data(data: DataConfig, fmt: FormatConfig) -> None:
    """Data-source rules: sizes, the mix shape (weights for all sources or none), every format."""
    for key, value in (("data.max_samples", data.max_samples), ("data.num_proc", data.num_proc),
                       ("data.map_batch_size", data.map_batch_size)):
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value} must be > 0 (or null).")
    validate_format(fmt)
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


def _is_template(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(t, int) for t in value)


def validate_collator_packing(cfg: TuneforgeConfig) -> None:
    """Collator/packing rules: each names both keys and what to use instead."""
    col, mode = cfg.collator, cfg.packing.mode
    if mode == "auto":  # decided on the device (device_defaults.packing_mode): packs only where allowed
        mode = "none"
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
    if col.name == "padding" and mode != "none":
        raise ConfigError(f"packing.mode={mode} with collator=padding: the padding collator takes one sequence per "
                          "row with one label; use packing=none.")
    if mode != "none" and cfg.model.attn_implementation not in PACKING_ATTENTION:
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


def to_object(cfg: DictConfig) -> Any:
    """DictConfig (already merged into a schema) -> dataclass instance."""
    return OmegaConf.to_object(cfg)


def schema_keys(schema: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass schema, for suggestions."""
    keys = []
    for f in fields(schema):
        name = f"{prefix}{f.name}"
        keys.append(name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if is_dataclass(default):
            keys.extend(schema_keys(default, name + "."))
    return keys
