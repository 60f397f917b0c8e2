"""The device and precision, decided in one place: which accelerator this process has, what `auto` dtypes and
`train.bf16=null` mean on it, and the `auto` settings resolved for the device the job runs on (the fast path on
CUDA, the plain one on CPU).

Measured on an H100 (benchmarks/README.md, `benchmarks/gpu_train.py`): bfd packing gave 1.71x the
non-pad tokens/s of a plain padded TRL run at 1B and 8B and cut peak memory to 0.53-0.64x; Liger's
RMSNorm/RoPE/SwiGLU kernels on top gave 1.84-1.90x at 0.51-0.62x memory. On a CPU neither helps
(Liger needs Triton on CUDA; the demo's rows are all about the same length), so `auto` keeps them off.

TRL 1.16's fused, chunked LM head + loss (`train.fused_lm_head`, tasks/sft_trainer.py) never builds the
(batch, length, vocab) logits: on a GPU that is memory (49152 x 4096 fp32 logits and their gradient are 1.5 GiB
per row of a 4k batch), so `auto` keeps it on CUDA, as TRL does (not yet measured against the model's own head
there: `benchmarks/step_time.py --arms lean,tuneforge,tuneforge_model_head` on the next lent GPU). On a CPU it
only costs: the figures above `resolve`.
"""

from __future__ import annotations

import dataclasses
import importlib.util

from tuneforge.config.errors import ConfigError
from tuneforge.config.packing_modes import AUTO, packing_mode
from tuneforge.config.schemas import PACKING_ATTENTION, TuneforgeConfig
from tuneforge.config.tasks import task


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def xpu_available() -> bool:
    import torch

    return hasattr(torch, "xpu") and torch.xpu.is_available()


def accelerator_available() -> bool:
    """A CUDA, XPU or Apple MPS device."""
    import torch

    return cuda_available() or xpu_available() or torch.backends.mps.is_available()


def device_supports_bf16() -> bool:
    import torch

    return cuda_available() and torch.cuda.is_bf16_supported()


def compute_dtype(name: str):
    """A dtype name as a torch dtype. auto: bf16 where a CUDA device supports it, else fp32 (fp32 is also the
    faster choice on CPUs)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device_supports_bf16() else torch.float32
    return getattr(torch, name)


def resolved_bf16(train) -> bool:
    """train.bf16=null (auto): bf16 where a CUDA device supports it, else fp32 (config/library_keys.TRAIN's
    reason)."""
    return device_supports_bf16() if train.bf16 is None else bool(train.bf16)


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def auto_packing_mode(cfg: TuneforgeConfig, cuda: bool) -> str:
    """packing=auto: bfd on CUDA wherever packing is allowed (causal-LM labels, an attention that honours
    restarting position ids), none otherwise."""
    packable = (task(cfg.task).packs and cfg.collator.name != "padding"
                and cfg.model.attn_implementation in PACKING_ATTENTION)
    return "bfd" if cuda and packable else "none"  # names in config/packing_modes.MODES


def check_packed_attention(mode: str, attn: str, cuda: bool) -> None:
    """flex_attention keeps packed sequences apart on CUDA, but on a CPU that depends on the processor:
    measured on an AMD EPYC, its packed loss was NaN (2 layers) and off by 2.5e-3 (1 layer) where sdpa and
    eager gave 0.0; on an Intel Xeon it was clean. A run must not depend on which CPU it landed on."""
    if packing_mode(mode).shares_rows and attn == "flex_attention" and not cuda:
        raise ConfigError(
            f"packing.mode={mode} with model.attn_implementation=flex_attention on a CPU: whether flex_attention "
            "keeps packed sequences apart on a CPU depends on the processor (NaN or cross-sequence attention on "
            "some). Use model.attn_implementation=sdpa (or eager) on a CPU, flex_attention on a CUDA GPU, "
            "or packing=none.")


# train.fused_lm_head on a CPU, measured with benchmarks/step_time.py on the shared 2-core Xeon (AMX), the demo's
# job (QLoRA NF4, LoRA r=16 on all linear layers, batch 8, max length 128, fp32), all arms in one process taking
# turns step by step: with the fused head the step took 1.26x the lean transformers Trainer + PEFT reference's,
# with the model's own head 1.02x (paired medians, 3 processes at load 6-11; head+loss 2.1 vs 1.4-1.5 s, backward
# 14.2 vs 6.8-7.4 s). On a CPU the fused head scores every position (its compaction of the trained positions runs
# on Triton devices only) and recomputes the logits in the backward. The model's own head on the trained positions
# only (tasks/sft_trainer.py) then took 0.91x the lean reference's step quiet, 0.61x at load ~11 (paired).


def resolve(cfg: TuneforgeConfig, cuda: bool | None = None) -> TuneforgeConfig:
    """A copy of `cfg` with `packing.mode=auto`, `train.use_liger_kernel=null` and `train.fused_lm_head=null`
    decided for this device, and the packing rules that depend on the device checked."""
    auto = cfg.packing.mode == AUTO
    flex_packed = (not auto and packing_mode(cfg.packing.mode).shares_rows
                   and cfg.model.attn_implementation == "flex_attention")
    needs_device = auto or cfg.train.use_liger_kernel is None or cfg.train.fused_lm_head is None or flex_packed
    cuda = (cuda_available() if needs_device else False) if cuda is None else cuda
    packing, train = cfg.packing, cfg.train
    if auto:
        packing = dataclasses.replace(packing, mode=auto_packing_mode(cfg, cuda))
    check_packed_attention(packing.mode, cfg.model.attn_implementation, cuda)
    if train.use_liger_kernel is None:
        train = dataclasses.replace(train, use_liger_kernel=cuda and liger_installed() and task(cfg.task).liger)
    elif train.use_liger_kernel and not liger_installed():
        raise ConfigError("train.use_liger_kernel=true needs the liger-kernel package (pip install 'tuneforge[gpu]'), "
                          "or leave it unset (auto: on where CUDA and liger-kernel are available).")
    if train.fused_lm_head is None:
        # On CUDA the fused head saves the logits' memory; on a CPU it is slower (figures above).
        train = dataclasses.replace(train, fused_lm_head=cuda)
    return dataclasses.replace(cfg, packing=packing, train=train)
