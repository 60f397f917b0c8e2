"""Tokenize a batch of texts in one fast-tokenizer call and turn trained character spans into labels.

Every formatted row reaches this stage as text + spans (chat rows after rendering, plain-text
strategies by construction). Spans map to tokens through the offsets of the whole text tokenized
in context, so a template that tokenizes differently alone than in context cannot break masking
(DESIGN rule 6). Same rules as `tokenize.tokenize_text_rows` (which it calls for rows without
spans), computed per span by bisection instead of per token: this stage is the cold path's cost.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Optional

from transformers import PreTrainedTokenizerBase

from tuneforge.config import CollatorConfig
from tuneforge.data.tokenize import IGNORE, completion_labels


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """(ids, offsets) per text. No special tokens are added: the chat template or the format placed every
    one of them, and adding BOS again would differ from inference."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        # The Rust tokenizer directly: the same ids as tokenizer(texts), without building attention masks.
        encs = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encs], [e.offsets for e in encs]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def span_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[list[int]]) -> list[int]:
    """Token i is trained when its characters overlap a span -- `tokenize.labels_from_spans`' rule (a zero-width
    token counts as the point where it sits), by bisection over the non-decreasing token starts and ends."""
    starts = [s for s, _ in offsets]
    ends = [max(e, s + 1) for s, e in offsets]
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        a, b = bisect_right(ends, start), bisect_left(starts, end)
        labels[a:b] = ids[a:b]
    return labels


def tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str], spans: list[Optional[list[list[int]]]],
                   max_length: int, truncation_mode: str, collator: CollatorConfig) -> dict[str, list]:
    """input_ids, labels and per-row bookkeeping (truncated, n_trained) for a batch. `collator.name=lm` trains
    every token; rows with spans train them; rows without are left to `collator.response_template`."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": [], "n_trained": []}
    all_ids, all_offsets = encode(tokenizer, texts)
    for text, ids, offsets, row_spans in zip(texts, all_ids, all_offsets, spans):
        truncated = len(ids) > max_length
        if truncated:
            cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
            ids, offsets = ids[cut], offsets[cut]
        if collator.name == "lm":
            labels = list(ids)
        elif row_spans:
            labels = span_labels(ids, offsets, row_spans)
        elif collator.response_template is not None:
            labels = completion_labels(ids, offsets, text, collator.response_template,
                                       collator.instruction_template) or [IGNORE] * len(ids)
        else:
            labels = [IGNORE] * len(ids)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["truncated"].append(truncated)
        out["n_trained"].append(len(labels) - labels.count(IGNORE))
    return out
