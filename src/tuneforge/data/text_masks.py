"""Tokenize a batch of texts in one fast-tokenizer call and turn each row's trained character spans into labels.

Every formatted row reaches this stage as text + spans (chat rows after rendering, render.py; plain-text
strategies by construction, formats.py). Spans map to tokens through the offsets of the whole text
tokenized in context, so a template that tokenizes differently alone than in context cannot break masking
(DESIGN rule 6). A token is trained when its characters overlap a span; that is worked out per span --
a few char -> token lookups on the Rust `Encoding`, or bisection over the offsets -- rather than per token,
because this runs on every row the data stage prepares. `collator.name=lm` trains every token; rows without
spans are labelled by `tokenize.completion_labels` (`collator.response_template`), or not at all. Span labels
are built on the whole row, then cut with it on truncation (a token's label depends on its own characters).
The per-token reference implementations these must agree with are in tests/mask_oracles.py.
"""

from __future__ import annotations

import os
from bisect import bisect_left, bisect_right
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

from transformers import PreTrainedTokenizerBase

from tuneforge.config.schemas import CollatorConfig
from tuneforge.data.tokenize import IGNORE, completion_labels


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> tuple[list[list[int]], list[Any]]:
    """(ids, offsets) per text, where offsets are a list of (start, end) or the Rust `Encoding` that answers
    char -> token questions without building that list (see `offsets_of`). No special tokens are added: the
    chat template or the format placed every one of them, and adding BOS again would differ from inference."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        # The Rust tokenizer directly: the same ids as tokenizer(texts), without building attention masks.
        encs = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encs], encs
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def offsets_of(offsets: Any) -> list[tuple[int, int]]:
    return offsets if isinstance(offsets, list) else offsets.offsets


_ENCODERS: dict[int, ThreadPoolExecutor] = {}


def encode_async(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> Future:
    """`encode` on this process's background thread (one per process: map workers are forked)."""
    pid = os.getpid()
    if pid not in _ENCODERS:
        _ENCODERS[pid] = ThreadPoolExecutor(1, thread_name_prefix="tuneforge-encode")
    return _ENCODERS[pid].submit(encode, tokenizer, texts)


def encoding_span_labels(ids: list[int], enc: Any, spans: list[list[int]]) -> Optional[list[int]]:
    """`span_labels` from a Rust `Encoding`: a few char -> token lookups per span instead of all offsets; None
    when a span boundary character belongs to no token (the offsets decide then)."""
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        if end <= start:
            continue
        a, last = enc.char_to_token(start), enc.char_to_token(end - 1)
        if a is None or last is None:
            return None
        # Neighbours by the same overlap rule (zero-width tokens, several tokens on one character).
        while a > 0 and _end(enc.token_to_chars(a - 1)) > start:
            a -= 1
        b = last + 1
        while b < len(ids) and enc.token_to_chars(b)[0] < end:
            b += 1
        labels[a:b] = ids[a:b]
    return labels


def span_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[list[int]]) -> list[int]:
    """Token i is trained when its characters overlap a span (a zero-width token counts as the point where it
    sits), found by bisection over the non-decreasing token starts and ends: O(log n) per span instead of a
    Python step per token."""
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        a = bisect_right(offsets, start, key=_end)
        b = bisect_left(offsets, end, key=_start)
        labels[a:b] = ids[a:b]
    return labels


def _start(offset: tuple[int, int]) -> int:
    return offset[0]


def _end(offset: tuple[int, int]) -> int:
    return max(offset[1], offset[0] + 1)


def build_labels(texts: list[str], spans: list[Optional[list[list[int]]]],
                 encoded: tuple[list[list[int]], list[Any]], max_length: int, truncation_mode: str,
                 collator: CollatorConfig) -> dict[str, list]:
    """input_ids, labels and per-row bookkeeping (truncated, n_trained) for a batch of texts, from the tokenizer
    call's output (`encoded` = `encode(tokenizer, texts)`, which may run elsewhere). `collator.name=lm` trains every
    token; rows with spans train them; rows without are left to `collator.response_template`."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": [], "n_trained": []}
    all_ids, all_offsets = encoded
    for text, ids, offsets, row_spans in zip(texts, all_ids, all_offsets, spans):
        truncated = len(ids) > max_length
        cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
        if collator.name == "lm":
            ids = ids[cut]
            labels = list(ids)
        elif row_spans:
            # A token's label depends on its own characters only: label the whole row, then cut.
            labels = None if isinstance(offsets, list) else encoding_span_labels(ids, offsets, row_spans)
            labels = (labels or span_labels(ids, offsets_of(offsets), row_spans))[cut]
            ids = ids[cut]
        elif collator.response_template is not None:
            ids, offsets = ids[cut], offsets_of(offsets)[cut]
            labels = completion_labels(ids, offsets, text, collator.response_template,
                                       collator.instruction_template) or [IGNORE] * len(ids)
        else:
            ids = ids[cut]
            labels = [IGNORE] * len(ids)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["truncated"].append(truncated)
        out["n_trained"].append(len(labels) - labels.count(IGNORE))
    return out
