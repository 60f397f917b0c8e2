"""Training speed: plain TRL vs tuneforge's defaults, on random-initialised Llama-shaped models.

    python benchmarks/gpu_train.py --shapes 1b --profiles chat --arms a,b,d
    python benchmarks/gpu_train.py --table            # markdown table of every results/gpu_train-*.json

Every arm runs in a fresh process on the same random weights (saved once per shape under --model-dir)
and the same seeded synthetic token data, and trains with TRL's `SFTTrainer`:

  a       plain TRL: SFTConfig defaults (batch 8, gradient checkpointing, padding), QLoRA NF4, sdpa.
  b       tuneforge's defaults: bfd packing into rows of max_length (position ids restart per sequence,
          no attention mask), the run's SFTConfig from `tuneforge.config.library_args.trainer_arguments`, QLoRA NF4, sdpa.
  b_flex  b with flex_attention (block-sparse document masking instead of sdpa's dense masked square).
  c       b + Liger layer kernels (RMSNorm, RoPE, SwiGLU) + no activation checkpointing.
  c_gc    b + Liger, activation checkpointing kept (the memory-lean variant); c_gc4 with 4 rows per batch.
  b_compile, c_compile  b / c with torch.compile (train.torch_compile).
  c1      c with one packed row per batch (what fits an 8B bf16 base without activation checkpointing);
          c1_nd: with lora_dropout 0 (no dropout copies of the adapted inputs); c1_flex: with flex_attention.
  *_lean  QLoRA with quant.upcast_non_quantized=false: embeddings, norms and LM head stay bf16 (as in arm a)
          instead of prepare_model_for_kbit_training's fp32 copies; c_gc3_lean / c_gc4_lean: 3 / 4 rows;
          c1_lean: c1 on such a base (its bf16 twin is c1_bf16: the switch means nothing on a bf16 base);
          c_gc3_lean_flex: c_gc3_lean with flex_attention (b_flex was 1.07x b on the H100 at 1B).
  c1_cast c1 through PEFT's own get_peft_model, which casts every adapted input to the fp32 adapters' dtype and
          autocast back to bf16 (tuneforge's add_lora skips that round trip; benchmarks/lora_casts.py counts it).
  c_gc2   c_gc checkpointing one decoder layer in 2 (the others keep their activations: memory for speed).
  *_off_* checkpointed layer inputs offloaded to pinned host memory (train.gradient_checkpointing_offload).
  *_bf16  the same arm with a bf16 base (LoRA) instead of NF4 (QLoRA): arm (d) is b/c vs b_bf16/c_bf16.

Measured per arm: non-pad tokens/s over the timed steps, median step time (step end to step end,
CUDA-synchronised, after --warmup steps), peak allocated/reserved CUDA memory (peak RSS on CPU), and MFU:

  FLOPs per real token = 4 * N_linear + 6 * N_lora + attention
    N_linear: frozen linear weights incl. the LM head (forward 2N, input gradient 2N; no weight gradient);
    N_lora:   LoRA weights (forward 2N, input and weight gradients 4N);
    attention per sequence of s tokens and layer: 6 * s^2 * d_model (QK^T and AV, 4 s^2 d forward,
              halved by the causal mask, x3 with the backward) -- only within each real sequence.
  Recomputation by activation checkpointing is not counted (model FLOPs, not hardware FLOPs).
  MFU = FLOPs per step / step time / peak dense bf16 FLOP/s of the device.

Correctness gate: before training, every arm computes the loss of the same fixed sequences in its own
layout, through the trainer's own loss (kernels applied): packed arms must equal arm (a) of the same
quantization within bf16 tolerance, and every arm equals its own plain padded forward in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE.parent / "src"))

# Llama-architecture shapes (SmolLM2-135M, Llama-3.2-1B/3B, Llama-3.1-8B), weights random.
SHAPES = {
    # A few-layer model for the harness's own test (tests/test_gpu_train_harness.py), not for figures.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}

# Sequence-length profiles: (kind, median or low fraction, sigma or high fraction), clipped to max_length.
PROFILES = {
    "short": ("lognormal", 200, 0.6),   # short/skewed instruction data
    "chat": ("lognormal", 800, 0.8),    # chat-like: median ~800, ~2% beyond 4k (clipped: the 4k tail)
    "max": ("uniform", 0.9, 1.0),       # near max_length
}


@dataclass
class Arm:
    layout: str = "bfd"            # padded | bfd | padding_free
    quant: str = "nf4"             # nf4 | bf16
    attn: str = "sdpa"
    trl_defaults: bool = False     # arm (a): TRL's own SFTConfig defaults, peft_config handed to TRL
    micro_batch: int | None = None  # None: the layout's default (8 sequences padded, 2 packed rows)
    grad_ckpt: bool = True
    liger: bool = False
    compile: bool = False
    upcast: bool = True            # QLoRA: fp32 copy of the unquantized weights (quant.upcast_non_quantized)
    ckpt_every: int = 1            # train.gradient_checkpointing_every_n_layers
    offload: bool = False          # train.gradient_checkpointing_offload
    lora_dropout: float = 0.05     # 0: PEFT skips the dropout copy of every adapted layer's input
    peft_input_cast: bool = False  # PEFT's own wrapping: every adapted input to fp32 and back (tuneforge skips it)


ARMS = {
    "a": Arm(layout="padded", trl_defaults=True),
    "b": Arm(),
    "b_flex": Arm(attn="flex_attention"),
    "b_pf": Arm(layout="padding_free"),
    "c": Arm(liger=True, grad_ckpt=False),
    "c_gc": Arm(liger=True),
    "c_gc4": Arm(liger=True, micro_batch=4),
    "c1": Arm(liger=True, grad_ckpt=False, micro_batch=1),  # one 4k row: what fits an 8B bf16 base unchecked
    "c1_lean": Arm(liger=True, grad_ckpt=False, micro_batch=1, upcast=False),
    "c1_cast": Arm(liger=True, grad_ckpt=False, micro_batch=1, peft_input_cast=True),
    "c_compile": Arm(liger=True, grad_ckpt=False, compile=True),
    "b_compile": Arm(compile=True),
    "c1_nd": Arm(liger=True, grad_ckpt=False, micro_batch=1, lora_dropout=0.0),
    "c1_flex": Arm(liger=True, grad_ckpt=False, micro_batch=1, attn="flex_attention"),
    "b_lean": Arm(upcast=False),
    "c_gc_lean": Arm(liger=True, upcast=False),
    "c_gc3_lean": Arm(liger=True, upcast=False, micro_batch=3),
    "c_gc4_lean": Arm(liger=True, upcast=False, micro_batch=4),
    "c_gc3_lean_flex": Arm(liger=True, upcast=False, micro_batch=3, attn="flex_attention"),
    "c_gc2": Arm(liger=True, ckpt_every=2),
    "c_gc4_off_lean": Arm(liger=True, upcast=False, micro_batch=4, offload=True),
}
for _name in list(ARMS):
    ARMS[f"{_name}_bf16"] = Arm(**{**asdict(ARMS[_name]), "quant": "bf16"})

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


# ---------------------------------------------------------------------------------------------- setup

def model_dir(root: Path, shape: str) -> Path:
    return root / f"llama-{shape}-random"


def make_model(root: Path, shape: str) -> Path:
    """Random weights for `shape`, saved once as safetensors with a minimal tokenizer (PAD != EOS)."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = model_dir(root, shape)
    if (out / "done").exists():
        return out
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.save_pretrained(out, max_shard_size="5GB")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(out)
    (out / "done").write_text("ok\n")
    return out


def lengths_for(profile: str, n: int, max_length: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    kind, a, b = PROFILES[profile]
    if kind == "lognormal":
        lengths = np.exp(rng.normal(np.log(a), b, n))
    else:
        lengths = rng.uniform(a * max_length, b * max_length, n)
    return np.clip(lengths.astype(int), 16, max_length)


def synthetic_rows(profile: str, n: int, max_length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token sequences (ids >= 4: no special token appears inside a sequence)."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    return [rng.integers(4, vocab, int(n_tok)).tolist() for n_tok in lengths_for(profile, n, max_length, seed)]


# ---------------------------------------------------------------------------------------------- worker

def flops_per_step(model, seq_lengths: list[int], d_model: int, layers: int) -> float:
    """Model FLOPs of one training step over these real sequences (see the module docstring)."""
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    n_linear = 0
    for name, module in model.named_modules():
        if "lora_" in name:
            continue
        # A PEFT wrapper and its base_layer both look like Linear: count the base layer only.
        if module.__class__.__name__ not in ("Linear", "Linear4bit") or hasattr(module, "base_layer"):
            continue
        n_linear += module.in_features * module.out_features
    tokens = sum(seq_lengths)
    attention = sum(6 * s * s * d_model * layers for s in seq_lengths)
    return tokens * (4 * n_linear + 6 * n_lora) + attention


class StepClock:
    """Trainer callback: wall time between consecutive step ends (CUDA-synchronised)."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                clock.mark()

            def on_step_end(self, args, state, control, **kw):
                clock.times.append(clock.mark())

        self.callback = _CB()
        self.times: list[float] = []
        self._last = None

    def mark(self) -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed = 0.0 if self._last is None else now - self._last
        self._last = now
        return elapsed


class BatchLog:
    """Collator wrapper: the real (non-pad) sequence lengths of every micro-batch, in order."""

    def __init__(self, collate, pad_id: int):
        self.collate, self.pad_id, self.batches = collate, pad_id, []

    def __call__(self, examples):
        lengths = []
        for e in examples:
            lengths += list(e["seq_lengths"]) if "seq_lengths" in e else [len(e["input_ids"])]
        self.batches.append(lengths)
        return self.collate(examples)


def gate_rows(rows: list[list[int]], budget: int) -> list[list[int]]:
    """The first sequences of the data set that fit together in one packed row."""
    out, total = [], 0
    for r in rows:
        if total + len(r) > budget:
            break
        out.append(r)
        total += len(r)
    return out


def run_worker(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from tuneforge.config.library_args import lora_config, trainer_arguments
    from tuneforge.config.schemas import (
        CollatorConfig,
        ModelConfig,
        PackingConfig,
        PeftConfig,
        QuantConfig,
        TrainConfig,
        TuneforgeConfig,
    )
    from tuneforge.data.collators import build_collator
    from tuneforge.data.packing import pack
    from tuneforge.models.adapters import adapter_dtypes_kept, add_lora, enable_checkpointing, prepare_base
    from tuneforge.models.loading import load_model

    arm = Arm(**spec["arm"])
    path, max_length, steps = spec["model_path"], spec["max_length"], spec["warmup"] + spec["steps"]
    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(path)
    config_shape = SHAPES[spec["shape"]]
    rows = synthetic_rows(spec["profile"], spec["num_sequences"], max_length, config_shape["vocab_size"])
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    torch.manual_seed(0)

    quant = QuantConfig(load_in_4bit=arm.quant == "nf4", bnb_4bit_compute_dtype="auto",
                        upcast_non_quantized=arm.upcast)
    packing = PackingConfig(mode={"padded": "none"}.get(arm.layout, arm.layout))
    micro = arm.micro_batch or (8 if arm.layout in ("padded", "padding_free") else 2)
    run_dir = Path(spec["scratch"]) / f"run-{os.getpid()}"
    start = time.perf_counter()
    if arm.trl_defaults:
        # What a user writes from the TRL/PEFT docs: the model, a LoraConfig, SFTConfig defaults.
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation=arm.attn,
            quantization_config=bnb if arm.quant == "nf4" else None,
            device_map={"": torch.cuda.current_device()} if cuda else None)
        args = SFTConfig(output_dir=str(run_dir), max_length=max_length, per_device_train_batch_size=micro,
                         bf16=cuda, gradient_checkpointing=arm.grad_ckpt)
        peft_config, train_rows, collate = LoraConfig(task_type="CAUSAL_LM", **LORA), data, None
        collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    else:
        model = load_model(path, ModelConfig(name_or_path=path, dtype="auto", attn_implementation=arm.attn), quant)
        # Through TrainConfig: SFTConfig's __post_init__ turns torch_compile into the compile backend (setting
        # args.torch_compile afterwards compiles nothing).
        train = TrainConfig(max_length=max_length, per_device_train_batch_size=micro, report_to=["none"],
                            gradient_checkpointing=arm.grad_ckpt, gradient_checkpointing_every_n_layers=arm.ckpt_every,
                            gradient_checkpointing_offload=arm.offload, use_liger_kernel=arm.liger,
                            torch_compile=arm.compile)
        lora = PeftConfig(**{**LORA, "lora_dropout": arm.lora_dropout})
        base = enable_checkpointing(prepare_base(model, quant), train)
        model = get_peft_model(base, lora_config(lora)) if arm.peft_input_cast else add_lora(base, lora)
        args = trainer_arguments(TuneforgeConfig(train=train), run_dir)
        peft_config = None
        train_rows, _ = pack(data, packing, max_length)
        collate = build_collator(CollatorConfig(name="lm"), packing, tokenizer)
    load_s = time.perf_counter() - start
    args.max_steps, args.logging_steps, args.report_to = steps, 1, []
    args.save_strategy, args.learning_rate, args.warmup_steps = "no", 1e-4, 0
    args.dataloader_drop_last = True

    batches = BatchLog(collate, tokenizer.pad_token_id)
    clock = StepClock()
    # tuneforge's arms keep PEFT's fp32 adapters as a run does (models/adapters.adapter_dtypes_kept); arm (a) gets
    # TRL's bf16 cast, as a plain TRL script would.
    with (nullcontext() if arm.trl_defaults else adapter_dtypes_kept(model)):
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_rows, processing_class=tokenizer,
                             data_collator=batches, peft_config=peft_config, callbacks=[clock.callback])
    gate = gate_loss(trainer, rows, collate, packing.mode, max_length)
    batches.batches.clear()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()

    # One micro-batch per optimizer step (no accumulation); the dataloader may have fetched one more.
    per_step = [sum(batches.batches[i]) for i in range(len(clock.times))]
    timed = slice(spec["warmup"], len(clock.times))
    step_times, step_tokens = clock.times[timed], per_step[timed]
    core = trainer.model
    flops = [flops_per_step(core, batches.batches[i], config_shape["hidden_size"], config_shape["num_hidden_layers"])
             for i in range(timed.start, len(clock.times))]
    peak = PEAK_BF16.get(next((k for k in PEAK_BF16 if cuda and k in torch.cuda.get_device_name()), ""), None)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "load_s": load_s,
        "micro_batch": micro,
        "timed_steps": len(step_times),
        "median_step_s": statistics.median(step_times),
        "tokens_per_s": sum(step_tokens) / sum(step_times),
        "tokens_per_step": statistics.mean(step_tokens),
        "mfu": (sum(flops) / sum(step_times) / peak) if peak else None,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "gate": gate,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


def gate_loss(trainer, rows, collate, mode: str, max_length: int) -> dict:
    """Loss of the same fixed sequences through this arm's layout and the trainer's own loss, and the
    plain padded forward of the same model as an in-process reference."""
    import torch

    seqs = gate_rows(rows, max_length)
    model = trainer.model
    device = next(model.parameters()).device
    to = lambda b: {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}  # noqa: E731
    if mode in ("bfd", "wrapped"):
        batch = collate([{"input_ids": [t for s in seqs for t in s], "labels": [t for s in seqs for t in s],
                          "seq_lengths": [len(s) for s in seqs]}])
    else:
        batch = collate([{"input_ids": s, "labels": s} for s in seqs])
    padded = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in seqs], batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.long) for s in seqs], batch_first=True)
    labels = padded.masked_fill(mask == 0, -100)
    model.train()  # LoRA B starts at zero, so dropout cannot change these losses
    with torch.no_grad():
        arm = float(trainer.compute_loss(model, to(batch)))
        ref = float(model(**to({"input_ids": padded, "attention_mask": mask, "labels": labels}), use_cache=False).loss)
    return {"sequences": len(seqs), "tokens": sum(map(len, seqs)), "loss": arm, "plain_padded_loss": ref,
            "rel_diff_vs_plain": abs(arm - ref) / abs(ref)}


# ---------------------------------------------------------------------------------------------- driver

def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "liger-kernel"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# What a worker imports. The driver imports them first: on a bare GPU image a missing package then fails in
# seconds, not once per arm after the random weights were written and loaded.
WORKER_MODULES = ("bitsandbytes", "datasets", "peft", "transformers", "trl", "tuneforge.config.schemas",
                  "tuneforge.data.collators", "tuneforge.data.packing", "tuneforge.models.adapters",
                  "tuneforge.models.loading", "tuneforge.tasks.sft")


def missing_modules(arm_names: list[str], modules: tuple[str, ...] = WORKER_MODULES) -> list[str]:
    """`module: reason` for every module the workers of these arms need and cannot import."""
    import importlib

    needed = list(modules) + (["liger_kernel"] if any(ARMS[n].liger for n in arm_names) else [])
    missing = []
    for name in needed:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - an extension can fail with any error at import
            missing.append(f"{name}: {type(exc).__name__}: {exc}")
    return missing


def predicted_wall_s(finished: list[dict], shape: str, quant: str) -> float | None:
    """The least time the next arm of `shape` can take, judged from the arms already finished: the quickest
    finished arm of the same quantization, else of the shape, else None (unknown: start it).

    Optimistic on purpose: an arm that runs past the deadline is stopped there, so a wrong start costs only
    time no later arm could have used, while a pessimistic guess (the padded baseline is the slowest arm)
    would skip arms that fit."""
    for same in (lambda r: r["arm"]["quant"] == quant, lambda r: True):
        walls = [r["wall_s"] for r in finished if "wall_s" in r and r["shape"] == shape and same(r)]
        if walls:
            return min(walls)
    return None


def run_arm(spec: dict, timeout: float) -> dict:
    """One arm in a fresh process (clean CUDA memory, no kernel patches left over from another arm)."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s"}
    marker = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not marker:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"error": f"exit {proc.returncode}", "log_tail": tail}
    return json.loads(marker[-1][len("RESULT "):]) | {"wall_s": time.perf_counter() - start}


def same_settings(x: dict, y: dict) -> bool:
    """Two arms (as recorded) that differ at most in the base's precision."""
    drop = ("quant", "upcast")
    return {k: v for k, v in x.items() if k not in drop} == {k: v for k, v in y.items() if k not in drop}


def judge(results: list[dict]) -> None:
    """Ratios against arm (a) of the same shape/profile/quantization, and the correctness gate."""
    for r in results:
        if "error" in r:
            continue
        base_name = "a" if r["arm"]["quant"] == "nf4" else "a_bf16"
        # Ratios only within one device, shape and profile (--table reads the records of several machines).
        same = lambda x: (x["device"] == r["device"] and x["shape"] == r["shape"]  # noqa: E731
                          and x["profile"] == r["profile"] and "error" not in x)
        base = next((x for x in results if x["arm_name"] == base_name and same(x)), None)
        # (d)'s twin: the QLoRA arm of the same settings; the fp32-upcast switch means nothing on a bf16 base,
        # so c1_bf16 is the twin of both c1 and c1_lean.
        twin = next((x for x in results if r["arm"]["quant"] == "bf16" and x["arm"]["quant"] == "nf4"
                     and same_settings(x["arm"], r["arm"]) and same(x)), None)
        gate = r["gate"]
        # bf16 compute on GPUs; fp32 on CPUs, where any real difference is a layout bug.
        tol = 1e-3 if r["device"].startswith("CPU") else 1e-2
        gate["pass_vs_plain"] = gate["rel_diff_vs_plain"] <= tol
        if base:
            r["speedup_vs_a"] = r["tokens_per_s"] / base["tokens_per_s"]
            if r.get("peak_allocated_gib") and base.get("peak_allocated_gib"):
                r["memory_vs_a"] = r["peak_allocated_gib"] / base["peak_allocated_gib"]
            gate["rel_diff_vs_a"] = abs(gate["loss"] - base["gate"]["loss"]) / abs(base["gate"]["loss"])
            gate["pass_vs_a"] = gate["rel_diff_vs_a"] <= tol
        if twin:
            # (d): how much slower QLoRA is than bf16 LoRA at the same settings.
            twin["qlora_slowdown_vs_bf16"] = r["tokens_per_s"] / twin["tokens_per_s"]


def table(results: list[dict]) -> str:
    head = ("| device | shape | profile | arm | micro-batch | tokens/s | vs (a) | median step s | MFU | "
            "peak alloc GiB | vs (a) | gate Δ vs (a) | gate Δ vs plain | QLoRA slowdown |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for r in results:
        if "error" in r:
            lines.append(f"| {r.get('device', '')} | {r['shape']} | {r['profile']} | {r['arm_name']} | "
                         f"error: {r['error']} |" + " |" * 10)
            continue
        g = r["gate"]
        lines.append(
            f"| {r['device']} | {r['shape']} | {r['profile']} | {r['arm_name']} | {r['micro_batch']} | "
            f"{r['tokens_per_s']:,.0f} | {fmt(r.get('speedup_vs_a'), '.2f')} | {r['median_step_s']:.3f} | "
            f"{fmt(r['mfu'] and 100 * r['mfu'], '.1f')} | {fmt(r['peak_allocated_gib'], '.1f')} | "
            f"{fmt(r.get('memory_vs_a'), '.2f')} | {fmt(g.get('rel_diff_vs_a'), '.1e')} | "
            f"{g['rel_diff_vs_plain']:.1e} | {fmt(r.get('qlora_slowdown_vs_bf16'), '.2f')} |")
    return "\n".join(lines)


def save(record: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="135m")
    p.add_argument("--profiles", default="chat")
    p.add_argument("--arms", default="a,b,b_bf16")
    p.add_argument("--steps", type=int, default=30, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--num-sequences", type=int, default=1500)
    p.add_argument("--model-dir", default="/tmp/tuneforge-bench-models")
    p.add_argument("--timeout", type=int, default=900, help="seconds per arm")
    p.add_argument("--out", default=None, help="JSON path (default results/gpu_train-<device>-<time>.json)")
    p.add_argument("--stop-on-error", action="store_true", help="stop at the first arm that fails")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="end by this many seconds (a rented GPU's time limit): start no arm that the finished arms "
                        "predict would end later, stop one still running then; finished arms are kept")
    p.add_argument("--table", action="store_true", help="print the table of every results/gpu_train-*.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--make-model", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(a.worker))), flush=True)
        return 0
    if a.make_model:
        make_model(Path(a.model_dir), a.make_model)
        return 0
    if a.table:
        rows = [r for f in sorted(RESULTS.glob("gpu_train-*.json")) for r in json.loads(f.read_text())["results"]]
        judge(rows)  # ratios across files too (e.g. a bf16 arm recorded in another run than its QLoRA twin)
        print(table(rows))
        return 0

    began = time.perf_counter()
    arm_names = a.arms.split(",")
    unknown = [n for n in arm_names if n not in ARMS]
    missing = missing_modules([n for n in arm_names if n in ARMS])
    if unknown or missing:
        print("cannot run:" + "".join(f"\n  unknown arm {n!r}" for n in unknown)
              + "".join(f"\n  {m}" for m in missing), file=sys.stderr)
        return 2
    device, results, not_started = device_name(), [], []
    out = Path(a.out) if a.out else RESULTS / f"gpu_train-{device.split()[-1].lower()}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {"device": device, "versions": versions(), "git_commit": git_commit(),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "deadline_s": a.deadline_s,
              "not_started": not_started, "results": results}
    for shape in a.shapes.split(","):
        if a.deadline_s and time.perf_counter() - began > a.deadline_s:
            not_started += [f"{shape}/{profile}/{name}" for profile in a.profiles.split(",") for name in arm_names]
            print(f"[{shape}] not started: past --deadline-s {a.deadline_s:g}", flush=True)
            continue
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--make-model", shape, "--model-dir", a.model_dir], check=True)
        print(f"[{shape}] random weights ready in {time.perf_counter() - start:.0f} s", flush=True)
        for profile in a.profiles.split(","):
            for name in arm_names:
                timeout = a.timeout
                if a.deadline_s:
                    left = a.deadline_s - (time.perf_counter() - began)
                    guess = predicted_wall_s(results, shape, ARMS[name].quant)
                    if left <= 0 or (guess is not None and guess > left):
                        why = "past" if left <= 0 else f"predicted {guess:.0f} s, {left:.0f} s left before"
                        print(f"[{shape}/{profile}/{name}] not started: {why} --deadline-s {a.deadline_s:g}",
                              flush=True)
                        not_started.append(f"{shape}/{profile}/{name}")
                        continue
                    timeout = min(timeout, left)
                spec = {"arm": asdict(ARMS[name]), "shape": shape, "profile": profile, "max_length": a.max_length,
                        "steps": a.steps, "warmup": a.warmup, "num_sequences": a.num_sequences,
                        "model_path": str(model_dir(Path(a.model_dir), shape)), "scratch": a.model_dir}
                result = {"arm_name": name, "shape": shape, "profile": profile, "device": device, **spec,
                          **run_arm(spec, timeout)}
                results.append(result)
                summary = result.get("error") or (f"{result['tokens_per_s']:,.0f} tok/s, "
                                                  f"step {result['median_step_s']:.3f} s")
                print(f"[{shape}/{profile}/{name}] {summary}", flush=True)
                # After every arm: a run cut short by a time limit keeps the arms it finished.
                judge(results)
                save(record, out)
                if "error" in result:
                    print("\n".join(result.get("log_tail", [])), flush=True)
                    if a.stop_on_error:
                        break
    save(record, out)  # also when no arm started: the record says why
    print(table(results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
