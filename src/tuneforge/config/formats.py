"""The row formats (`format.strategy`): one record each, read by validation (legal names, plain text or chat, the
strategy's own rules), by the data stage (the function that formats a row, the columns it reads) and by the tasks
(which formats their rows come in: config/tasks.py).

A strategy turns a raw row into EITHER chat messages (rendered by the chat template, which is what lets the masks
find every assistant turn) OR plain text with the character spans to train.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Callable

from tuneforge.config.errors import ConfigError

Roles = Callable[[Any], list[tuple[str, str]]]


@dataclass(frozen=True)
class Format:
    name: str
    # row -> {"messages": [...]} or {"text": str, "spans": [[start, end], ...]}: module:function with the signature
    # (row, FormatConfig, FormatContext); "" for rows a task's own data stage reads (data/preference.py).
    function: str
    # (role, configured column) pairs the strategy needs; a role is the column's default name.
    roles: Roles
    # Columns it reads when present.
    optional: Callable[[Any], list[str]] = lambda fmt: []
    # Plain text (no chat-template assistant turns): assistant-only masking cannot apply.
    text: bool = False
    # Rules of its own keys, checked with the rest of the config (fmt, its dotted key prefix).
    check: Callable[[Any, str], None] = lambda fmt, key: None
    # Every column of the row reaches the task (online RL: the reward functions read them), not only its own.
    keeps_columns: bool = False


def template_fields(template: str) -> list[str]:
    """The column names a str.format template uses, in order."""
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    return list(dict.fromkeys(n.split(".")[0].split("[")[0] for n in names if n != "eos_token"))


def _check_template(fmt, key: str) -> None:
    if not fmt.template:
        raise ConfigError(f"{key}.strategy=template needs {key}.template, e.g. '### Question: {{prompt}}\\n### Answer: "
                          "{completion}'.")
    if not fmt.response_template:
        raise ConfigError(f"{key}.strategy=template needs {key}.response_template (the text that starts the answer) "
                          "so that the prompt can be masked.")
    if fmt.response_template not in fmt.template:
        raise ConfigError(f"{key}.response_template={fmt.response_template!r} does not occur in {key}.template="
                          f"{fmt.template!r}; it must be the literal text just before the completion.")


_DATA = "tuneforge.data.formats"

# To add a format: its function in data/formats.py, a record here, and conf/format/NAME.yaml.
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("instruction", f"{_DATA}:instruction",
           lambda f: [("prompt", f.prompt_column), ("completion", f.completion_column)]),
    Format("conversational", f"{_DATA}:conversational", lambda f: [("messages", f.messages_column)]),
    Format("alpaca", f"{_DATA}:alpaca", lambda f: [("instruction", f.instruction_column), ("output", f.output_column)],
           optional=lambda f: [f.input_column]),
    Format("text", f"{_DATA}:text", lambda f: [("text", f.text_column)], text=True),
    Format("template", f"{_DATA}:template", lambda f: [(c, c) for c in template_fields(f.template or "")], text=True,
           check=_check_template),
    # The prompt is optional: without it, chosen and rejected conversations share it (their common prefix).
    Format("preference", "", lambda f: [("chosen", f.chosen_column), ("rejected", f.rejected_column)],
           optional=lambda f: [f.prompt_column]),
    Format("unpaired", "", lambda f: [("prompt", f.prompt_column), ("completion", f.completion_column),
                                      ("label", f.label_column)]),
    # Prompts only (online RL): a prompt column, or messages without a final assistant turn (data/prompts.py
    # checks which each row has); the other columns go to the reward functions.
    Format("prompt", "", lambda f: [], optional=lambda f: [f.prompt_column, f.messages_column], keeps_columns=True),
)}

# Format strategies that produce plain text (no chat-template assistant turns).
TEXT_STRATEGIES = tuple(name for name, f in FORMATS.items() if f.text)
