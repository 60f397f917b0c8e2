"""GPU memory estimate for a training config (`tuneforge train dry_run=true`), without loading weights.

The parameter counts are exact: the model is built on PyTorch's `meta` device from its config (no memory,
no download beyond config.json). The activation term is a per-token count of what one decoder layer keeps
for its backward pass, in bytes, for a Llama-like layer with LoRA on every linear layer:

    weights      = 4-bit:  N_linear * 0.5159 B (NF4 + double-quant constants: 0.5 + 1/64 + 4/(64*256))
                           + N_other * 4 B (prepare_model_for_kbit_training casts embeddings, norms and the
                             LM head to fp32; N_other * c with quant.upcast_non_quantized=false)
                   else    N_total * bytes(model dtype)
    trainable    = LoRA:   N_lora * 4 B (PEFT keeps adapters in fp32)  |  full: N_total * bytes(dtype)
    gradients    = trainable
    optimizer    = 2 states per trainable parameter (AdamW: 2 * trainable; 8-bit optimizers: N * 2 B)
    activations  = T * (L_ckpt * s * h                             # checkpointed layer inputs (if GC)
                        + layers_kept * A_layer                    # one layer recomputed (GC) or all L
                        + 2 * s * h)                               # gradient of the residual stream
        L_ckpt   = ceil(L / train.gradient_checkpointing_every_n_layers), 0 with ..._offload (host memory);
                   layers_kept = L - L_ckpt + 1 with checkpointing
        T        = per_device_train_batch_size * max_length (tokens per micro-batch: packed rows are full;
                   a padded batch is at most this long)
        s        = bytes of the residual stream: 4 under QLoRA with the fp32 upcast (fp32 embeddings), else
                   bytes(compute dtype) under 4-bit, bytes(model dtype) otherwise
        A_layer  = c * (8 h + 3 kv + m * i)                        # bytes per token per layer
                   + c * 3 h                                       # LoRA dropout > 0 or s != c: own copies
                   + (6 h + i)                                     # LoRA dropout > 0: its masks (1 B each)
                   + (s - c) * f * i                               # 4-bit gated MLP, fp32 stream
                   c = bytes(compute dtype); m = 5 for a gated MLP (4 with Liger's SwiGLU), 2 otherwise;
                   the 8 h covers the norms, q/k/v/o inputs and outputs, rotary outputs and attention
                   output, lora_A sharing the input of q/k/v and of gate/up; with dropout (one output per
                   adapted layer) or an fp32 stream (autocast casts it for each lora_A) three more copies
                   (models/adapters.py keeps PEFT from casting a bf16 input to fp32 and back under autocast);
                   f = 3 fp32 intermediate-sized tensors (gate, up, SiLU outputs), 2 with Liger's SwiGLU.
                   Without LoRA: c * (8 h + 3 kv + (m - 1) * i).
                   Each term was counted from what autograd saves on the CPU (bf16 autocast, CUDA's 1-byte
                   dropout masks) for the four combinations of fp32 upcast and dropout: -4.5% to -3.0%
                   (tests/test_estimate.py).
    loss         = 2 * c * (min(T, 4096) * min(V, 32768) + min(V, 32768) * h)
                   TRL computes the loss with a fused, chunked LM head (no full logits tensor): a tile of
                   4096 tokens x 32768 vocabulary entries and the cast LM-head chunk, forward and backward.
                   It is added to the layer term (a slight over-count of what is alive at once: estimates
                   should err on the safe side). Classification heads have no such term.
    sharding     = fsdp / deepspeed_zero3 divide weights and optimizer states by the number of processes,
                   deepspeed_zero2 divides gradients and optimizer states.

Measured against the H100 peaks of benchmarks/gpu_train.py (benchmarks/estimate_memory.py): -1.5% to +4.7% on
1B and 8B Llama shapes at 2 x 4096 and 8 x 4096 tokens, with and without checkpointing and Liger. The estimate is of allocated memory: add ~1 GiB for the CUDA
context and allocator slack.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from tuneforge.config.device import cuda_available
from tuneforge.config.schemas import SHARDED_LAUNCHERS
from tuneforge.config.tasks import SEQUENCE_CLASSIFICATION, task

log = logging.getLogger(__name__)

GIB = 2**30
CUDA_CONTEXT_GIB = 1.0  # CUDA context and allocator slack on top of the allocated estimate
# Memory sizes of common training GPUs (GiB), for the dry run's "largest micro-batch" line.
GPU_SIZES_GIB = (24, 48, 80, 141)
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)

# Shapes of the recipe models, used only when their config cannot be fetched (no network): enough for the
# estimate. Keys are matched against the lower-cased model name.
SHAPE_TABLE: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=False, max_position_embeddings=131072),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, tie_word_embeddings=False,
                       max_position_embeddings=32768),
    "phi-3-mini": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, tie_word_embeddings=False,
                       max_position_embeddings=4096),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768),
    "opt-350m": dict(model_type="opt", hidden_size=1024, word_embed_proj_dim=512, ffn_dim=4096, num_hidden_layers=24,
                     num_attention_heads=16, vocab_size=50272, max_position_embeddings=2048, do_layer_norm_before=False),
    "bert-base": dict(model_type="bert", hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, vocab_size=30522, max_position_embeddings=512),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "all-minilm-l6-v2": dict(model_type="bert", hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                             num_attention_heads=12, vocab_size=30522, max_position_embeddings=512),
}
GATED_MLP = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "mixtral")


def table_config(name: str):
    """A PretrainedConfig from SHAPE_TABLE for this model name, or None."""
    from transformers import AutoConfig

    key = next((k for k in SHAPE_TABLE if k in name.lower().replace("_", "-")), None)
    if key is None:
        return None
    shape = dict(SHAPE_TABLE[key])
    return AutoConfig.for_model(shape.pop("model_type"), **shape)


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def model_config_for(cfg) -> tuple[Any, str]:
    """(PretrainedConfig or None, where it came from): a local/cached config, the hub, or tuneforge's table."""
    from transformers import AutoConfig

    from tuneforge.models import embedded

    name = cfg.model.name_or_path
    if embedded.is_embedded(name):
        config = table_config(name.split(":", 1)[1])
        return config, "shape from tuneforge's table (embedded model)"
    kwargs = dict(revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True, **kwargs), "config.json (local)"
    except Exception:
        pass
    error = "the hub is unreachable"
    if _hub_reachable():
        try:
            return AutoConfig.from_pretrained(name, **kwargs), "config.json (hub)"
        except Exception as exc:
            error = str(exc).splitlines()[0]
    config = table_config(name)
    if config is not None:
        return config, f"shape from tuneforge's table ({error}; could not fetch {name}'s config)"
    return None, f"could not fetch {name}'s config ({error}) and tuneforge's table has no shape for it"


def _counts(model_config, cfg) -> dict[str, int]:
    """Exact parameter counts from a meta-device model: quantizable linear, other, and LoRA parameters."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task(cfg.task).head == SEQUENCE_CLASSIFICATION else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(model_config)
    output = model.get_output_embeddings()
    head_names = {"lm_head", "score", "classifier"}
    targets = cfg.peft.target_modules
    linear = lora = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output or name.split(".")[-1] in head_names:
            continue
        linear += module.weight.numel()
        short = name.split(".")[-1]
        if targets == "all-linear" or short in list(targets):
            lora += cfg.peft.r * (module.in_features + module.out_features)
    total = sum(p.numel() for p in model.parameters())
    if cfg.peft.method != "lora":
        lora = 0
    return {"total": total, "linear": linear, "other": total - linear, "lora": lora}


def _shape(mc) -> dict[str, int]:
    h = mc.hidden_size
    heads = getattr(mc, "num_attention_heads", 1)
    head_dim = getattr(mc, "head_dim", None) or h // heads
    kv = (getattr(mc, "num_key_value_heads", None) or heads) * head_dim
    i = getattr(mc, "intermediate_size", None) or getattr(mc, "ffn_dim", None) or 4 * h
    return {"h": h, "kv": kv, "i": i, "layers": mc.num_hidden_layers,
            "gated": getattr(mc, "model_type", "") in GATED_MLP}


def estimate_memory(model_config, cfg, *, liger: bool = False, upcast_non_quantized: bool | None = None,
                    tokens_per_micro_batch: int | None = None, bf16: bool = True,
                    counts: dict[str, int] | None = None) -> dict[str, float]:
    """Peak GPU memory (GiB) per process for training `model_config` with `cfg` (formula: module docstring).

    `liger`: Liger's layer kernels (SwiGLU saves one intermediate-sized tensor less). `upcast_non_quantized`:
    whether non-quantized parameters are fp32 under 4-bit (None: quant.upcast_non_quantized and the launcher decide).
    `tokens_per_micro_batch`: default per_device_train_batch_size * max_length. `bf16`: compute dtype.
    `counts`: `_counts(model_config, cfg)` when the caller estimates the same model many times."""
    t, q, peft = cfg.train, cfg.quant, cfg.peft
    n = counts or _counts(model_config, cfg)
    s = _shape(model_config)
    c = 2 if bf16 else 4
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(cfg.model.dtype, c)
    lora = peft.method == "lora"
    if upcast_non_quantized is None:
        upcast_non_quantized = upcasts(cfg)
    if q.load_in_4bit:
        weights = n["linear"] * NF4_BYTES + n["other"] * (4 if upcast_non_quantized else c)
    else:
        weights = n["total"] * dtype_bytes
    trainable_n = n["lora"] if lora else n["total"]
    trainable_bytes = 4 if lora else dtype_bytes
    trainable = trainable_n * trainable_bytes
    grads = trainable
    optimizer = trainable_n * (2 if "8bit" in t.optim else 2 * trainable_bytes)

    tokens = tokens_per_micro_batch or t.per_device_train_batch_size * t.max_length
    stream = 4 if (q.load_in_4bit and upcast_non_quantized) else (dtype_bytes if not q.load_in_4bit else c)
    h, kv, i, layers = s["h"], s["kv"], s["i"], s["layers"]
    m = (4 if liger else 5) if s["gated"] else 2
    if lora:
        per_layer = c * (8 * h + 3 * kv + m * i)
        if peft.lora_dropout > 0 or stream != c:
            # Each lora_A then saves its own copy of its input (a dropout output, or autocast's cast of an fp32
            # stream) where it would share the one input of q/k/v and of gate/up.
            per_layer += c * 3 * h
        if peft.lora_dropout > 0:
            per_layer += 6 * h + i  # the masks, 1 byte per element on CUDA
    else:
        per_layer = c * (8 * h + 3 * kv + (m - 1) * i)
    if s["gated"] and q.load_in_4bit:
        # bitsandbytes returns its input's dtype: an fp32 stream keeps the gate and up outputs (and SiLU's,
        # without Liger) in fp32. Autocast's nn.Linear would return the compute dtype.
        per_layer += (stream - c) * (2 if liger else 3) * i
    if t.gradient_checkpointing:
        checkpointed = -(-layers // t.gradient_checkpointing_every_n_layers)  # layers 0, n, 2n, ...
        saved = 0 if t.gradient_checkpointing_offload else checkpointed * stream * h
        activations = tokens * (saved + (layers - checkpointed + 1) * per_layer + 2 * stream * h)
    else:
        activations = tokens * (layers * per_layer + 2 * stream * h)

    vocab = getattr(model_config, "vocab_size", 0) or 0
    loss = 0 if task(cfg.task).head == SEQUENCE_CLASSIFICATION else 2 * c * (min(tokens, 4096) * min(vocab, 32768) + min(vocab, 32768) * h)

    world = cfg.launcher.num_processes if cfg.launcher.name != "local" else 1
    if cfg.launcher.name in SHARDED_LAUNCHERS:
        weights, optimizer, grads = weights / world, optimizer / world, grads / world
    elif cfg.launcher.name == "deepspeed_zero2":
        optimizer, grads = optimizer / world, grads / world
    out = {"weights": weights, "trainable": trainable, "gradients": grads, "optimizer": optimizer,
           "activations": activations, "loss": loss}
    out = {k: v / GIB for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def largest_micro_batch(model_config, cfg, budget_gib: float, *, liger: bool = False, limit: int = 1024) -> int:
    """The largest per_device_train_batch_size whose estimate, plus the CUDA context, fits `budget_gib`
    (0: not even one row of max_length tokens). The estimate grows with the micro-batch, so bisect."""
    counts = _counts(model_config, cfg)

    def fits(rows: int) -> bool:
        est = estimate_memory(model_config, cfg, liger=liger, counts=counts,
                              tokens_per_micro_batch=rows * cfg.train.max_length)
        return est["total"] + CUDA_CONTEXT_GIB <= budget_gib

    if not fits(1):
        return 0
    low, high = 1, limit  # fits(low) holds
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def fit_advice(model_config, cfg, budget_gib: float, *, liger: bool = False) -> str | None:
    """None when the configured micro-batch fits `budget_gib`; else what to change, keeping the effective batch."""
    t = cfg.train
    rows = largest_micro_batch(model_config, cfg, budget_gib, liger=liger, limit=t.per_device_train_batch_size)
    if rows >= t.per_device_train_batch_size:
        return None
    if rows == 0:
        hint = ("train.gradient_checkpointing=true" if not t.gradient_checkpointing
                else f"a shorter train.max_length (now {t.max_length}), or a launcher that shards the model")
        return f"not even one row of {t.max_length} tokens fits; try {hint}."
    effective = t.per_device_train_batch_size * t.gradient_accumulation_steps
    accumulation = -(-effective // rows)
    return (f"train.per_device_train_batch_size={rows} train.gradient_accumulation_steps={accumulation} fits "
            f"(effective batch {rows * accumulation}, now {effective}).")


def upcasts(cfg) -> bool:
    """Whether a 4-bit run copies its unquantized weights to fp32 (tuneforge.models.adapters.prepare_base:
    quant.upcast_non_quantized, never under FSDP / ZeRO-3, which keep the bf16 storage)."""
    return (cfg.quant.load_in_4bit and cfg.quant.upcast_non_quantized
            and cfg.launcher.name not in SHARDED_LAUNCHERS)


def print_estimate(cfg) -> dict[str, float] | None:
    """The dry run's memory lines; says clearly when no config could be found."""
    model_config, source = model_config_for(cfg)
    print(f"{'model shape':>22}: {source}")
    if model_config is None:
        print(f"{'GPU memory estimate':>22}: unavailable")
        return None
    liger = bool(cfg.train.use_liger_kernel)
    est = estimate_memory(model_config, cfg, liger=liger)
    t = cfg.train
    print(f"{'GPU memory estimate':>22}: {est['total']:.1f} GiB per process (allocated; +~1 GiB CUDA context), "
          f"at {t.per_device_train_batch_size} x {t.max_length} tokens per micro-batch, gradient checkpointing "
          f"{checkpointing_policy(t)}")
    print(" " * 24 + ", ".join(f"{k} {v:.2f}" for k, v in est.items() if k != "total") + " (GiB)")
    if upcasts(cfg):
        lean = estimate_memory(model_config, cfg, liger=liger, upcast_non_quantized=False)
        print(" " * 24 + f"with quant.upcast_non_quantized=false (no fp32 copies of the unquantized weights): "
              f"{lean['total']:.1f} GiB ({lean['total'] - est['total']:+.2f})")
    sizes = ", ".join(f"{largest_micro_batch(model_config, cfg, gib, liger=liger)} on {gib}"
                      for gib in GPU_SIZES_GIB)
    gpu = local_gpu()
    here = (f"; {largest_micro_batch(model_config, cfg, gpu[1], liger=liger)} on this GPU ({gpu[0]}, "
            f"{gpu[1]:.1f} GiB)") if gpu else ""
    print(f"{'largest micro-batch':>22}: {sizes} GiB GPUs{here} (rows of {t.max_length} tokens, "
          f"+{CUDA_CONTEXT_GIB:.0f} GiB context)")
    return est


def local_gpu() -> tuple[str, float] | None:
    """(name, memory in GiB) of this process's CUDA device, or None without one."""
    import torch

    if not cuda_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.name, props.total_memory / GIB


def preflight(cfg) -> str | None:
    """Before weights load on CUDA: a warning when the estimate exceeds this GPU's memory, with a micro-batch
    that fits. A warning, not an error: padded batches shorter than max_length peak lower than estimated."""
    gpu = local_gpu()
    if gpu is None:
        return None
    model_config, _ = model_config_for(cfg)
    if model_config is None:
        return None
    total = gpu[1]
    est = estimate_memory(model_config, cfg, liger=bool(cfg.train.use_liger_kernel))
    advice = fit_advice(model_config, cfg, total, liger=bool(cfg.train.use_liger_kernel))
    if advice is None:
        return None
    return (f"estimated peak {est['total']:.1f} GiB per process (+{CUDA_CONTEXT_GIB:.0f} GiB context) exceeds "
            f"this GPU's {total:.1f} GiB at {cfg.train.per_device_train_batch_size} x {cfg.train.max_length} "
            f"tokens per micro-batch: {advice}")


def checkpointing_policy(t) -> str:
    if not t.gradient_checkpointing:
        return "off"
    n = t.gradient_checkpointing_every_n_layers
    return ("on" if n == 1 else f"on for one layer in {n}") + (", offloaded to host memory"
                                                                if t.gradient_checkpointing_offload else "")
