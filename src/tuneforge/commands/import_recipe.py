"""`tuneforge import FILE.yaml [--from axolotl|llamafactory] [out=RECIPE.yaml]`: an Axolotl or LLaMA-Factory config
as a tuneforge recipe (config/importer.py), printed or written to `out=`. (`import` is a Python keyword: the command
table maps the command's name to this module.)"""

from __future__ import annotations

import sys
from pathlib import Path

from tuneforge.commands.base import Command, argparse_main, parser
from tuneforge.config import importer, peer_keys
from tuneforge.config.errors import ConfigError


def _run(ns, rest: list[str]) -> int:
    from tuneforge.config.schemas import TuneforgeConfig, schema_keys

    out = None
    for arg in rest:
        key, eq, value = arg.partition("=")
        if key != "out" or not eq or not value:
            raise ConfigError(f"{arg}: tuneforge import takes FILE, --from axolotl|llamafactory and out=RECIPE.yaml.")
        out = Path(value)
    if out is not None and out.exists():
        raise ConfigError(f"out={out}: the file exists; choose a new name (an import never overwrites a recipe).")
    imported = importer.convert(Path(ns.file), ns.tool, schema_keys(TuneforgeConfig))
    text = importer.recipe_text(imported, str(out) if out else "RECIPE.yaml")
    summary = (f"tuneforge import: {peer_keys.TOOLS[imported.tool]} config {ns.file}: {len(imported.values)} tuneforge "
               f"keys written, {len(imported.skipped)} source keys not imported (listed at the end, with why).")
    if out is None:
        sys.stdout.write(text)
        print(summary, file=sys.stderr)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"{summary}\nWrote {out}. Check it: tuneforge train recipe={out} dry_run=true")
    return 0


PARSER = parser("import", "An Axolotl or LLaMA-Factory config as a tuneforge recipe: every source key as the tuneforge "
                "key it maps to (with a comment naming it) or listed as not imported with why; source defaults that "
                "differ from tuneforge's stated. Printed, or written with out=RECIPE.yaml.")
PARSER.add_argument("file", help="the Axolotl or LLaMA-Factory YAML config")
PARSER.add_argument("--from", dest="tool", choices=list(peer_keys.TOOLS), help="the tool that wrote it (default: "
                    "detected from its keys)")
main = argparse_main("import", PARSER, _run, known_only=False)
COMMAND = Command("import", "an Axolotl or LLaMA-Factory config as a tuneforge recipe", main,
                  "tuneforge import FILE.yaml [--from axolotl|llamafactory] [out=RECIPE.yaml]")
