"""THE generation helper: every generation in tuneforge (eval, infer, before/after tables) goes here.

It owns the rules that silently break generation when each caller does it its own way:
the training chat template with the generation prompt (rule 5), LEFT padding and left truncation
that keeps the generation prompt (rule 3), eval mode with the KV cache on (rule 11), stopping at
EOS and end-of-turn, and stripping the prompt by token position, never by string length (rule 4).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from tuneforge.models.tokenizer import stop_token_ids


@dataclass(frozen=True)
class Rendered:
    """A prompt already formatted for the model (plain-text formats): tokenized as is, no chat template."""

    text: str


Prompt = Union[str, Rendered, Sequence[dict[str, Any]]]


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    max_input_tokens: int = 1024
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    # None: the model's generation config decides; 0 turns top-k off (TRL's sampling for online RL).
    top_k: Optional[int] = None
    seed: int = 0


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, max_input_tokens: int) -> list[int]:
    """Token ids of one prompt, rendered with the chat template + generation prompt when there is one.

    A raw string becomes a single user turn. Too-long prompts lose their oldest tokens: the end,
    which holds the generation prompt, is always kept.
    """
    text = render_prompt(tokenizer, prompt)
    if isinstance(prompt, Rendered) or tokenizer.chat_template:
        # A rendered prompt is tokenized exactly as the data stage tokenized the training text (the format or the
        # template placed any special tokens).
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(text)["input_ids"]
    return ids[-max_input_tokens:]


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> str:
    """The text of one prompt as the model reads it: the chat template + generation prompt when there is one (a raw
    string is a single user turn), a `Rendered` prompt as is, else the plain text."""
    if isinstance(prompt, Rendered):
        return prompt.text
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise ValueError("This tokenizer has no chat template: give prompts as plain text.")
    return prompt


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
    return input_ids, mask


@contextmanager
def eval_mode(model: PreTrainedModel) -> Iterator[None]:
    """Eval mode (dropout off) for the duration; the previous mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _device(model: PreTrainedModel) -> torch.device:
    return next(p.device for p in model.parameters())


@dataclass
class Completion:
    """One generated completion: its text (special tokens skipped, stripped), its token ids up to and excluding the
    stop token, and whether it stopped (False: cut at max_new_tokens)."""

    text: str
    ids: list[int]
    stopped: bool


@torch.inference_mode()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
             settings: GenerationSettings | None = None, stream: bool = False) -> list[str]:
    """Completions (prompt stripped, special tokens skipped), one per prompt, in order."""
    return [c.text for c in generate_completions(model, tokenizer, prompts, settings, stream)]


@torch.inference_mode()
def generate_completions(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                         settings: GenerationSettings | None = None, stream: bool = False) -> list[Completion]:
    """`generate` with each completion's token ids and whether it stopped (what the reward doctor measures)."""
    settings = settings or GenerationSettings()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer)
    encoded = [prompt_ids(tokenizer, p, settings.max_input_tokens) for p in prompts]
    device = _device(model)
    outputs: list[Completion] = []
    if settings.do_sample:
        torch.manual_seed(settings.seed)
    sampling = (
        {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p,
         **({"top_k": settings.top_k} if settings.top_k is not None else {})}
        if settings.do_sample else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    with eval_mode(model):
        for start in range(0, len(encoded), settings.batch_size):
            chunk = encoded[start:start + settings.batch_size]
            input_ids, mask = left_pad(chunk, pad_id)
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=settings.max_new_tokens,
                eos_token_id=stops,
                pad_token_id=pad_id,
                use_cache=True,
                streamer=streamer,
                **sampling,
            )
            # Every row was padded to the same width on the left, so the completion starts there.
            completions = out[:, input_ids.shape[1]:]
            texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
            for row, text in zip(completions.tolist(), texts):
                end = next((i for i, t in enumerate(row) if t in stops), None)
                outputs.append(Completion(text.strip(), row[:end] if end is not None else row, end is not None))
    return outputs


@torch.inference_mode()
def answer_logprobs(model: PreTrainedModel, prompts: Sequence[list[int]], answers: Sequence[list[int]],
                    pad_id: int, batch_size: int = 8) -> list[float]:
    """Sum of log p(answer token | prompt, earlier answer tokens) per (prompt ids, answer ids) pair, in eval mode:
    how likely the model finds an answer, the quantity DPO's rewards compare. Rows are padded on the left, as
    for generation, so every answer ends at the last position."""
    out: list[float] = []
    device = _device(model)
    with eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            rows = [list(p) + list(a) for p, a in zip(prompts[start:start + batch_size], answers[start:start + batch_size])]
            input_ids, mask = left_pad(rows, pad_id)
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            targets = input_ids[:, 1:].to(device)
            token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            for row, answer in enumerate(answers[start:start + batch_size]):
                n = len(answer)
                out.append(float(token_logps[row, token_logps.shape[1] - n:].sum()) if n else 0.0)
    return out
