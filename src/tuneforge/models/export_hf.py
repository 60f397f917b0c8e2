"""A merged model as a standalone HF-format folder for serving (vLLM, SGLang, TGI, transformers): safetensors, the
run's tokenizer with the training chat template, and a generation config whose EOS ids include the end-of-turn token,
so that a server stops where training stopped (DESIGN rule 13)."""

from __future__ import annotations

from pathlib import Path

from tuneforge.models.tokenizer import stop_token_ids


def write_hf(model, tokenizer, out: Path) -> dict:
    """Save `model` (merged, full precision) with `tokenizer` into `out`; returns the generation-config ids written."""
    eos_ids = stop_token_ids(tokenizer)  # EOS first, then the end-of-turn token
    generation = model.generation_config
    # A list: transformers, vLLM, SGLang and TGI stop at any of them.
    generation.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"eos_token_id": eos_ids, "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id}
