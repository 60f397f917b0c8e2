"""Render conversations with the chat template, tokenize, and build loss masks (labels).

Masks are built here, at preparation time, from the character spans of the assistant turns in the
rendered text, mapped to tokens through the fast tokenizer's offsets. Matching in context means a
template that tokenizes differently alone than after a newline cannot break masking (DESIGN rule 6),
every assistant turn is trained and every user/system turn masked (rule 7), and the end-of-turn
token closing each assistant turn is trained while template text after it is not (rule 2).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

IGNORE = -100


class TemplateError(ValueError):
    """The chat template renders a conversation's prefix differently from the whole (not prefix-stable)."""


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]],
                    stop_strings: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character span of every assistant turn, from the
    first character of its content through its end-of-turn token."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (through.startswith(prefix) and text.startswith(through)):
            raise TemplateError(
                "the chat template does not render this conversation's prefix as a prefix of the whole, "
                "so assistant turns cannot be located; use collator=completion_only with a response_template"
            )
        start, end = len(prefix), len(through)
        turn = through[start:]
        # Train through the end-of-turn token; what the template adds after it (a newline) stays masked.
        cut = max((turn.rfind(s) + len(s) for s in stop_strings if s in turn), default=-1)
        if cut > 0:
            end = start + cut
        spans.append((start, end))
    return text, spans


def labels_from_spans(input_ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Token i is trained when its first character lies inside an assistant span."""
    labels = [IGNORE] * len(input_ids)
    j = 0
    for i, (start, _end) in enumerate(offsets):
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        if j < len(spans) and spans[j][0] <= start < spans[j][1]:
            labels[i] = input_ids[i]
    return labels


def tokenize_conversations(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, stop_strings: list[str],
                           max_length: int, truncation_mode: str) -> dict[str, list]:
    """Batched `datasets.map` function: messages -> input_ids, labels, and per-row bookkeeping."""
    texts, all_spans = [], []
    for messages in batch["messages"]:
        text, spans = assistant_spans(tokenizer, messages, stop_strings)
        texts.append(text)
        all_spans.append(spans)
    # The chat template already placed every special token: adding BOS again would differ from inference.
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out: dict[str, list] = {"input_ids": [], "labels": [], "num_tokens": [], "truncated": []}
    for ids, offsets, spans in zip(enc["input_ids"], enc["offset_mapping"], all_spans):
        labels = labels_from_spans(ids, offsets, spans)
        truncated = len(ids) > max_length
        if truncated:
            cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
            ids, labels = ids[cut], labels[cut]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["num_tokens"].append(len(ids))
        out["truncated"].append(truncated)
    return out
