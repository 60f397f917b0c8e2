"""PEFT: LoRA on a (4-bit) base, and reloading a saved adapter (DESIGN rule 10)."""

from __future__ import annotations

import logging

from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import PreTrainedModel

from tuneforge.config import PeftConfig

log = logging.getLogger(__name__)

# Non-reentrant checkpointing works with frozen inputs and PEFT; the reentrant default warns or breaks.
GC_KWARGS = {"use_reentrant": False}


def lora_config(cfg: PeftConfig, task_type: str = "CAUSAL_LM", new_token_ids: list[int] | None = None) -> LoraConfig:
    target = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target,
        bias=cfg.bias,
        use_rslora=cfg.use_rslora,
        modules_to_save=list(cfg.modules_to_save) if cfg.modules_to_save else None,
        # Only the new rows of the embedding train (not the whole matrix, as modules_to_save would).
        trainable_token_indices=list(new_token_ids) if new_token_ids and cfg.train_new_tokens else None,
        task_type=task_type,
    )


def apply_peft(model: PreTrainedModel, cfg: PeftConfig, quantized: bool, gradient_checkpointing: bool,
               new_token_ids: list[int] | None = None, upcast_non_quantized: bool = True):
    """Wrap the model for training: kbit preparation on a 4-bit base, then LoRA (or nothing)."""
    if quantized:
        model = prepare_4bit(model, upcast_non_quantized, gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GC_KWARGS)
        if cfg.method == "lora":
            model.enable_input_require_grads()
    if cfg.method == "none":
        return model
    model = get_peft_model(model, lora_config(cfg, new_token_ids=new_token_ids))
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA: %s trainable of %s parameters (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def prepare_4bit(model: PreTrainedModel, upcast_non_quantized: bool, gradient_checkpointing: bool):
    """DESIGN rule 10 on a 4-bit base: frozen weights, checkpointing without reentrancy, input gradients.

    With `upcast_non_quantized` this is prepare_model_for_kbit_training, which also copies every weight that is
    not 4-bit to fp32. Without it (and always under FSDP / ZeRO-3, which flatten parameters into uniform-dtype
    shards) those weights keep their loaded dtype, as in TRL's own QLoRA path."""
    from tuneforge.models.loading import sharded_training

    if upcast_non_quantized and not sharded_training():
        return prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=GC_KWARGS
        )
    for param in model.parameters():
        param.requires_grad = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GC_KWARGS)
    model.enable_input_require_grads()
    return model


def load_adapter(base: PreTrainedModel, adapter_dir: str) -> PeftModel:
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
