"""Formatting strategies: turn a raw row into EITHER chat messages OR plain text with trained spans.

Chat strategies (instruction, conversational, alpaca with a chat template) keep the conversation as
messages until rendering, which is what lets the masks find every assistant turn. Plain-text
strategies (text, template, classic alpaca) know where the completion lies by construction, so they
emit the text plus the [start, end) character spans to train (the completion and its EOS).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from tuneforge.config.errors import ConfigError
from tuneforge.config.formats import FORMATS, template_fields
from tuneforge.config.schemas import FormatConfig

ROLES = {"system", "user", "assistant"}
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}

# The Stanford Alpaca prompts (tatsu-lab/stanford_alpaca, train.py), for tokenizers without a chat template.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

# Common column names, to suggest the `data.columns` mapping that fixes a missing column.
_SYNONYMS = {
    "prompt": ["question", "instruction", "input", "query", "sentence", "source", "text", "content", "context"],
    "completion": ["answer", "output", "response", "target", "label", "summary", "translation", "reply"],
    "messages": ["conversations", "conversation", "dialog", "dialogue", "chat", "turns"],
    "text": ["content", "document", "sentence", "body", "story"],
    "instruction": ["prompt", "question", "query", "task"],
    "output": ["completion", "answer", "response", "target"],
}


class BadRow(ValueError):
    """A malformed row: counted, reported and dropped (or fatal with data.on_bad_row=error)."""


@dataclass(frozen=True)
class FormatContext:
    """What formatting needs from the tokenizer: its EOS text and whether it has a chat template."""

    eos_token: str
    has_chat_template: bool


Row = dict[str, Any]  # {"messages": [...]} or {"text": str, "spans": [[start, end], ...]}


def text_field(row: dict, column: str) -> str:
    """The row's non-empty text in `column`, else BadRow naming it."""
    value = row.get(column)
    if value is None:
        raise BadRow(f"{column} is null")
    if not isinstance(value, str):
        raise BadRow(f"{column} is {type(value).__name__}, not text")
    if not value.strip():
        raise BadRow(f"{column} is empty")
    return value


def _with_eos(text: str, spans: list[list[int]], ctx: FormatContext, cfg: FormatConfig, has_eos: bool = False) -> Row:
    """Append EOS (trained, as part of the last span) unless the text already ends with it (or has it)."""
    if cfg.append_eos and ctx.eos_token and not has_eos and not text.endswith(ctx.eos_token):
        text += ctx.eos_token
        if spans:
            spans[-1][1] = len(text)
    return {"text": text, "spans": spans}


def _system(cfg: FormatConfig) -> list[dict[str, str]]:
    """format.system_prompt as a turn. None: no system turn (a chat template's own default system prompt, if it has
    one, applies); "": an empty system turn, which suppresses such a default (SmolLM2's costs 16 tokens a row)."""
    return [] if cfg.system_prompt is None else [{"role": "system", "content": cfg.system_prompt}]


def with_system_prompt(prompt: Any, cfg: FormatConfig) -> Any:
    """An inference prompt (a string or messages) as training rendered its rows: a string becomes a user turn,
    and the run's format.system_prompt leads unless the messages bring their own system turn (DESIGN rule 5)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if messages and messages[0].get("role") == "system":
        return messages
    return _system(cfg) + messages


def instruction(row: dict, cfg: FormatConfig, ctx: FormatContext) -> Row:
    prompt, completion = row.get(cfg.prompt_column), row.get(cfg.completion_column)
    if isinstance(prompt, list):  # TRL's conversational prompt/completion: lists of messages
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        return conversational({"messages": list(prompt) + list(completion or [])},
                              FormatConfig(messages_column="messages", system_prompt=cfg.system_prompt), ctx)
    return {"messages": _system(cfg) + [
        {"role": "user", "content": text_field(row, cfg.prompt_column)},
        {"role": "assistant", "content": text_field(row, cfg.completion_column)},
    ]}


def conversational(row: dict, cfg: FormatConfig, ctx: FormatContext) -> Row:
    raw = row.get(cfg.messages_column)
    if not isinstance(raw, list) or not raw:
        raise BadRow(f"{cfg.messages_column} is not a list of messages")
    messages = []
    for turn in raw:
        if not isinstance(turn, dict):
            raise BadRow("a message is not a mapping")
        # ShareGPT uses from/value; Arrow gives every struct field, so absent keys read as None.
        role = turn.get("role") or _SHAREGPT_ROLES.get(turn.get("from"))
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        if role not in ROLES:
            raise BadRow(f"unknown role {turn.get('role') or turn.get('from')!r}")
        if not isinstance(content, str) or not content.strip():
            raise BadRow(f"empty or non-text {role} content")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no assistant turn")
    if messages[0]["role"] != "system":
        messages = _system(cfg) + messages
    return {"messages": messages}


def alpaca(row: dict, cfg: FormatConfig, ctx: FormatContext) -> Row:
    instr, output = text_field(row, cfg.instruction_column), text_field(row, cfg.output_column)
    extra = row.get(cfg.input_column)
    if extra is not None and not isinstance(extra, str):
        raise BadRow(f"{cfg.input_column} is {type(extra).__name__}, not text")
    extra = (extra or "").strip()
    if _alpaca_chat(cfg, ctx):
        user = f"{instr}\n\n{extra}" if extra else instr
        return {"messages": _system(cfg) + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}
    prompt = (ALPACA_PROMPT.format(instruction=instr, input=extra) if extra
              else ALPACA_PROMPT_NO_INPUT.format(instruction=instr))
    return _with_eos(prompt + output, [[len(prompt), len(prompt) + len(output)]], ctx, cfg)


def _alpaca_chat(cfg: FormatConfig, ctx: FormatContext) -> bool:
    return cfg.alpaca_style == "chat" or (cfg.alpaca_style == "auto" and ctx.has_chat_template)


def renders_chat(cfg: FormatConfig, ctx: FormatContext) -> bool:
    """Whether the strategy emits messages (rendered by the chat template) rather than plain text."""
    return cfg.strategy in ("instruction", "conversational") or (cfg.strategy == "alpaca" and _alpaca_chat(cfg, ctx))


def text(row: dict, cfg: FormatConfig, ctx: FormatContext) -> Row:
    """Bring-your-own formatted text. With format.response_template, what follows its first occurrence is
    trained; without, spans stay empty and the collator's response_template locates the completion."""
    value = text_field(row, cfg.text_column)
    if not cfg.response_template:
        return _with_eos(value, [], ctx, cfg)
    at = value.find(cfg.response_template)
    if at < 0:
        raise BadRow("response_template not found in the text")
    start = at + len(cfg.response_template)
    return _with_eos(value, [[start, len(value)]], ctx, cfg)


def template(row: dict, cfg: FormatConfig, ctx: FormatContext) -> Row:
    """A str.format template over the row's columns. The completion span is known by construction: everything
    rendered after `response_template` (the validated split point), through the EOS."""
    values = {}
    for name in template_fields(cfg.template):
        value = row.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        values[name] = text_field({name: value}, name)
    cut = cfg.template.index(cfg.response_template) + len(cfg.response_template)
    try:
        prompt = cfg.template[:cut].format(eos_token=ctx.eos_token, **values)
        answer = cfg.template[cut:].format(eos_token=ctx.eos_token, **values)
    except (ValueError, IndexError) as exc:
        raise ConfigError(f"format.template={cfg.template!r} is not a valid format string: {exc}") from exc
    has_eos = "{eos_token}" in cfg.template or bool(ctx.eos_token and ctx.eos_token in cfg.template)
    return _with_eos(prompt + answer, [[len(prompt), len(prompt) + len(answer)]], ctx, cfg, has_eos)


def formatter(cfg: FormatConfig, ctx: FormatContext) -> Callable[[dict], Row]:
    """row -> Row for format.strategy (its function in config/formats.FORMATS)."""
    module, _, name = FORMATS[cfg.strategy].function.partition(":")
    fn = getattr(importlib.import_module(module), name)
    return lambda row: fn(row, cfg, ctx)


def required_roles(cfg: FormatConfig) -> list[tuple[str, str]]:
    """(role, configured column) pairs the strategy needs; a role is the column's default name."""
    return FORMATS[cfg.strategy].roles(cfg)


def required_columns(cfg: FormatConfig) -> list[str]:
    return [column for _, column in required_roles(cfg)]


def used_columns(cfg: FormatConfig) -> list[str]:
    """Every column the strategy reads (required + optional): the rest are dropped before formatting."""
    return required_columns(cfg) + FORMATS[cfg.strategy].optional(cfg)


def keeps_columns(cfg: FormatConfig) -> bool:
    """Every column of the row reaches the task (format.strategy=prompt: the reward functions read them)."""
    return FORMATS[cfg.strategy].keeps_columns


def check_columns(cfg: FormatConfig, have: list[str], where: str, renames: Optional[dict[str, str]] = None) -> None:
    """Fail before formatting when the strategy's columns are missing, naming the mapping that would fix it."""
    missing = {column: role for role, column in required_roles(cfg) if column not in have}
    if not missing:
        return
    hint = suggest_mapping(missing, have)
    missing = list(missing)
    fix = (" Map them with data.columns, e.g. " + ", ".join(f"+data.columns.{src}={dst}" for dst, src in hint.items())
           + " (or point format.*_column at the existing columns)." if hint
           else " Rename columns with data.columns.OLD=NEW, or point format.*_column at existing columns.")
    renamed = f" (after data.columns={renames})" if renames else ""
    raise ConfigError(
        f"format.strategy={cfg.strategy} needs column(s) {missing}, but {where} has {have}{renamed}.{fix}"
    )


def suggest_mapping(missing: dict[str, str], have: list[str]) -> dict[str, str]:
    """{needed column: existing column} for {needed column: its role}: a column named after the role
    (e.g. `prompt` for `format.prompt_column=question`), then common names, then spelling."""
    free = [h for h in have if h not in missing]
    out = {}
    for need, role in missing.items():
        pool = [h for h in free if h not in out.values()]
        names = [role, *_SYNONYMS.get(role, []), *_SYNONYMS.get(need, [])]
        by_name = sorted((h for h in pool if h.lower() in names), key=lambda h: names.index(h.lower()))
        close = by_name or difflib.get_close_matches(need, pool, n=1, cutoff=0.4)
        if close:
            out[need] = close[0]
    return out


def split_for_generation(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Prompt messages (everything before the last assistant turn) and that turn as reference."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]
