"""`tuneforge COMMAND`: one module per command, each declaring its `COMMAND` (commands/base.Command: name, one-line
summary, usage, and main(args) -> exit code, over a Hydra config or argparse). `NAMES` is the command table:
cli.py dispatches through it and generates the usage from it.

May import every lower package (config, runs, models, data, eval, tasks); only cli.py imports it.
"""

from __future__ import annotations

import importlib

from tuneforge.commands.base import Command

# To add a command: its module here (declaring COMMAND), its name below, and for a Hydra command conf/NAME.yaml.
NAMES = ("train", "infer", "doctor", "merge", "export", "eval", "preview", "report", "keys", "reproduce", "recipes", "import")
# A command whose name cannot be its module's (`import` is a Python keyword): {command name: module name}.
MODULES = {"import": "import_recipe"}


def command(name: str) -> Command:
    """The command `name` (one of NAMES)."""
    return importlib.import_module(f"tuneforge.commands.{MODULES.get(name, name)}").COMMAND


def usage() -> str:
    """`tuneforge --help`, generated from the table."""
    lines = ["usage: tuneforge COMMAND [key=value ...] [hydra flags]", "", "commands:"]
    for name in NAMES:
        cmd = command(name)
        lines.append(f"  {name:<10} {cmd.summary}")
        if cmd.usage:
            lines.append(f"  {'':<10}   {cmd.usage}")
    lines += ["", "Hydra flags work as usual: -m/--multirun, --cfg job, hydra.run.dir=DIR, --help.",
              'A failure you can fix is one line and a documented exit code (README: "When something goes wrong");',
              "--debug (or HYDRA_FULL_ERROR=1) prints its full traceback too."]
    return "\n".join(lines) + "\n"
