"""Config schemas (one dataclass per Hydra group), ConfigStore registration, and the constants rules share.

Keys mirror the library each section feeds: `train.*` are SFTConfig/TrainingArguments fields,
`peft.*` LoraConfig fields, `quant.*` BitsAndBytesConfig fields, derived from the installed libraries
(config/library_keys.py). Hydra merges the YAML files of `conf/` into these typed schemas, so an unknown
key or a wrong type fails at composition; value and cross-field rules live in `tuneforge.config.validation`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from tuneforge.config import library_keys


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
    # task=dpo|kto|orpo|grpo|rloo: an SFT run directory (or its adapter/ directory) to start from: its adapter trains
    # on, with its tokenizer and chat template; the reference model is that SFT policy. None: a fresh adapter on the
    # base.
    adapter: Optional[str] = None


@dataclass
class TokenizerConfig:
    # None: the model's own tokenizer.
    name_or_path: Optional[str] = None
    # auto: PAD must differ from EOS (UNK when it exists and differs, else a new <|pad|>) | unk | new | none | a literal token.
    pad_token: str = "auto"
    # keep | a named template: chatml, llama3, qwen2.5, qwen3, mistral, gemma, phi3 (config/chat_templates.py) | a path
    # to a .jinja file | an inline Jinja template.
    chat_template: str = "keep"
    add_special_tokens: list[str] = field(default_factory=list)
    add_tokens: list[str] = field(default_factory=list)
    # Side used for training batches; generation always pads on the left.
    padding_side: str = "right"


@dataclass
class FormatConfig:
    # instruction | conversational | alpaca | text | template
    # | preference (task=dpo|orpo|reward: prompt/chosen/rejected)
    # | unpaired (task=kto: prompt/completion/label) | prompt (task=grpo|rloo: a prompt column, or messages without a
    # final assistant turn; every other column reaches the reward functions)
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
    # task=kto (format.strategy=unpaired): true for a desirable completion, false for an undesirable one.
    label_column: str = "label"
    # format.strategy=preference: the preferred and the dispreferred answer (text, or conversations that start
    # with the prompt's turns when the row has no prompt column).
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    # format.strategy=prompt: the column holding a reference answer, when rows have one: the held-out table scores
    # exact match / ROUGE-L against it (the reward functions read it, like every other column, by its name).
    reference_column: str = "answer"


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
    # drop | error: what to do with malformed rows and malformed JSON lines of local files (always counted and
    # reported; error refuses with the row, or FILE:LINE).
    on_bad_row: str = "drop"
    # truncate | drop: a row longer than train.max_length is cut to it (keep_start/keep_end) or left out (Axolotl's
    # default). Both are counted and reported (DataStats.truncated / dropped_long).
    on_long_row: str = "truncate"
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
    # auto (the shipped default): bfd on CUDA, none on CPU (config/device.py).
    mode: str = "none"


# `quant.*`, `peft.*` and `train.*` are the fields of BitsAndBytesConfig, LoraConfig and the task's trainer config
# (SFTConfig, TrainingArguments), read from the installed libraries, plus tuneforge's own keys and defaults:
# config/library_keys.py says which, and why each default differs from the library's. They are derived on first use
# (module __getattr__ below), from the schema cache when it holds them: importing this module loads no library.
_DERIVED = {"QuantConfig": library_keys.QUANT, "PeftConfig": library_keys.PEFT, "TrainConfig": library_keys.TRAIN}


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
class RewardConfig:
    """One reward function of an online-RL run (task=grpo|rloo): `rewards=[{name: iso_date, weight: 1.0}]`."""

    # A built-in reward (eval/rewards.py: exact_match, regex, overlong, iso_date, number) or your own function as
    # module:function, called as f(prompts, completions, **columns, **kwargs) and returning one float per completion
    # (None: no opinion on that one). Files next to your recipe import from the working directory. With `model`: the
    # name its values are logged under (default reward_model).
    name: Optional[str] = None
    # A reward model instead of a function: a task=reward run directory, or a sequence-classification model with one
    # output (a local directory or a hub id); it scores each prompt + completion with its own tokenizer and chat
    # template (kwargs: batch_size, max_length).
    model: Optional[str] = None
    # Its weight in the sum of rewards (GRPOConfig/RLOOConfig reward_weights).
    weight: float = 1.0
    # Keyword arguments of the function, e.g. {column: answer} or {pattern: '^\\d{4}-\\d{2}-\\d{2}$'}.
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DoctorConfig:
    # Run the checks at the start of `train` (errors stop it before any weights load).
    enabled: bool = True
    # Error when more than this fraction of rows has every label -100.
    max_fully_masked: float = 0.01
    # task=grpo|rloo, the reward doctor: completions sampled for this many training prompts (train.num_generations
    # each) from the starting policy and scored before training; 0 skips it.
    reward_prompts: int = 8
    # Warn when more than this fraction of those prompts' groups score all alike (no learning signal); every group
    # alike refuses the run.
    max_no_signal: float = 0.5
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
    # Write RUN/ranks.json: each rank's data-shard digests, own losses and final weight digest (it hashes every
    # batch and syncs every micro-batch's loss, so it is off unless asked for).
    record_ranks: bool = False
    # launcher=deepspeed_zero2|deepspeed_zero3: your own DeepSpeed JSON (Accelerate's deepspeed_config_file), used
    # instead of the ZeRO settings above; its zero_optimization.stage must match the launcher's.
    deepspeed_config: Optional[str] = None
    # launcher=fsdp: your own FSDP settings, a YAML/JSON mapping of Accelerate fsdp_config keys (fsdp_*), merged over
    # the ones above.
    fsdp_config: Optional[str] = None
    # A path to your own Accelerate config file: used instead of the generated one (the keys above still apply
    # as `accelerate launch` flags for num_processes / machines).
    accelerate_config: Optional[str] = None


def _tuneforge_config() -> type:
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
        # A name in the task table (config/tasks.py): sft | classification | dpo | kto | orpo | reward | grpo | rloo.
        task: str = "sft"
        # Your own transformers TrainerCallback classes, as module:Class (config/user_code.py).
        callbacks: list[str] = field(default_factory=list)
        # task=grpo|rloo: the reward functions that score sampled completions (RewardConfig).
        rewards: list[RewardConfig] = field(default_factory=list)
        # Print what would run, load nothing.
        dry_run: bool = False

    TuneforgeConfig.__module__, TuneforgeConfig.__qualname__ = __name__, "TuneforgeConfig"
    return TuneforgeConfig


def __getattr__(name: str) -> type:
    """The library-derived sections and the whole config, built once on first use (and then module globals, so
    that pickling and type hints find them)."""
    if name in globals():
        return globals()[name]
    if name in _DERIVED:
        cls = _DERIVED[name].dataclass(name, __name__)
    elif name == "TuneforgeConfig":
        for derived in _DERIVED:
            __getattr__(derived)
        cls = _tuneforge_config()
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = cls
    return cls


GROUPS = ("model", "tokenizer", "data", "format", "collator", "packing", "quant", "peft", "train", "eval")


def register_configs() -> None:
    """Register the schema Hydra merges the train config's YAML files into (a command's own schema: compose.register_schema)."""
    cs = ConfigStore.instance()
    cs.store(name="tuneforge_schema", node=__getattr__("TuneforgeConfig"))


# train.resume_from_checkpoint words: start fresh / resume from the latest complete checkpoint (else: a path).
RESUME_OFF = ("", "false", "none", "null", "no")
RESUME_LATEST = ("auto", "true", "yes")

# Attention implementations whose transformers mask builder isolates packed sequences by their restarting
# position ids (with no attention mask and no KV cache), measured: tests/test_packing.py.
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
# Launchers that shard the weights over processes (a 4-bit base keeps its bf16 storage there, no fp32 copies).
SHARDED_LAUNCHERS = ("fsdp", "deepspeed_zero3")


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
