"""Independent oracles for the loss masks: the fast production path (data/pipeline.py -> data/render.py's
one-pass render -> `text_masks.build_labels`, via the pipeline) is checked against them on every shipped chat
template (tests/test_masks.py), and every chat row the tests build comes from that path, checked on the way
(`pipeline_rows`).

They are the straightforward versions, sharing no step with the fast path where it has a fast version of its
own: every assistant turn located by rendering each conversation prefix (`tokenize.assistant_spans`, which
production runs only as render.py's fallback), every token labelled by a Python loop over its offsets
(`labels_from_spans`, vs bisection and char -> token lookups), rows truncated before labelling (production labels
first, then cuts). The template's own {% generation %} mask and the response-template search have one
implementation (`tokenize.generation_spans`, `tokenize.completion_labels`): the oracles reuse them, and the
tests pin what they train by decoded text. Slow, and easy to read; production must agree with them.
"""

from __future__ import annotations

from typing import Optional, Sequence

from transformers import PreTrainedTokenizerBase

from tuneforge.config.schemas import CollatorConfig, FormatConfig
from tuneforge.data.pipeline import process_batch, tokenizer_kwargs
from tuneforge.data.sources import ROW
from tuneforge.data.text_masks import build_labels, encode
from tuneforge.data.tokenize import IGNORE, assistant_mask_route, completion_labels, conversation_spans

# Chat templates the tests use besides the shipped ones, each for a route of the fast path.
# ChatML with {% generation %} around each assistant content and its end-of-turn token: collator=assistant_only
# takes the template's own mask.
GENERATION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# ChatML that trims contents: marker positions cannot be trusted, render.py falls back to prefix renders.
TRIMMING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def labels_from_spans(input_ids: list[int], offsets: Sequence[tuple[int, int]],
                      spans: Sequence[tuple[int, int]]) -> list[int]:
    """Token i is trained when its characters overlap a span (spans sorted, non-overlapping). Overlap, not
    "starts inside": with BPE the completion's first token often carries the space before it (" Paris"
    after "Answer:"), and the model must still learn to produce it."""
    labels = [IGNORE] * len(input_ids)
    j = 0
    for i, (start, end) in enumerate(offsets):
        end = max(end, start + 1)  # a zero-width token counts as the point where it sits
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        if j < len(spans) and spans[j][0] < end and start < spans[j][1]:
            labels[i] = input_ids[i]
    return labels


def tokenize_conversations(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, stop_strings: list[str],
                           max_length: int, truncation_mode: str,
                           collator: Optional[CollatorConfig] = None) -> dict[str, list]:
    """messages -> input_ids, labels, truncated.

    `collator.name=lm` trains every token; otherwise (completion_only, assistant_only, or no collator
    given) the assistant turns are trained: from the template's {% generation %} mask with
    `assistant_only` when the template supports it, from prefix renders otherwise.
    """
    collator = collator or CollatorConfig(name="assistant_only")
    route = assistant_mask_route(tokenizer) if collator.name == "assistant_only" else "offsets"
    rendered = [conversation_spans(tokenizer, m, stop_strings, route) for m in batch["messages"]]
    return tokenize_text_rows({"text": [t for t, _ in rendered], "spans": [s for _, s in rendered]},
                              tokenizer, collator, max_length, truncation_mode)


def tokenize_text_rows(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, collator: CollatorConfig,
                       max_length: int, truncation_mode: str) -> dict[str, list]:
    """text (+ optional spans) -> input_ids, labels, truncated.

    The text is tokenized as is (no special tokens added: the chat template or the format placed them,
    EOS included -- see format.append_eos) and truncated (SFTConfig.truncation_mode semantics), then labelled:
    `collator.name=lm` trains every token; non-empty `spans` train those character spans; otherwise
    `collator.response_template` (+ `instruction_template`) locates the responses, and a row where it is not
    found trains nothing (the pipeline counts it as fully masked).
    """
    texts = batch["text"]
    spans_col = batch.get("spans") or [None] * len(texts)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": []}
    for text, spans, ids, offsets in zip(texts, spans_col, enc["input_ids"], enc["offset_mapping"]):
        ids, offsets = list(ids), [tuple(o) for o in offsets]
        truncated = len(ids) > max_length
        if truncated:
            cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
            ids, offsets = ids[cut], offsets[cut]
        if collator.name == "lm":
            labels = list(ids)
        elif spans:
            labels = labels_from_spans(ids, offsets, sorted((int(s), int(e)) for s, e in spans))
        elif collator.response_template is not None:
            labels = (completion_labels(ids, offsets, text, collator.response_template, collator.instruction_template)
                      or [IGNORE] * len(ids))
        else:
            labels = [IGNORE] * len(ids)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["truncated"].append(truncated)
    return out


def pipeline_rows(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]],
                  collator: Optional[CollatorConfig] = None, max_length: int = 512,
                  truncation_mode: str = "keep_start", system_prompt: Optional[str] = None) -> dict[str, list]:
    """input_ids, labels, truncated and n_trained of these conversations (raw rows of format.strategy=conversational)
    as the data stage prepares them -- its map function, with its stop strings and mask route: format, one-pass
    render, `build_labels` -- after checking them row for row against the oracle on the formatted messages."""
    collator = collator or CollatorConfig()
    kwargs = tokenizer_kwargs(tokenizer, collator)
    out = process_batch({ROW: list(range(len(conversations))), "messages": conversations},
                        fmt=FormatConfig(strategy="conversational", system_prompt=system_prompt), max_length=max_length,
                        truncation_mode=truncation_mode, on_bad_row="error", where="tests", keep_generation=True,
                        **kwargs)
    oracle = tokenize_conversations({"messages": out["messages"]}, tokenizer, kwargs["stops"], max_length,
                                    truncation_mode, collator)
    for i in range(len(conversations)):
        for key in ("input_ids", "labels", "truncated"):
            if out[key][i] != oracle[key][i]:
                raise AssertionError(f"row {i}: the production {key} differ from the oracle's\n"
                                     f"  production: {out[key][i]}\n  oracle:     {oracle[key][i]}")
    return {k: out[k] for k in ("input_ids", "labels", "truncated", "n_trained")}


def tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str], spans: list[Optional[list[list[int]]]],
                   max_length: int, truncation_mode: str, collator: CollatorConfig) -> dict[str, list]:
    """Text rows labelled by the production path (`text_masks.encode` -> `text_masks.build_labels`, as the data
    stage runs them), for tests that compare it with an oracle."""
    return build_labels(texts, spans, encode(tokenizer, texts), max_length, truncation_mode, collator)
