"""Where the shipped Hydra configs and recipes live, and where caches go.

A regular install carries `conf/` and `recipes/` inside the package (`_conf`, `_recipes`, see
pyproject.toml); an editable install or a plain checkout reads them from the repository root.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

# The installed package (src/tuneforge in a checkout): this file is tuneforge/config/paths.py.
_PACKAGE_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = _PACKAGE_DIR.parent.parent

CACHE_ENV = "TUNEFORGE_CACHE"


def _first_existing(*candidates: Path) -> Path:
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        "tuneforge's shipped configs were not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "). Reinstall with `pip install tuneforge` or `pip install -e .` from a checkout."
    )


def conf_dir() -> Path:
    """The directory holding `config.yaml` and the config groups."""
    return _first_existing(_PACKAGE_DIR / "_conf", REPO_ROOT / "conf")


def recipes_dir() -> Path:
    """The directory holding `recipes/NAME.yaml`."""
    return _first_existing(_PACKAGE_DIR / "_recipes", REPO_ROOT / "recipes")


def cache_dir(override: str | None = None) -> Path:
    """tuneforge's cache root: the config key, else $TUNEFORGE_CACHE, else the user cache dir."""
    if override:
        return Path(override).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(platformdirs.user_cache_dir("tuneforge"))
