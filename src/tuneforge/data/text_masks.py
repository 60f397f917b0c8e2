"""Tokenize texts in one batched fast-tokenizer call and turn their trained character spans into labels.

Every formatted row reaches this stage as text + spans (chat rows after rendering, plain-text
strategies by construction). The spans are mapped to tokens through the offsets of the whole text
tokenized in context, so a template that tokenizes differently alone than in context cannot
break masking (DESIGN rule 6).
"""

from __future__ import annotations

from bisect import bisect_left

from transformers import PreTrainedTokenizerBase

from tuneforge.data.tokenize import IGNORE


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """(ids, token start offsets) per text. Special tokens are not added: the template or the format already
    placed every one of them, and adding BOS again would differ from inference."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        # The Rust tokenizer directly: same ids as tokenizer(texts), without building attention masks.
        encs = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encs], [[o[0] for o in e.offsets] for e in encs]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [[o[0] for o in offs] for offs in enc["offset_mapping"]]


def span_labels(ids: list[int], starts: list[int], spans: list[list[int]]) -> list[int]:
    """Token i is trained when its first character lies inside a span (same rule as
    `tokenize.labels_from_spans`, by bisection over the non-decreasing token starts)."""
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        a, b = bisect_left(starts, start), bisect_left(starts, end)
        labels[a:b] = ids[a:b]
    return labels


def tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str], spans: list[list[list[int]]],
                   max_length: int, truncation_mode: str) -> dict[str, list]:
    """input_ids, labels, and per-row bookkeeping (truncated, n_trained) for a batch."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": [], "n_trained": []}
    all_ids, all_starts = encode(tokenizer, texts)
    for ids, starts, row_spans in zip(all_ids, all_starts, spans):
        labels = span_labels(ids, starts, row_spans)
        truncated = len(ids) > max_length
        if truncated:
            cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
            ids, labels = ids[cut], labels[cut]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["truncated"].append(truncated)
        out["n_trained"].append(len(labels) - labels.count(IGNORE))
    return out
