"""Render chat conversations to text + the character spans of their assistant turns, in batches.

The assistant contents are rendered wrapped in private-use marker characters; removing the markers
gives the training text, and their positions give the spans. That is exact when the template only
ever copies content into the output (SmolLM2/ChatML, Phi-3, ...): `content_opaque` proves it from the
template's syntax tree, and such templates cost ONE render per conversation, whatever its number of
turns. Any other template (e.g. one that trims content) also gets the plain render, and the marked
render must equal it once the markers are removed -- that per-row check is what makes the positions
trustworthy. A row that fails it falls back to the prefix-render method of `tokenize.assistant_spans`
(2 renders per assistant turn).
"""

from __future__ import annotations

import functools
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
    try:
        return _render_conversations(tokenizer, conversations, stop_strings, route)
    except Exception as exc:
        # A template can reach outside the sandbox on some rows only (the probe at load time renders two
        # sample conversations): refuse it as a config error naming the template, not as a crash in the map.
        from tuneforge.models.tokenizer import sandbox_refusal, sandbox_refused

        if sandbox_refused(exc):
            raise sandbox_refusal(tokenizer, exc) from exc
        raise


def _render_conversations(tokenizer, conversations, stop_strings, route):
    if route == "generation":
        return [_guarded(conversation_spans, tokenizer, c, stop_strings, route) for c in conversations]
    if content_opaque(_template(tokenizer)):
        marked = _fast_render(tokenizer, [_mark(c) for c in conversations], check_first=True)
        texts = [m.replace(OPEN, "").replace(CLOSE, "") for m in marked]
    else:
        texts = tokenizer.apply_chat_template(conversations, tokenize=False)
        marked = _fast_render(tokenizer, [_mark(c) for c in conversations])
    out = []
    for conv, text, mark in zip(conversations, texts, marked):
        spans = _spans_from_markers(text, mark, conv, stop_strings)
        out.append((text, spans) if spans is not None else _guarded(assistant_spans, tokenizer, conv, stop_strings))
    return out


def _template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The template apply_chat_template would use (a tokenizer may hold several, by name)."""
    try:
        return tokenizer.get_chat_template()
    except (ValueError, TypeError):
        return ""


def _guarded(fn, *args) -> tuple[str, list[list[int]]] | TemplateError:
    try:
        text, spans = fn(*args)
    except TemplateError as exc:
        return exc
    return text, [list(s) for s in spans]


# Tests that read a value's type or presence, never its text: the markers cannot change their outcome.
_TYPE_TESTS = {"string", "defined", "undefined", "none", "mapping", "sequence", "iterable"}
# Filters over message lists that neither read nor transform any content.
_LIST_FILTERS = {"length", "count", "first", "last", "list", "reverse", "selectattr", "rejectattr"}
# Message fields other than content that a template may pass to filters (`message['role'] | upper`).
_OTHER_FIELDS = {"role", "name", "from", "type", "tool_call_id"}


@functools.lru_cache(maxsize=32)
def content_opaque(template: str) -> bool:
    """True when the template provably copies every message content verbatim into the output and never
    inspects it (only type tests and truthiness, and contents are never empty here). Conservative: anything
    it cannot prove -- filters or method calls on content or on whole messages, comparisons, assignments,
    custom tags -- is False."""
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        tree = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except Exception:  # e.g. transformers' {% generation %} tag: not provable here
        return False
    parents = {id(child): parent for parent in tree.find_all(nodes.Node) for child in parent.iter_child_nodes()}
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        if _key(node) == "content" and not _copied_or_tested(node, parents):
            return False
    bound = _message_names(tree)
    for call in tree.find_all((nodes.Filter, nodes.Call)):
        if getattr(call, "name", None) in _LIST_FILTERS:
            if any(isinstance(a, nodes.Const) and a.value == "content" for a in call.args):
                return False  # e.g. selectattr('content', 'equalto', ...) compares contents
            continue
        operands = ([call.node] if getattr(call, "node", None) is not None else []) + list(call.args) + [
            kw.value for kw in call.kwargs]
        for operand in operands:
            names = [operand] if isinstance(operand, nodes.Name) else list(operand.find_all(nodes.Name))
            if any(n.name in bound and not _field_access(n, operand, parents) for n in names):
                return False
    return True


def _key(node) -> Optional[str]:
    from jinja2 import nodes

    if isinstance(node, nodes.Getattr):
        return node.attr
    if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
        return node.arg.value
    return None


def _copied_or_tested(node, parents) -> bool:
    """The content flows only into the output (through string concatenation/conditionals) or into a test."""
    from jinja2 import nodes

    child, parent = node, parents.get(id(node))
    while parent is not None:
        if isinstance(parent, nodes.Output):
            return True
        if isinstance(parent, nodes.Test):
            return parent.name in _TYPE_TESTS
        if isinstance(parent, (nodes.If, nodes.CondExpr)) and getattr(parent, "test", None) is child:
            return True  # truthiness: contents are never empty, marked or not
        if not isinstance(parent, (nodes.Add, nodes.Concat, nodes.CondExpr, nodes.And, nodes.Or, nodes.Not)):
            return False
        child, parent = parent, parents.get(id(parent))
    return False


def _message_names(tree) -> set[str]:
    """`messages` and every variable bound (by for or set) to something derived from it."""
    from jinja2 import nodes

    bound, grew = {"messages"}, True
    while grew:
        grew = False
        for node in tree.find_all((nodes.For, nodes.Assign)):
            source = node.iter if isinstance(node, nodes.For) else node.node
            if any(n.name in bound for n in source.find_all(nodes.Name)) or (
                    isinstance(source, nodes.Name) and source.name in bound):
                targets = [node.target] if isinstance(node.target, nodes.Name) else list(node.target.find_all(nodes.Name))
                for t in targets:
                    if t.name not in bound:
                        bound.add(t.name)
                        grew = True
    return bound


def _field_access(name, operand, parents) -> bool:
    """The message variable is only used to read a known non-content field (`message['role']`)."""
    node = name
    while node is not operand:
        node = parents[id(node)]
        if _key(node) in _OTHER_FIELDS:
            return True
    return False


def _fast_render(tokenizer: PreTrainedTokenizerBase, conversations: list[Messages], check_first: bool = False
                 ) -> list[str]:
    """The compiled template called directly: apply_chat_template's per-row copies and checks cost about a third
    of a render, and do nothing for the plain {role, content} dicts formatting produces. Either every marked
    render is then checked against apply_chat_template's plain render (the verified path), or, with
    `check_first`, the first conversation is rendered both ways and any difference means the public call
    renders them all."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(tokenizer.get_chat_template())
    except Exception:  # a private helper: if it moves, the public call is only slower
        return tokenizer.apply_chat_template(conversations, tokenize=False)
    specials = dict(tokenizer.special_tokens_map)
    out = [compiled.render(messages=c, tools=None, documents=None, add_generation_prompt=False, **specials)
           for c in conversations]
    if check_first and out and out[0] != tokenizer.apply_chat_template(conversations[0], tokenize=False):
        return tokenizer.apply_chat_template(conversations, tokenize=False)
    return out


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
