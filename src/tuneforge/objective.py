"""The number a sweep optimizes and `tuneforge report` ranks by, read from a run's metrics."""

from __future__ import annotations

from typing import Optional

def objective(metrics: dict, metric: str) -> Optional[float]:
    """The number a sweep optimizes: a held-out generation score (`eval_after`), else a top-level metric
    (`train_loss`, `last_logged_loss`), else the last `eval_loss` logged during training."""
    after = metrics.get("eval_after") or {}
    if metric in after:
        return after[metric]
    value = metrics.get(metric)
    if isinstance(value, (int, float)):
        return float(value)
    history = [h[metric] for h in metrics.get("log_history", []) if metric in h]
    return history[-1] if history else None
