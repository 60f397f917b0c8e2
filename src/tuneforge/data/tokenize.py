"""Tokenize formatted rows and build their loss masks (labels) at preparation time.

Masks are built here, before batching, so that they survive packing and are counted before any
trainer could silently drop a fully masked row; at batch time the collator only pads or flattens.

Two kinds of formatted rows arrive here:
- `messages` (chat): rendered with the chat template; an assistant turn's [start, end) character span
  runs from its content through its end-of-turn token and is mapped to tokens through the fast
  tokenizer's offsets. Matching in context means a template that tokenizes differently alone than after
  a newline cannot break masking (DESIGN rule 6); every assistant turn is trained and every user/system
  turn masked (rule 7); the end-of-turn token is trained, template text after it is not (rule 2). For
  `collator=assistant_only` with a template that has `{% generation %}` markers, the template's own
  assistant mask is used instead (transformers' `return_assistant_tokens_mask`, what TRL's
  `assistant_only_loss` uses).
- `text` (+ optional `spans`, [start, end) character spans to train): bring-your-own formatted text.
  Without spans the completion is located by `collator.response_template` (a string, found in the text
  and mapped through offsets, or token ids, found in the token ids), and with `instruction_template` too
  every response is trained up to the next instruction (multi-turn). TRL removed the collator that did
  this (DataCollatorForCompletionOnlyLM), hence the code here.
"""

from __future__ import annotations

import bisect
import logging
import os
import warnings
from typing import Any, Optional, Sequence

from transformers import PreTrainedTokenizerBase
from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

from tuneforge.config import CollatorConfig

IGNORE = -100

log = logging.getLogger(__name__)


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
        # Templates may close a conversation with text a continued one lacks (Phi-3 appends EOS after the
        # last turn): the turn ends where `through` and the whole text part ways.
        end = len(os.path.commonprefix([through, text]))
        if not (text.startswith(prefix) and through.startswith(prefix)) or end <= len(prefix):
            raise TemplateError(
                "the chat template does not render this conversation's prefix as a prefix of the whole, "
                "so assistant turns cannot be located; use collator=completion_only with a response_template"
            )
        start = len(prefix)
        through = through[:end]
        turn = through[start:]
        # Train through the first end-of-turn token; what the template adds after it (a newline, or Phi-3's
        # closing EOS) stays masked, as in the single-render route (render.py).
        cut = min((turn.find(s) + len(s) for s in stop_strings if s in turn), default=-1)
        if cut > 0:
            end = start + cut
        spans.append((start, end))
    return text, spans


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


# ---------------------------------------------------------------------------------------------------
# Conversations (messages)
# ---------------------------------------------------------------------------------------------------

def assistant_mask_route(tokenizer: PreTrainedTokenizerBase) -> str:
    """`generation` when the chat template marks assistant output with {% generation %} AND that mask
    includes the end-of-turn token (else the model would never learn to stop, rule 2); `offsets` otherwise."""
    template = tokenizer.chat_template
    if template and has_generation_markers(template):
        if is_chat_template_stop_token_trained(tokenizer):
            return "generation"
        log.warning("The chat template's {% generation %} mask leaves out the end-of-turn token; "
                    "masking assistant turns from rendered offsets instead.")
    return "offsets"


def generation_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans of the template's {% generation %} blocks (the mask TRL's
    `assistant_only_loss` trains), from transformers' token-level assistant mask mapped back through offsets."""
    text = render(tokenizer, messages)
    enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) != len(ids):
        raise TemplateError("the chat template's tokenized render differs from its text render")
    spans: list[tuple[int, int]] = []
    for (start, end), m in zip(offsets, mask):
        if not m:
            continue
        if spans and spans[-1][1] >= start:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return text, spans


def conversation_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], stop_strings: list[str],
                       route: str) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text + trained character spans by the chosen route (see `assistant_mask_route`)."""
    if route == "generation":
        return generation_spans(tokenizer, messages)
    return assistant_spans(tokenizer, messages, stop_strings)


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


# ---------------------------------------------------------------------------------------------------
# Formatted text (text + optional spans)
# ---------------------------------------------------------------------------------------------------

def _template_starts(template: Any, text: str, ids: list[int], offsets: list[tuple[int, int]], after: bool) -> list[int]:
    """Token positions of every occurrence of a template in one (already truncated) row.

    A string template is found in the text and mapped to tokens through offsets, which is matching in
    context by construction (DESIGN rule 6: SentencePiece tokenizes "### Assistant:" after a newline
    differently than alone). Token ids are matched as a subsequence of the row's ids (build them in
    context, e.g. `tokenizer.encode("\\n### Assistant:")[2:]`, as with TRL's old collator).
    `after=True` gives the first token holding a character after each occurrence (where a response starts);
    `after=False` the token holding its first character (where an instruction starts).
    """
    found = []
    if isinstance(template, str):
        if not offsets:
            return []
        ends = [e for _, e in offsets]
        # Only occurrences wholly inside the kept (possibly truncated) part of the text count.
        lo, hi = offsets[0][0], ends[-1]
        pos = text.find(template, lo)
        while pos != -1 and pos + len(template) <= hi:
            # The first token with a character after the point (same overlap rule as labels_from_spans).
            found.append(bisect.bisect_right(ends, pos + len(template) if after else pos))
            pos = text.find(template, pos + 1)
        return found
    tpl = [int(t) for t in template]
    for i in range(len(ids) - len(tpl) + 1):
        if ids[i:i + len(tpl)] == tpl:
            found.append(i + len(tpl) if after else i)
    return found


def completion_labels(ids: list[int], offsets: list[tuple[int, int]], text: str,
                      response_template: Any, instruction_template: Any = None) -> Optional[list[int]]:
    """Labels training every response (after each response template, up to the next instruction
    template or the end of the row); None when no response template occurs in the row."""
    responses = _template_starts(response_template, text, ids, offsets, after=True)
    if not responses:
        return None
    instructions = sorted(_template_starts(instruction_template, text, ids, offsets, after=False)
                          if instruction_template is not None else [])
    labels = [IGNORE] * len(ids)
    for r in responses:
        end = next((i for i in instructions if i >= r), len(ids))
        labels[r:end] = ids[r:end]
    return labels


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
