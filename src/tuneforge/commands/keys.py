"""`tuneforge keys [train|peft|quant] [--task TASK]`: every key of a library-derived section with its type,
default and origin, and the library keys tuneforge sets itself (with the key to use instead)."""

from __future__ import annotations

from tuneforge.commands.base import Command, argparse_main, parser
from tuneforge.config import library_keys
from tuneforge.config.tasks import TASKS


def _type_name(annotation) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    return text.replace("typing.", "").replace("NoneType", "None")


def rows(section: library_keys.Section, task: str) -> list[tuple[str, str, str, str, str]]:
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


def _run(ns, rest: list[str]) -> int:
    for name in ns.sections or list(library_keys.SECTIONS):
        section = library_keys.SECTIONS[name]
        print(f"# {name}.*  ({section.classes_for(ns.task)[0].partition(':')[2]} for task={ns.task}, plus tuneforge's keys)")
        for key, type_, default, origin, note in rows(section, ns.task):
            print(f"{key:<48} {type_:<28} {default:<24} {origin:<18} {note[:160]}")
        for key, replacement in {**section.owned, **section.renamed}.items():
            print(f"{name + '.' + key:<48} {'(not a key)':<28} {'':<24} {'':<18} use {replacement}")
        print()
    return 0


PARSER = parser("keys", "Every key of a library-derived section with its type, default and origin, and the library "
                "keys tuneforge sets itself (with the key to use instead).")
PARSER.add_argument("sections", nargs="*", choices=list(library_keys.SECTIONS), metavar="SECTION",
                    help=f"one or more of {', '.join(library_keys.SECTIONS)} (default: all)")
PARSER.add_argument("--task", default="sft", choices=list(TASKS), help="whose trainer config `train.*` is")
main = argparse_main("keys", PARSER, _run)
COMMAND = Command("keys", "every train.*/peft.*/quant.* key with its type, default and origin", main,
                  "tuneforge keys [train|peft|quant] [--task TASK]")
