"""The `tuneforge` command: `tuneforge COMMAND [arguments]`, dispatched through the command table
(tuneforge/commands: one module per command). Parsing and dispatch only."""

from __future__ import annotations

import os
import sys
import traceback

from tuneforge.runs.console import silence_library_noise

# Before any config is read: on a cold schema cache (a new machine, new library versions) deriving the schemas
# imports PEFT, which imports bitsandbytes, whose import-time log line the filters must already catch.
silence_library_noise()


def main(argv: list[str] | None = None) -> int:
    from tuneforge import commands
    from tuneforge.config.errors import closest

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(commands.usage())
        return 0
    name, args = argv[0], argv[1:]
    if name not in commands.NAMES:
        print(f"tuneforge: unknown command '{name}'.{closest(name, commands.NAMES)}\n\n{commands.usage()}",
              file=sys.stderr)
        return 2
    if "--debug" in args:
        args = [a for a in args if a != "--debug"]
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's own switch: its job wrapper re-raises too
    try:
        return commands.command(name).main(args)
    except KeyboardInterrupt:  # Ctrl-C outside training (which saves a checkpoint and exits 130 itself)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            traceback.print_exc()
        print(f"tuneforge {name}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
