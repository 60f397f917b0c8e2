"""The shared inference helper: left padding, left truncation, prompt stripped by token position."""

from __future__ import annotations

import copy

import torch

from tuneforge.eval.inference import GenerationSettings, generate, left_pad, prompt_ids
from tuneforge.models.tokenizer import stop_token_ids


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


def _scripted(model, scripts: list[list[int]]):
    """Make `model` emit exactly `scripts[row][step]` at each generation step (a forward hook that
    rewrites the last position's logits), so stopping is tested independently of what it learned."""
    calls = []

    def hook(module, args, kwargs, output):
        step = len(calls)
        calls.append(step)
        logits = torch.full_like(output.logits[:, -1:, :], -1e9)
        for row, script in enumerate(scripts):
            logits[row, 0, script[min(step, len(script) - 1)]] = 0.0
        output.logits = logits
        return output

    return model.register_forward_hook(hook, with_kwargs=True), calls


def test_generation_stops_at_end_of_turn_and_at_eos(smollm_fp32, smollm_tokenizer):
    """The end-of-turn token stops a row even when EOS is another token; nothing after it is returned,
    and generation ends once every row has stopped (not at max_new_tokens)."""
    tok = copy.deepcopy(smollm_tokenizer)
    tok.eos_token = "<|endoftext|>"  # EOS != end-of-turn, as in Llama-3 (<|end_of_text|> vs <|eot_id|>)
    tok.pad_token = "<|im_start|>"
    end_of_turn, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    assert set(stop_token_ids(tok)) == {end_of_turn, eos}
    word = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    a, b, junk = word(" alpha"), word(" beta"), word(" junk")
    scripts = [a + [end_of_turn] + junk * 20, b + b + [eos] + junk * 20]
    hook, calls = _scripted(smollm_fp32, scripts)
    try:
        out = generate(smollm_fp32, tok, ["first", "second question"], GenerationSettings(max_new_tokens=16))
    finally:
        hook.remove()
    assert out == ["alpha", "beta beta"]
    assert len(calls) == len(b) * 2 + 1  # the longer row's tokens + its stop token, then done


def test_chat_sends_the_whole_conversation_each_turn(smollm_fp32, smollm_tokenizer, monkeypatch, capsys):
    """`infer chat=true`: every turn is generated from the conversation so far, answers included, and led by the
    run's system prompt (here an empty one) as its training rows were."""
    from tuneforge.commands import infer
    from tuneforge.config.schemas import FormatConfig
    from tuneforge.data.formats import with_system_prompt

    seen = []

    def spy(model, tokenizer, prompts, settings, stream=False):
        seen.append(copy.deepcopy(prompts[0]))
        return generate(model, tokenizer, prompts, settings, stream=stream)

    lines = iter(["What is 2+2?", "And 3+3?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr("tuneforge.eval.inference.generate", spy)  # what infer.chat generates with
    as_trained = lambda messages: with_system_prompt(messages, FormatConfig(system_prompt=""))  # noqa: E731
    answers = infer.chat(smollm_fp32, smollm_tokenizer, GenerationSettings(max_new_tokens=8), as_trained)
    assert len(answers) == 2 and all(answers)
    assert seen[0] == [{"role": "system", "content": ""}, {"role": "user", "content": "What is 2+2?"}]
    assert seen[1] == [{"role": "system", "content": ""}, {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": answers[0]},
                       {"role": "user", "content": "And 3+3?"}]
    streamed = capsys.readouterr().out
    assert streamed.count("model> ") == 2 and answers[0] in streamed and answers[1] in streamed
