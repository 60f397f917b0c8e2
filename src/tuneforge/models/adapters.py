"""PEFT: LoRA on a (4-bit) base, and reloading a saved adapter (DESIGN rule 10)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel

from tuneforge.config.device import cuda_available
from tuneforge.config.library_args import checkpointing_kwargs, is_quantized, lora_config
from tuneforge.config.schemas import PeftConfig, QuantConfig, TrainConfig

log = logging.getLogger(__name__)


def prepare_base(model: PreTrainedModel, quant: QuantConfig) -> PreTrainedModel:
    """DESIGN rule 10 on a 4-bit (or 8-bit) base: every base weight frozen (nothing to do on an unquantized one).

    With `quant.upcast_non_quantized` this is prepare_model_for_kbit_training, which also copies every weight
    that is not 4-bit to fp32. Without it (and always under FSDP / ZeRO-3, which flatten parameters into
    uniform-dtype shards) those weights keep their loaded dtype, as in TRL's own QLoRA path."""
    from tuneforge.models.loading import sharded_training

    if not is_quantized(quant):
        return model
    if quant.upcast_non_quantized and not sharded_training():
        # Checkpointing is enabled by enable_checkpointing, with the run's layer policy.
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for param in model.parameters():
        param.requires_grad = False
    return model


def enable_checkpointing(model: PreTrainedModel, train: TrainConfig) -> PreTrainedModel:
    """Non-reentrant activation checkpointing of every n-th decoder layer (train.gradient_checkpointing_*),
    the saved layer inputs optionally in pinned host memory; input gradients on, so frozen embeddings still
    pass gradients into checkpointed layers."""
    if not train.gradient_checkpointing:
        return model
    # On a CPU the saved activations already live in host memory (and pinning needs an accelerator).
    offload = train.gradient_checkpointing_offload and cuda_available()
    if train.gradient_checkpointing_offload and not offload:
        log.info("train.gradient_checkpointing_offload: no GPU, activations already in host memory")
    if hasattr(model, "activation_checkpointing_enable"):  # turns input gradients on itself
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs(train),
                                              every_n_layers=train.gradient_checkpointing_every_n_layers,
                                              offload=offload)
    else:  # transformers before the rename; validation refuses the layer policy there
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs(train))
        model.enable_input_require_grads()
    return model


def add_lora(model: PreTrainedModel, cfg: PeftConfig, new_token_ids: list[int] | None = None,
             task_type: str = "CAUSAL_LM", weights_path: str | None = None):
    """LoRA adapters on the (prepared) base; peft.method=none returns the model for a full fine-tune.

    peft.init_lora_weights=loftq on a 4-bit base goes through PEFT's replace_lora_weights_loftq: the adapters
    are fitted to the quantization error of each layer (read from the base's safetensors) and the 4-bit base
    stays as it loaded, so the saved adapter reproduces the trained model on a base reloaded from its weights.
    PEFT's own LoftQ init would instead rewrite the base weights, which tuneforge does not save. `weights_path`:
    the local model directory or hub id the base loaded from (LoftQ reads its full-precision weights)."""
    if cfg.method == "none":
        return model
    loftq = cfg.init_lora_weights == "loftq"
    if loftq:
        cfg = replace(cfg, init_lora_weights=True, loftq_config={})
    config = lora_config(cfg, task_type=task_type, new_token_ids=new_token_ids)
    model = get_peft_model(model, config)
    if loftq:
        from peft import replace_lora_weights_loftq

        local = weights_path if weights_path and Path(weights_path).is_dir() else None  # else: the hub cache
        replace_lora_weights_loftq(model, model_path=local)
    model = keep_input_dtype_under_autocast(model)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA: %s trainable of %s parameters (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def keep_input_dtype_under_autocast(model: PreTrainedModel) -> PreTrainedModel:
    """Under mixed precision, LoRA layers take their half-precision input as it is.

    PEFT keeps adapters in fp32 and casts every adapted layer's input to fp32 before lora_A, even under
    autocast, which casts it straight back to bf16 for the matmul: two full copies of each of the 6h + i
    adapted inputs per token and layer, and two more of their gradients (on a bf16 base; bitsandbytes'
    4-bit layers skip the cast under CUDA autocast only). bf16 -> fp32 -> bf16 is exact, so skipping it
    changes no value. Outside autocast (generation, fp32 training) the cast stays: fp32 adapters need it.
    """
    def hook(layer, args):
        x = args[0] if args else None
        layer.cast_input_dtype_enabled = not (torch.is_tensor(x) and torch.is_autocast_enabled(x.device.type))

    for layer in model.modules():
        if hasattr(layer, "cast_input_dtype_enabled"):  # PEFT's public switch (peft.helpers uses it too)
            layer.register_forward_pre_hook(hook)
    return model


@contextmanager
def adapter_dtypes_kept(model) -> Iterator[None]:
    """Trainable parameters leave the block in the dtype they entered it with.

    TRL's SFTTrainer (1.16) casts every trainable parameter of a quantized model to bf16 ("follow the QLoRA
    paper"), whatever the compute dtype. On a CPU in fp32 that rounds the adapters to bf16 and, through PEFT's
    input cast, every adapted layer's input too; and the saved adapter, which PEFT reloads in fp32, no longer
    computes what was trained (measured: a DoRA run's greedy answers differed after one step). tuneforge keeps
    PEFT's fp32 adapters (fp32 optimizer updates too); under bf16 autocast their matmuls still run in bf16."""
    dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    yield
    for name, param in model.named_parameters():
        if name in dtypes and param.dtype != dtypes[name]:
            param.data = param.data.to(dtypes[name])


# LoRA initialisations that rewrite the base weights into a residual (W - BA) before training.
RESIDUAL_INITS = ("pissa", "olora")
INITIAL_ADAPTER_DIR = "initial_adapter"  # PEFT loads it under its directory name: no dots


def rewrites_base(cfg: PeftConfig) -> bool:
    return cfg.method == "lora" and str(cfg.init_lora_weights).startswith(RESIDUAL_INITS)


def keep_initial_adapter(model, cfg: PeftConfig, run_dir) -> str | None:
    """PiSSA/OLoRA: the adapter as initialised, before any step. The saved adapter is then converted (PEFT's
    path_initial_model_for_weight_conversion) into a plain LoRA delta of twice the rank that applies to the
    original base weights, which is what a fresh process loads. None for other initialisations."""
    if not rewrites_base(cfg):
        return None
    path = str(Path(run_dir) / INITIAL_ADAPTER_DIR)
    model.save_pretrained(path)
    return path


def load_adapter(base: PreTrainedModel, adapter_dir: str) -> PeftModel:
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
