"""Where recipes come from: the shipped `recipes/` folder, the user's recipe folders ($TUNEFORGE_RECIPES, or
`--config-dir DIR` whose DIR/recipe/ holds them) and recipe files given by path (`recipe=path/to/file.yaml`,
relative to the working directory).

Hydra selects a recipe by name from its ConfigStore (`recipe=NAME`); a recipe given by path is stored there under
a name made from its absolute path, and the override rewritten to it, so a file anywhere composes exactly like a
shipped recipe. A run records the composed config, so it reproduces from its run directory alone (the recipe
file is not needed again).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tuneforge.config.errors import ConfigError
from tuneforge.config.paths import recipes_dir

# os.pathsep-separated folders of user recipes (a user recipe shadows a shipped one of the same name).
RECIPES_ENV = "TUNEFORGE_RECIPES"
_SUFFIXES = (".yaml", ".yml")
# Folders given with Hydra's --config-dir in this process (their recipe/ subfolder holds recipes).
_config_dirs: list[Path] = []


def add_config_dir(path: str) -> None:
    """`--config-dir DIR`: DIR/recipe/*.yaml become recipes too (Hydra reads DIR's other groups itself)."""
    p = Path(path).expanduser().resolve()
    if p not in _config_dirs:
        _config_dirs.append(p)


def use_flags(flags: list[str]) -> None:
    """Note the `--config-dir DIR` (`-cd DIR`, `--config-dir=DIR`) among a command's Hydra flags."""
    for i, flag in enumerate(flags):
        if flag in ("--config-dir", "-cd") and i + 1 < len(flags):
            add_config_dir(flags[i + 1])
        elif flag.startswith("--config-dir="):
            add_config_dir(flag.partition("=")[2])


def user_dirs() -> list[Path]:
    """The user's recipe folders, in the order they win (first wins)."""
    env = [Path(p).expanduser() for p in os.environ.get(RECIPES_ENV, "").split(os.pathsep) if p]
    return [d / "recipe" for d in _config_dirs] + env


def available() -> dict[str, tuple[Path, str]]:
    """{name: (file, "shipped" | "user")}: a user recipe shadows a shipped one of the same name."""
    out: dict[str, tuple[Path, str]] = {}
    for folder in reversed(user_dirs()):
        if folder.is_dir():
            for path in sorted(p for s in _SUFFIXES for p in folder.glob(f"*{s}")):
                out[path.stem] = (path, "user")
    for path in sorted(recipes_dir().glob("*.yaml")):
        out.setdefault(path.stem, (path, "shipped"))
    return dict(sorted(out.items()))


def header(path: Path) -> str:
    """A recipe's header line: its first comment line after `# @package` ('' when it has none)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text.startswith("#"):
            if text:
                break
            continue
        text = text.lstrip("#").strip()
        if text and not text.startswith("@package"):
            return text
    return ""


def is_path(value: object) -> bool:
    """`recipe=VALUE` names a file (a YAML suffix or a folder in it), not a recipe by name."""
    return isinstance(value, str) and (value.endswith(_SUFFIXES) or "/" in value or os.sep in value)


def load(path: Path) -> DictConfig:
    """A recipe file as a config node, or one line saying why it cannot be one."""
    if not path.is_file():
        raise ConfigError(f"recipe={path}: no such file (a relative path is read from the working directory "
                          f"{Path.cwd()}).")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors: first line only, the file named
        raise ConfigError(f"recipe={path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"recipe={path}: a recipe is a YAML mapping of config keys (this file holds a "
                          f"{type(OmegaConf.to_container(node)).__name__}).")
    return node


def store_name(path: Path) -> str:
    """The ConfigStore name of a recipe given by path: its stem and a digest of its absolute path (two files
    with one stem stay apart), in characters Hydra's override grammar takes unquoted."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem)
    return f"file-{stem}-{digest}"
