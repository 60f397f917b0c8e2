"""PEFT: LoRA on a (4-bit) base, and reloading a saved adapter (DESIGN rule 10)."""

from __future__ import annotations

import logging

import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel

from tuneforge.config import PeftConfig, QuantConfig, TrainConfig
from tuneforge.library_args import checkpointing_kwargs, is_quantized, lora_config

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
    offload = train.gradient_checkpointing_offload and torch.cuda.is_available()
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
             task_type: str = "CAUSAL_LM"):
    """LoRA adapters on the (prepared) base; peft.method=none returns the model for a full fine-tune."""
    if cfg.method == "none":
        return model
    config = lora_config(cfg, task_type=task_type, new_token_ids=new_token_ids)
    model = keep_input_dtype_under_autocast(get_peft_model(model, config))
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


def load_adapter(base: PreTrainedModel, adapter_dir: str) -> PeftModel:
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
