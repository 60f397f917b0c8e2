"""Render chat conversations to text + the character spans of their assistant turns, in batches.

Two renders per conversation whatever its number of turns: the plain render (the exact training text)
and a render whose assistant contents are wrapped in private-use marker characters. Removing the
markers must give back the plain render exactly -- that per-row check is what makes the marker
positions trustworthy, even for templates that trim or rewrite content. A row that fails the check
falls back to the prefix-render method of `tokenize.assistant_spans` (2 renders per assistant turn).
"""

from __future__ import annotations

from typing import Any, Optional

from transformers import PreTrainedTokenizerBase

from tuneforge.data.tokenize import TemplateError, assistant_spans, conversation_spans

OPEN, CLOSE = "\ue000", "\ue001"  # Unicode private-use characters: absent from real text (checked anyway)

Messages = list[dict[str, Any]]


def render_conversations(tokenizer: PreTrainedTokenizerBase, conversations: list[Messages], stop_strings: list[str],
                         route: str = "offsets") -> list[tuple[str, list[list[int]]] | TemplateError]:
    """(text, spans) per conversation, or the TemplateError that makes it unusable. A span runs from the
    first character of an assistant content through its end-of-turn token; template text after it
    (ChatML's newline) stays outside so it is not trained (DESIGN rule 2). route="generation" (see
    `tokenize.assistant_mask_route`) takes the template's own {% generation %} mask instead."""
    if not conversations:
        return []
    if route == "generation":
        return [_guarded(conversation_spans, tokenizer, c, stop_strings, route) for c in conversations]
    texts = tokenizer.apply_chat_template(conversations, tokenize=False)
    marked = tokenizer.apply_chat_template([_mark(c) for c in conversations], tokenize=False)
    out = []
    for conv, text, mark in zip(conversations, texts, marked):
        spans = _spans_from_markers(text, mark, conv, stop_strings)
        out.append((text, spans) if spans is not None else _guarded(assistant_spans, tokenizer, conv, stop_strings))
    return out


def _guarded(fn, *args) -> tuple[str, list[list[int]]] | TemplateError:
    try:
        text, spans = fn(*args)
    except TemplateError as exc:
        return exc
    return text, [list(s) for s in spans]


def _mark(messages: Messages) -> Messages:
    return [dict(m, content=OPEN + m["content"] + CLOSE) if m["role"] == "assistant" else m for m in messages]


def _spans_from_markers(text: str, marked: str, messages: Messages, stops: list[str]) -> Optional[list[list[int]]]:
    """Content spans read off the markers, extended through the end-of-turn token; None when unsure."""
    if any(OPEN in m["content"] or CLOSE in m["content"] for m in messages):
        return None
    pieces, spans, i, pos = [], [], 0, 0
    while True:
        a = marked.find(OPEN, i)
        if a < 0:
            pieces.append(marked[i:])
            break
        b = marked.find(CLOSE, a + 1)
        if b < 0 or OPEN in marked[a + 1:b] or CLOSE in marked[i:a]:
            return None
        pieces.append(marked[i:a])
        pos += a - i
        spans.append([pos, pos + b - a - 1])
        pieces.append(marked[a + 1:b])
        pos += b - a - 1
        i = b + 1
    if CLOSE in pieces[-1] or "".join(pieces) != text:
        return None
    if len(spans) != sum(m["role"] == "assistant" for m in messages):
        return None
    for span in spans:
        end = _end_of_turn(text, span[1], stops)
        if end is None:
            return None
        span[1] = end
    return spans


def _end_of_turn(text: str, content_end: int, stops: list[str]) -> Optional[int]:
    """End of the first stop string after the content, when only whitespace lies between them."""
    best = None
    for stop in stops:
        j = text.find(stop, content_end)
        if j >= 0 and not text[content_end:j].strip() and (best is None or j < best[0]):
            best = (j, j + len(stop))
    return best[1] if best else None
