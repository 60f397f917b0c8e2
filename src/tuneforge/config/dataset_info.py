"""LLaMA-Factory's data set registry: `DIR/dataset_info.json:NAME` -> where the rows are (a file beside the
registry, or a hub id) and how they are formatted (format.* and columns), for `tuneforge import` and for
`data.path=DIR/dataset_info.json:NAME`.

An entry (LLaMA-Factory's data/README): file_name | hf_hub_url, formatting alpaca (default) | sharegpt, ranking
(preference pairs), subset, split, columns (prompt, query, response, messages, chosen, rejected, kto_tag, ...) and
tags (ShareGPT role/content keys and role names).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from tuneforge.config.errors import ConfigError

FILE = "dataset_info.json"
# ShareGPT message keys and role names tuneforge's formats read (data/formats.py).
_MESSAGE_KEYS = ({"role_tag": "role", "content_tag": "content"}, {"role_tag": "from", "content_tag": "value"})
_ROLE_NAMES = {"user_tag": ("user", "human"), "assistant_tag": ("assistant", "gpt"), "system_tag": ("system",)}


def spec(registry: Path, name: str) -> str:
    return f"{registry}:{name}"


def parse(path: str) -> Optional[tuple[Path, str]]:
    """(registry file, entry name) when `path` is `.../dataset_info.json:NAME`, else None."""
    head, sep, name = str(path).rpartition(":")
    return (Path(head), name) if sep and head.endswith(FILE) and name else None


def entry(path: str, pretraining: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """({path, name?, split?}, {format keys}) for `.../dataset_info.json:NAME`; a problem is one line.
    `pretraining` (LLaMA-Factory's stage: pt): the entry's prompt column is raw text (format.strategy=text)."""
    registry, name = parse(path) or (None, None)
    if registry is None:
        raise ConfigError(f"{path}: not DIR/{FILE}:NAME.")
    if not registry.is_file():
        raise ConfigError(f"{registry}: no such file (LLaMA-Factory's dataset_dir holds {FILE}; relative paths start "
                          f"at {Path.cwd()}).")
    try:
        table = json.loads(registry.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{registry}: not valid JSON ({exc}).") from None
    if not isinstance(table, dict) or name not in table:
        names = ", ".join(sorted(table)) if isinstance(table, dict) else "(not a mapping)"
        raise ConfigError(f"{registry} has no data set {name!r} (it has: {names}).")
    info, where = table[name], f"{registry}:{name}"
    if info.get("file_name"):
        src: dict[str, Any] = {"path": str(registry.parent / info["file_name"])}
    elif info.get("hf_hub_url"):
        src = {"path": info["hf_hub_url"]}
    else:
        raise ConfigError(f"{where}: neither file_name nor hf_hub_url (tuneforge reads local files and the HF hub).")
    if info.get("subset"):
        src["name"] = info["subset"]
    if info.get("split", "train") != "train":
        src["split"] = info["split"]
    if pretraining:
        return src, {"strategy": "text", "text_column": (info.get("columns") or {}).get("prompt", "text")}
    return src, _format(info, where)


def _format(info: dict, where: str) -> dict[str, Any]:
    columns, formatting = info.get("columns") or {}, info.get("formatting", "alpaca")
    if "kto_tag" in columns:
        raise ConfigError(f"{where}: KTO rows (kto_tag) are single conversations; tuneforge's task=kto reads "
                          "prompt / completion / label columns (format.strategy=unpaired).")
    if formatting == "alpaca":
        if info.get("ranking"):
            return {"strategy": "preference", "prompt_column": columns.get("prompt", "instruction"),
                    "chosen_column": columns.get("chosen", "chosen"),
                    "rejected_column": columns.get("rejected", "rejected")}
        return {"strategy": "alpaca", "instruction_column": columns.get("prompt", "instruction"),
                "input_column": columns.get("query", "input"), "output_column": columns.get("response", "output")}
    if formatting != "sharegpt":
        raise ConfigError(f"{where}: formatting {formatting!r}: tuneforge reads alpaca and sharegpt.")
    tags = info.get("tags") or {}
    keys = {k: tags.get(k, d) for k, d in (("role_tag", "from"), ("content_tag", "value"))}
    if keys not in _MESSAGE_KEYS:
        raise ConfigError(f"{where}: message keys {keys}: tuneforge reads role/content or ShareGPT from/value.")
    for tag, names in _ROLE_NAMES.items():
        if tag in tags and tags[tag] not in names:
            raise ConfigError(f"{where}: {tag}={tags[tag]!r}: tuneforge reads the roles {', '.join(names)}.")
    messages = columns.get("messages", "conversations")
    if info.get("ranking"):
        # The conversation up to the last user turn is the prompt; chosen/rejected are one message each.
        return {"strategy": "preference", "prompt_column": messages, "chosen_column": columns.get("chosen", "chosen"),
                "rejected_column": columns.get("rejected", "rejected")}
    return {"strategy": "conversational", "messages_column": messages}
