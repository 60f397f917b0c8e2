"""How many training rows each source contributes to a mix.

Weights are sampling probabilities: source i gives round(p_i * N) of its (already shuffled, seeded)
rows, without replacement. N is `data.max_samples` when set, else the largest total that no
source runs out of (datasets' "first exhausted" rule). Without weights every source contributes
in proportion to its size, so a plain single source is the same computation with one entry.
"""

from __future__ import annotations

import logging
from typing import Optional

log = logging.getLogger(__name__)


def mix_counts(available: list[int], weights: Optional[list[float]], total: Optional[int]) -> list[int]:
    """Rows to take from each source."""
    if not available or sum(available) == 0:
        return [0] * len(available)
    weighted = weights is not None
    if not weighted:
        weights = [float(n) for n in available]
        limit = sum(available)
    else:
        # The largest N for which every source still has round(p_i * N) rows.
        limit = int(min(n * sum(weights) / w for n, w in zip(available, weights)))
    n_total = min(total, limit) if total else limit
    if weighted and total and total > limit:
        log.warning("data.max_samples=%d exceeds what the mix can give at these weights without repeating rows; "
                    "using %d.", total, limit)
    probs = [w / sum(weights) for w in weights]
    return [min(n, round(p * n_total)) for n, p in zip(available, probs)]
