"""Where the loss mask goes: the trained character spans of chat turns, and the tokens after response templates.

Masks are built at preparation time (data/pipeline.py), before batching, so that they survive packing and
are counted before any trainer could silently drop a fully masked row; at batch time the collator only pads
or flattens. The pipeline renders chat rows in one pass (render.py) and labels every row in
`text_masks.build_labels`; this module holds what those two need:
- `assistant_spans`: an assistant turn's [start, end) character span, from its content through its
  end-of-turn token, found by rendering each conversation prefix. render.py falls back to it when its
  one-pass marker render cannot be trusted. Matching the rendered text (mapped to tokens through offsets
  later) means a template that tokenizes differently alone than after a newline cannot break masking
  (DESIGN rule 6); every assistant turn is trained and every user/system turn masked (rule 7); the
  end-of-turn token is trained, template text after it is not (rule 2).
- `assistant_mask_route` / `generation_spans`: for `collator=assistant_only` with a template that has
  `{% generation %}` markers, the template's own assistant mask (transformers' `return_assistant_tokens_mask`,
  what TRL's `assistant_only_loss` uses).
- `completion_labels`: text rows without spans, where `collator.response_template` (a string, found in the
  text and mapped through offsets, or token ids, found in the token ids) starts each response and
  `instruction_template` ends it (multi-turn). TRL removed the collator that did this
  (DataCollatorForCompletionOnlyLM), hence the code here.
"""

from __future__ import annotations

import bisect
import logging
import os
from typing import Any, Optional

from transformers import PreTrainedTokenizerBase
from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

IGNORE = -100

log = logging.getLogger(__name__)


class TemplateError(ValueError):
    """The chat template renders a conversation's prefix differently from the whole (not prefix-stable)."""


# ---------------------------------------------------------------------------------------------------
# Conversations (messages)
# ---------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------
# Formatted text without spans: response / instruction templates
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
            # The first token with a character after the point (the overlap rule of text_masks.span_labels).
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
