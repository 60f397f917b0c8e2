"""Reference implementations of the loss masks, independent of the production path: tests check the fast
path (data/pipeline.py -> data/render.py one-pass render -> data/text_masks.build_labels, with bisection and
char -> token lookups) against them, row for row, on every shipped chat template and text strategy.

They are the straightforward versions: every assistant turn located by rendering each conversation prefix
(tokenize.assistant_spans), every token labelled by a Python loop over its offsets (labels_from_spans).
Slow, and easy to read; production must agree with them.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

from transformers import PreTrainedTokenizerBase

from tuneforge.config import CollatorConfig
from tuneforge.data.tokenize import IGNORE, assistant_mask_route, completion_labels, conversation_spans


def labels_from_spans(input_ids: list[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
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


def _truncate(seqs: list[list], length: int, max_length: int, truncation_mode: str) -> tuple[list[list], bool]:
    """Cut every parallel sequence the same way (SFTConfig.truncation_mode semantics)."""
    if length <= max_length:
        return seqs, False
    cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
    return [s[cut] for s in seqs], True


def _append(out: dict[str, list], ids: list[int], labels: list[int], truncated: bool) -> None:
    out["input_ids"].append(ids)
    out["labels"].append(labels)
    out["num_tokens"].append(len(ids))
    out["truncated"].append(truncated)


def _empty_output() -> dict[str, list]:
    return {"input_ids": [], "labels": [], "num_tokens": [], "truncated": []}


def tokenize_conversations(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, stop_strings: list[str],
                           max_length: int, truncation_mode: str,
                           collator: Optional[CollatorConfig] = None) -> dict[str, list]:
    """Batched `datasets.map` function: messages -> input_ids, labels, num_tokens, truncated.

    `collator.name=lm` trains every token; otherwise (completion_only, assistant_only, or no collator
    given) the assistant turns are trained: from the template's {% generation %} mask with
    `assistant_only` when the template supports it, from rendered offsets otherwise.
    """
    collator = collator or CollatorConfig(name="assistant_only")
    route = assistant_mask_route(tokenizer) if collator.name == "assistant_only" else "offsets"
    rendered = [conversation_spans(tokenizer, m, stop_strings, route) for m in batch["messages"]]
    return tokenize_text_rows({"text": [t for t, _ in rendered], "spans": [s for _, s in rendered]},
                              tokenizer, collator, max_length, truncation_mode)


def tokenize_text_rows(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, collator: CollatorConfig,
                       max_length: int, truncation_mode: str) -> dict[str, list]:
    """Batched `datasets.map` function: text (+ optional spans) -> input_ids, labels, num_tokens, truncated.

    The text is tokenized as is (no special tokens added: the chat template or the format placed them,
    EOS included -- see format.append_eos). Labels: `collator.name=lm` trains every token; non-empty
    `spans` train those character spans; otherwise `collator.response_template` (+ `instruction_template`)
    locates the responses. A row where the template is not found keeps all labels at -100 (the pipeline
    counts it as fully masked) and one warning per batch says how many, and how many of those were
    truncated (the template may have been cut off: raise train.max_length).
    """
    texts = batch["text"]
    spans_col = batch.get("spans") or [None] * len(texts)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = _empty_output()
    missing = missing_truncated = 0
    for text, spans, ids, offsets in zip(texts, spans_col, enc["input_ids"], enc["offset_mapping"]):
        (ids, offsets), truncated = _truncate([list(ids), [tuple(o) for o in offsets]], len(ids), max_length,
                                              truncation_mode)
        if collator.name == "lm":
            labels = list(ids)
        elif spans:
            labels = labels_from_spans(ids, offsets, sorted((int(s), int(e)) for s, e in spans))
        else:
            labels = (completion_labels(ids, offsets, text, collator.response_template, collator.instruction_template)
                      if collator.response_template is not None else None)
            if labels is None:
                labels = [IGNORE] * len(ids)
                missing += 1
                missing_truncated += truncated
        _append(out, ids, labels, truncated)
    if missing:
        warnings.warn(
            f"collator.response_template={collator.response_template!r} was not found in {missing} of "
            f"{len(texts)} rows ({missing_truncated} of them truncated to train.max_length={max_length}); "
            "their labels are all -100 and they train nothing. Check the template against the formatted text "
            "(or give it as token ids found in context), or raise train.max_length.",
            UserWarning, stacklevel=2,
        )
    return out


def tokenize_rows(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, collator: CollatorConfig,
                  stop_strings: list[str], max_length: int, truncation_mode: str) -> dict[str, list]:
    """One `datasets.map` function for both kinds of formatted rows: `messages` or `text` (+ `spans`)."""
    if "messages" in batch:
        return tokenize_conversations(batch, tokenizer, stop_strings, max_length, truncation_mode, collator)
    return tokenize_text_rows(batch, tokenizer, collator, max_length, truncation_mode)
