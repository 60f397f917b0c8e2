"""`tuneforge import`: an Axolotl or LLaMA-Factory config file -> a tuneforge recipe (YAML text).

Every source key becomes the tuneforge key the alias table (config/peer_keys.py) maps it to, with a comment naming
the source key, or is listed as not imported with its reason. Where the source tool's default differs from
tuneforge's (DEFAULTS below), the recipe states the source's value, so it trains what the source trained. Data
sets are translated into data.* and format.* (several: data.mix); LLaMA-Factory's dataset_info.json is read here
(config/dataset_info.py). Nothing here loads a library: it is config work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from tuneforge.config import dataset_info, peer_keys
from tuneforge.config.errors import ConfigError, closest
from tuneforge.config.schemas import SHARDED_LAUNCHERS

# Keys found only in one tool's files: enough of them tells which tool wrote a file.
_SIGNATURE = {"axolotl": {"base_model", "datasets", "sequence_len", "micro_batch_size", "adapter", "num_epochs",
                          "sample_packing", "val_set_size", "rl", "lora_target_linear"},
              "llamafactory": {"model_name_or_path", "stage", "finetuning_type", "dataset", "template", "cutoff_len",
                               "lora_target", "quantization_bit", "do_train", "lora_rank"}}
# tuneforge's own top-level sections: a file made of them is a tuneforge recipe already.
_TUNEFORGE_SECTIONS = {"model", "tokenizer", "data", "format", "collator", "packing", "quant", "peft", "train",
                       "eval", "launcher", "task", "defaults"}


@dataclass(frozen=True)
class SourceDefault:
    """A source tool's default that differs from tuneforge's: stated in the recipe unless the file sets the key."""

    key: str
    value: Any
    why: str
    # Only when the recipe trains an adapter (LoRA keys of a full fine-tune mean nothing).
    lora_only: bool = False


DEFAULTS: dict[str, list[SourceDefault]] = {
    "axolotl": [
        SourceDefault("data.eval_fraction", 0.0, "val_set_size defaults to 0 (no held-out split); tuneforge holds "
                      "out 10%"),
        SourceDefault("packing.mode", "none", "sample_packing defaults to false; tuneforge packs on CUDA (packing=auto)"),
        SourceDefault("train.use_liger_kernel", False, "Liger only with its plugin; tuneforge turns it on where CUDA "
                      "and liger-kernel are"),
        SourceDefault("quant.load_in_4bit", False, "no quantization unless adapter: qlora or load_in_4bit; tuneforge "
                      "loads 4-bit by default"),
        SourceDefault("peft.method", "none", "no adapter key is a full fine-tune; tuneforge trains LoRA by default"),
        SourceDefault("train.max_length", 2048, "sequence_len defaults to 2048; tuneforge's train.max_length to 512"),
        SourceDefault("train.save_total_limit", None, "every checkpoint is kept; tuneforge keeps the newest two"),
        SourceDefault("train.gradient_checkpointing", False, "gradient_checkpointing defaults to false; tuneforge "
                      "checkpoints"),
        SourceDefault("peft.lora_dropout", 0.0, "lora_dropout defaults to 0; tuneforge's to 0.05", lora_only=True),
        SourceDefault("data.on_long_row", "drop", "rows longer than sequence_len are dropped; tuneforge truncates them"),
    ],
    "llamafactory": [
        SourceDefault("data.eval_fraction", 0.0, "val_size defaults to 0 (no held-out split); tuneforge holds out 10%"),
        SourceDefault("packing.mode", "none", "packing is off for sft; tuneforge packs on CUDA (packing=auto)"),
        SourceDefault("train.use_liger_kernel", False, "enable_liger_kernel defaults to false; tuneforge turns Liger on "
                      "where CUDA and liger-kernel are"),
        SourceDefault("quant.load_in_4bit", False, "quantization_bit unset: no quantization; tuneforge loads 4-bit by "
                      "default"),
        SourceDefault("train.max_length", 2048, "cutoff_len defaults to 2048; tuneforge's train.max_length to 512"),
        SourceDefault("train.save_total_limit", None, "every checkpoint is kept; tuneforge keeps the newest two"),
        SourceDefault("train.learning_rate", 5e-5, "transformers' default learning rate; tuneforge's is 2e-4"),
        SourceDefault("train.num_train_epochs", 3.0, "transformers' default of 3 epochs; tuneforge's is 1"),
        SourceDefault("peft.r", 8, "lora_rank defaults to 8; tuneforge's peft.r to 16", lora_only=True),
        SourceDefault("peft.lora_dropout", 0.0, "lora_dropout defaults to 0; tuneforge's to 0.05", lora_only=True),
    ],
}


@dataclass
class Imported:
    """What an import produced: tuneforge keys with the comment naming their source, and what was left out."""

    tool: str
    source: Path
    values: dict[str, Any] = field(default_factory=dict)
    comments: dict[str, str] = field(default_factory=dict)
    # (source key, reason) for every key not imported.
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def set(self, key: str, value: Any, comment: str) -> None:
        self.values[key] = value
        self.comments[key] = comment if key not in self.comments else f"{self.comments[key]}; {comment}"


def read(path: Path) -> dict:
    """The source file as a mapping, or one line saying why it is not one."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not data:
        kind = "empty" if not data else f"a {type(data).__name__}, not a mapping of config keys"
        raise ConfigError(f"{path}: {kind}; an Axolotl or LLaMA-Factory config is a YAML mapping of keys.")
    return data


def detect(path: Path, data: dict, tool: Optional[str]) -> str:
    """The tool that wrote the file (`tool`: --from), or one line when it is another tool's (or tuneforge's)."""
    keys = set(map(str, data))
    if keys <= _TUNEFORGE_SECTIONS or (keys & _TUNEFORGE_SECTIONS - {"task"} and not keys & set().union(*_SIGNATURE.values())):
        raise ConfigError(f"{path} is a tuneforge recipe already (its keys are tuneforge sections): use it as "
                          f"recipe={path}.")
    scores = {t: len(keys & sig) for t, sig in _SIGNATURE.items()}
    best = max(scores, key=scores.get)
    if tool is None:
        if not scores[best] or sorted(scores.values())[-1] == sorted(scores.values())[-2]:
            raise ConfigError(f"{path}: not an Axolotl or LLaMA-Factory config (none of their telltale keys such as "
                              "base_model or model_name_or_path); --from axolotl|llamafactory if it is one.")
        return best
    if scores[tool] == 0 and scores[best] > 0:
        raise ConfigError(f"{path} is {_a(peer_keys.TOOLS[best])} config, not {_a(peer_keys.TOOLS[tool])} one (keys: "
                          f"{', '.join(sorted(keys & _SIGNATURE[best]))}); --from {best}.")
    return tool


def _a(name: str) -> str:
    return ("an " if name[0] in "AEIOU" else "a ") + name


def convert(path: Path, tool: Optional[str] = None, valid: Optional[list[str]] = None) -> Imported:
    """The source file as tuneforge keys; `valid`: tuneforge's dotted keys (for keys named as the libraries
    name them, e.g. learning_rate -> train.learning_rate)."""
    data = read(path)
    tool = detect(path, data, tool)
    table, name = peer_keys.TABLES[tool], peer_keys.TOOLS[tool]
    out = Imported(tool=tool, source=path)
    valid = valid or []
    for key, value in data.items():
        key = str(key)
        if key in ("datasets", "dataset", "dataset_dir"):
            continue  # below, together
        alias = table.get(key)
        if alias is None:
            target = peer_keys.same_name(key, valid)
            if target is None:
                raise ConfigError(f"{path}: {key}: not {_a(name)} key tuneforge knows (config/peer_keys.py lists them)."
                                  f"{closest(key, list(table))} Remove it, or put the tuneforge key in the recipe "
                                  "yourself (tuneforge keys).")
            out.set(target, value, key)
            continue
        if alias.skip:
            out.skipped.append((key, f"{alias.skip}: {alias.note}"))
            continue
        try:
            converted = alias.values(value)
        except (ValueError, TypeError, KeyError) as exc:
            out.skipped.append((key, _not_imported(exc)))
            continue
        out.skipped += [(f"{key}.{sub}", why) for sub, why in converted.pop(peer_keys.SKIPPED, [])]
        same = converted == {alias.target: value}
        for k, v in converted.items():
            out.set(k, v, (key if same else f"{key}: {_scalar(value)}") + (f" ({alias.note})" if alias.note else ""))
    if tool == "axolotl" and "datasets" in data:
        _axolotl_datasets(data["datasets"], out, path)
    if tool == "llamafactory" and "dataset" in data:
        _llamafactory_datasets(data, out, path)
    _source_defaults(out, name)
    return out


def _not_imported(exc: BaseException) -> str:
    """The reason a value is not imported: a task tuneforge refuses (or lacks) by name, else no equivalent."""
    task = isinstance(exc, peer_keys.TaskRefused)
    return f"{peer_keys.REFUSED_BY_DESIGN if task else peer_keys.NO_EQUIVALENT}: {exc}"


def _source_defaults(out: Imported, name: str) -> None:
    lora = out.values.get("peft.method", "lora") == "lora"
    for d in DEFAULTS[out.tool]:
        if d.key in out.values or (d.lora_only and not lora):
            continue
        if d.key == "quant.load_in_4bit" and out.values.get("quant.load_in_8bit"):
            continue
        out.set(d.key, d.value, f"{name}'s default: {d.why}")
    if "launcher.name" in out.values and "launcher.num_processes" not in out.values:
        out.set("launcher.num_processes", 2, f"{name} starts one process per visible GPU: set your GPU count")
    sharded = out.values.get("launcher.name") in SHARDED_LAUNCHERS
    if sharded and out.values.get("quant.load_in_4bit") and "quant.bnb_4bit_quant_storage" not in out.values:
        # What the source's sharded QLoRA needs too: FSDP/ZeRO-3 shard a 4-bit base stored in the compute dtype.
        out.set("quant.bnb_4bit_quant_storage", "bfloat16", "a sharded 4-bit base is stored in the compute dtype")
    if out.tool == "llamafactory" and lora and "peft.lora_alpha" not in out.values:
        # LLaMA-Factory's lora_alpha defaults to twice the rank; tuneforge's is a fixed 32.
        out.set("peft.lora_alpha", 2 * int(out.values["peft.r"]), f"{name}'s default: lora_alpha = 2 x lora_rank")


# --- data sets ---------------------------------------------------------------------------------------------------

# A data set's format that decides the collator too (raw text trains every token): popped by _write_sources.
_COLLATOR = "collator"


# Axolotl dataset types (prompt strategies) -> tuneforge format settings (the entry's field_* keys name columns).
def _axolotl_format(entry: dict) -> dict[str, Any]:
    kind = entry.get("type", "alpaca")
    kind = kind.get("name", "custom") if isinstance(kind, dict) else str(kind)
    if kind == "alpaca":
        return {"strategy": "alpaca"}
    if kind in ("chat_template", "sharegpt"):
        fmt = {"strategy": "conversational",
               "messages_column": entry.get("field_messages", "conversations" if kind == "sharegpt" else "messages")}
        mapping = entry.get("message_property_mappings") or {
            k: v for k, v in (("role", entry.get("message_field_role")), ("content", entry.get("message_field_content")))
            if v}
        if mapping and mapping not in ({"role": "role", "content": "content"}, {"role": "from", "content": "value"}):
            raise ValueError(f"message fields {mapping}: tuneforge reads role/content or ShareGPT from/value")
        return fmt
    if kind == "completion":  # raw text, every token trained
        return {"strategy": "text", "text_column": entry.get("field", "text"), _COLLATOR: "lm"}
    if kind in ("chatml.intel", "llama3.intel"):
        return {"strategy": "preference", "prompt_column": "question"}
    if kind in ("chatml.argilla", "llama3.argilla"):
        return {"strategy": "preference", "prompt_column": "instruction", "chosen_column": "chosen_response",
                "rejected_column": "rejected_response"}
    if kind in ("chatml.ultra", "llama3.ultra", "chatml.prompt_pairs", "llama3.prompt_pairs"):
        return {"strategy": "preference", "prompt_column": "prompt"}
    # Reward-model pairs (reward_model: true) in chat-template form: the same columns as the DPO type.
    if kind == "chat_template.default" or kind.startswith(("chat_template.", "bradley_terry.chat_template")):
        fmt = {"strategy": "preference", "chosen_column": entry.get("field_chosen", "chosen"),
               "rejected_column": entry.get("field_rejected", "rejected")}
        fmt["prompt_column"] = entry.get("field_messages", "messages")
        return fmt
    raise ValueError(f"dataset type {kind!r} has no tuneforge format; set format.strategy and data.columns yourself")


def _source(path_value: str, entry: dict, base: Path) -> dict[str, Any]:
    src: dict[str, Any] = {"path": path_value}
    if entry.get("name"):
        src["name"] = entry["name"]
    split = entry.get("split")
    if split and split != "train":
        src["split"] = split
    if entry.get("revision"):
        src["revision"] = entry["revision"]
    return src


def _axolotl_datasets(datasets: Any, out: Imported, path: Path) -> None:
    if not isinstance(datasets, list) or not all(isinstance(d, dict) and d.get("path") for d in datasets):
        raise ConfigError(f"{path}: datasets: a list of data sets with a path each (Axolotl's form).")
    sources = []
    for i, entry in enumerate(datasets):
        where = f"datasets[{i}]"
        data_path = entry.get("data_files") if entry.get("ds_type") and entry.get("data_files") else entry["path"]
        if isinstance(data_path, list):
            data_path = data_path[0] if len(data_path) == 1 else None
        if data_path is None:
            out.skipped.append((where, f"{peer_keys.NO_EQUIVALENT}: several data_files in one data set; give "
                                       "each its own data.mix source"))
            continue
        try:
            fmt = _axolotl_format(entry)
        except ValueError as exc:
            out.skipped.append((f"{where}.type", f"{peer_keys.NO_EQUIVALENT}: {exc}"))
            fmt = None
        for key in ("roles_to_train", "train_on_eos"):
            if key in entry:
                out.skipped.append((f"{where}.{key}", f"{peer_keys.ALWAYS}: every assistant turn and its end-of-turn "
                                                      "token are trained"))
        sources.append((_source(str(data_path), entry, path.parent), fmt, where))
    _write_sources(sources, out)


def _llamafactory_datasets(data: dict, out: Imported, path: Path) -> None:
    names = [n.strip() for n in str(data["dataset"]).split(",") if n.strip()]
    # Relative to the working directory, as LLaMA-Factory reads it (and as tuneforge reads data.path).
    folder = Path(str(data.get("dataset_dir", "data")))
    sources = []
    for name in names:
        spec = dataset_info.spec(folder / dataset_info.FILE, name)
        src, fmt = dataset_info.entry(spec, pretraining=data.get("stage") == "pt")
        sources.append((src, fmt, f"dataset: {name} ({spec})"))
    _write_sources(sources, out)


def _write_sources(sources: list[tuple[dict, Optional[dict], str]], out: Imported) -> None:
    for _, fmt, where in sources:
        if fmt and _COLLATOR in fmt:
            out.set("collator.name", fmt.pop(_COLLATOR), f"{where}: raw text, every token trained")
    if len(sources) == 1:
        src, fmt, where = sources[0]
        for k, v in src.items():
            out.set(f"data.{k}", v, where)
        for k, v in (fmt or {}).items():
            out.set(f"format.{k}", v, where)
        return
    mix = []
    for src, fmt, where in sources:
        mix.append({**src, **({"format": fmt} if fmt else {})})
    out.set("data.mix", mix, "; ".join(w for _, _, w in sources))


# --- the recipe text ---------------------------------------------------------------------------------------------

def recipe_text(imp: Imported, out_name: str = "RECIPE.yaml") -> str:
    """The recipe: a header (what, from where, the command), then every key with a comment naming its source, then
    what was not imported and why."""
    name = peer_keys.TOOLS[imp.tool]
    lines = ["# @package _global_",
             f"# Imported from the {name} config {imp.source.name} by tuneforge import.",
             f"#   tuneforge train recipe={out_name}",
             "# Each key's comment names the source key it comes from; a source default that differs from "
             "tuneforge's is stated."]
    tree: dict[str, Any] = {}
    for key, value in imp.values.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = (key, value)
    lines += _emit(tree, imp, 0)
    if imp.skipped:
        lines += ["", "# Not imported:"] + [f"#   {key}: {why}" for key, why in imp.skipped]
    return "\n".join(lines) + "\n"


def _emit(tree: dict, imp: Imported, depth: int) -> list[str]:
    lines, pad = [], "  " * depth
    for leaf, node in tree.items():
        if isinstance(node, dict):
            lines.append(f"{pad}{leaf}:")
            lines += _emit(node, imp, depth + 1)
            continue
        key, value = node
        comment = f"  # {imp.comments[key]}"
        if isinstance(value, list) and value and isinstance(value[0], dict):  # data.mix
            lines.append(f"{pad}{leaf}:{comment}")
            body = yaml.safe_dump(value, sort_keys=False, default_flow_style=False).rstrip().splitlines()
            lines += [f"{pad}  {b}" for b in body]
        else:
            lines.append(f"{pad}{leaf}: {_scalar(value)}{comment}")
    return lines


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("\n...").removesuffix("...").strip()
