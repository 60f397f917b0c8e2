"""The shared inference helper: left padding, left truncation, prompt stripped by token position."""

from __future__ import annotations

from tuneforge.inference import GenerationSettings, generate, left_pad, prompt_ids


def test_left_truncation_keeps_generation_prompt(smollm_tokenizer):
    tok = smollm_tokenizer
    long_prompt = "tell me about dates " * 200
    ids = prompt_ids(tok, long_prompt, max_input_tokens=50)
    assert len(ids) == 50
    assert tok.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_left_pad_places_padding_on_the_left():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_generation_equals_one_by_one(smollm_fp32, smollm_tokenizer):
    """Prompts of very different lengths in one batch: left padding + stripping by position must give
    exactly what each prompt gives alone (a right-padded or string-stripped batch would not)."""
    prompts = [
        "What is 2+2?",
        "Rewrite this date in ISO 8601 format (YYYY-MM-DD). Answer with the date only.\nDate: the 3rd of March 2021",
        [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Colour of the sky?"}],
    ]
    settings = GenerationSettings(max_new_tokens=12, batch_size=3)
    batched = generate(smollm_fp32, smollm_tokenizer, prompts, settings)
    alone = [generate(smollm_fp32, smollm_tokenizer, [p], GenerationSettings(max_new_tokens=12))[0] for p in prompts]
    assert batched == alone
    assert all(b for b in batched)
    # No prompt text leaks into the answers.
    assert not any("assistant" in b or "Rewrite" in b for b in batched)


def test_generation_runs_in_eval_mode_and_restores_training(smollm_fp32, smollm_tokenizer):
    smollm_fp32.train()
    seen = []
    hook = smollm_fp32.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    try:
        generate(smollm_fp32, smollm_tokenizer, ["Hi"], GenerationSettings(max_new_tokens=2))
        restored = smollm_fp32.training
    finally:
        hook.remove()
        smollm_fp32.eval()
    assert seen and not any(seen)
    assert restored
