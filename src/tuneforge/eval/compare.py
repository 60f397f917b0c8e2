"""Two models compared on the same prompts: greedy generations through the shared inference helper and the logits
of the prompt tokens. What `tuneforge merge` checks a merged model with (and an export its written form)."""

from __future__ import annotations

import torch

from tuneforge.eval.inference import GenerationSettings, eval_mode, generate, left_pad, prompt_ids


@torch.inference_mode()
def prompt_logits(model, tokenizer, prompts: list, max_tokens: int = 512) -> torch.Tensor:
    """The logits at every prompt token (left-padded batch, padding left out), as float32 on the CPU."""
    ids, mask = left_pad([prompt_ids(tokenizer, p, max_tokens) for p in prompts], tokenizer.pad_token_id)
    device = next(p.device for p in model.parameters())
    with eval_mode(model):
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    return out.logits.float().cpu()[mask.bool()]


def compare_models(reference, candidate, tokenizer, prompts: list, max_new_tokens: int) -> dict:
    """How far `candidate` is from `reference`: identical greedy generations, the largest |logit difference| and
    the share of prompt positions whose argmax differs."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=len(prompts))
    ref_gen = generate(reference, tokenizer, prompts, settings)
    new_gen = generate(candidate, tokenizer, prompts, settings)
    ref_logits, new_logits = prompt_logits(reference, tokenizer, prompts), prompt_logits(candidate, tokenizer, prompts)
    return {
        "prompts": len(prompts),
        "identical_generations": sum(a == b for a, b in zip(ref_gen, new_gen)),
        "max_abs_logit_diff": float((ref_logits - new_logits).abs().max()),
        "argmax_disagreement": float((ref_logits.argmax(-1) != new_logits.argmax(-1)).float().mean()),
    }
