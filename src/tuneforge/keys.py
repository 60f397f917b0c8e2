"""`tuneforge keys [train|peft|quant] [--task TASK]`: every key of a library-derived section with its type,
default and origin, and the library keys tuneforge sets itself (with the key to use instead)."""

from __future__ import annotations

import sys

from tuneforge import schema

USAGE = "usage: tuneforge keys [train|peft|quant] [--task sft|classification|dpo|kto]"


def _type_name(annotation) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    return text.replace("typing.", "").replace("NoneType", "None")


def rows(section: schema.Section, task: str) -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, origin, note) for the keys of `section` that `task` uses."""
    target = section.classes_for(task)[0].partition(":")[2]
    out = []
    for name, key in section.keys().items():
        origin = key["origin"]
        if origin != ["tuneforge"] and target not in origin and name not in section.every_task:
            continue  # another task's trainer config
        note = (f"tuneforge default: {key['tuneforge_default']}" if key["tuneforge_default"]
                else f"applied by tuneforge: {section.applied[name]}" if name in section.applied
                else key["help"])
        if key["choices"]:
            note = f"one of {', '.join(map(str, key['choices']))}. {note}"
        default = "null (the library's default)" if key["unset_none"] and key["default"] in (None, {}) else repr(key["default"])
        out.append((f"{section.name}.{name}", _type_name(key["annotation"]), default,
                    "tuneforge" if origin == ["tuneforge"] else target, note))
    return out


def main(args: list[str]) -> int:
    task, names, i = "sft", [], 0
    while i < len(args):
        if args[i] == "--task" and i + 1 < len(args):
            task, i = args[i + 1], i + 1
        elif args[i].startswith("--task="):
            task = args[i].split("=", 1)[1]
        elif args[i] in ("-h", "--help"):
            print(USAGE)
            return 0
        else:
            names.append(args[i])
        i += 1
    unknown = [n for n in names if n not in schema.SECTIONS]
    if unknown or task not in schema.TRAIN.classes:
        print(f"tuneforge keys: unknown section or task {unknown or task}. {USAGE}", file=sys.stderr)
        return 2
    for name in names or list(schema.SECTIONS):
        section = schema.SECTIONS[name]
        print(f"# {name}.*  ({section.classes_for(task)[0].partition(':')[2]} for task={task}, plus tuneforge's keys)")
        for key, type_, default, origin, note in rows(section, task):
            print(f"{key:<48} {type_:<28} {default:<24} {origin:<18} {note[:160]}")
        for key, replacement in {**section.owned, **section.renamed}.items():
            print(f"{name + '.' + key:<48} {'(not a key)':<28} {'':<24} {'':<18} use {replacement}")
        print()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))

