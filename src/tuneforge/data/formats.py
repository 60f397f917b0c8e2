"""Formatting strategies: turn a raw row into chat messages (role/content).

Keeping conversations as messages until tokenization is what lets the masks know exactly where
every assistant turn starts and ends.
"""

from __future__ import annotations

from typing import Any, Callable

from tuneforge.config import ConfigError, FormatConfig

ROLES = {"system", "user", "assistant"}
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


class BadRow(ValueError):
    """A malformed row: counted, reported and dropped (or fatal with data.on_bad_row=error)."""


def _text(row: dict, column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise BadRow(f"{column} is {type(value).__name__}, not text")
    if not value.strip():
        raise BadRow(f"{column} is empty")
    return value


def instruction(row: dict, cfg: FormatConfig) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    messages.append({"role": "user", "content": _text(row, cfg.prompt_column)})
    messages.append({"role": "assistant", "content": _text(row, cfg.completion_column)})
    return messages


def conversational(row: dict, cfg: FormatConfig) -> list[dict[str, str]]:
    raw = row.get(cfg.messages_column)
    if not isinstance(raw, list) or not raw:
        raise BadRow(f"{cfg.messages_column} is not a list of messages")
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    for turn in raw:
        if not isinstance(turn, dict):
            raise BadRow("a message is not a mapping")
        role = turn.get("role", _SHAREGPT_ROLES.get(turn.get("from")))  # ShareGPT uses from/value
        content = turn.get("content", turn.get("value"))
        if role not in ROLES:
            raise BadRow(f"unknown role {turn.get('role', turn.get('from'))!r}")
        if not isinstance(content, str) or not content.strip():
            raise BadRow(f"empty or non-text {role} content")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no assistant turn")
    return messages


STRATEGIES: dict[str, Callable[[dict, FormatConfig], list[dict[str, str]]]] = {
    "instruction": instruction,
    "conversational": conversational,
}


def formatter(cfg: FormatConfig) -> Callable[[dict], list[dict[str, str]]]:
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"format.strategy={cfg.strategy} is not implemented yet; use {', '.join(STRATEGIES)}.")
    fn = STRATEGIES[cfg.strategy]
    return lambda row: fn(row, cfg)


def required_columns(cfg: FormatConfig) -> list[str]:
    return {
        "instruction": [cfg.prompt_column, cfg.completion_column],
        "conversational": [cfg.messages_column],
    }.get(cfg.strategy, [])


def split_for_generation(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Prompt messages (everything before the last assistant turn) and that turn as reference."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]
