"""`tuneforge recipes`: every recipe `recipe=NAME` selects, shipped and the user's ($TUNEFORGE_RECIPES,
`--config-dir DIR` whose DIR/recipe/ holds them), with its header line."""

from __future__ import annotations

from tuneforge.commands.base import Command, argparse_main, parser
from tuneforge.config import recipes


def _run(ns, rest: list[str]) -> int:
    if ns.config_dir:
        recipes.add_config_dir(ns.config_dir)
    found = recipes.available()
    width = max((len(n) for n in found), default=0)
    for name, (path, origin) in found.items():
        where = "" if origin == "shipped" else f"  [{path}]"
        print(f"{name:<{width}}  {origin:<7}  {recipes.header(path)}{where}")
    if not any(origin == "user" for _, origin in found.values()):
        print(f"\nYour own recipes: recipe=path/to/file.yaml, or a folder of them in ${recipes.RECIPES_ENV} "
              "(or --config-dir DIR with DIR/recipe/).")
    return 0


PARSER = parser("recipes", "Every recipe recipe=NAME selects (shipped and your own), with its header line.")
PARSER.add_argument("--config-dir", "-cd", help="a Hydra config dir whose recipe/ folder holds your recipes")
main = argparse_main("recipes", PARSER, _run)
COMMAND = Command("recipes", "the shipped and your own recipes, with their header lines", main,
                  f"tuneforge recipes   (yours: recipe=path/to/file.yaml, or a folder in ${recipes.RECIPES_ENV})")
