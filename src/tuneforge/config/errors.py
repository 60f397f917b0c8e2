"""The error a person can fix (`ConfigError`: it names the key, file or row and what to do) and the
"did you mean" helper every message uses."""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A config problem a person can fix: names the key and what to do."""


def closest(word: str, candidates) -> str:
    """' Did you mean X?' for the nearest candidate, or ''."""
    match = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""
