"""The number a sweep optimizes and `tuneforge report` ranks by, read from a run's metrics."""

from __future__ import annotations

from typing import Optional


def objective(metrics: dict, metric: str) -> Optional[float]:
    """The number a sweep optimizes: a held-out score after training (`eval_after`: generation scores;
    `preference_after`: a preference task's preference_accuracy, logp_margin; `reward_after`: a reward model's
    pairwise_accuracy, mean_margin), else a top-level metric
    (`train_loss`, `last_logged_loss`, TRL's `eval_rewards/accuracies`), else the last value of it logged during
    training (`eval_loss`)."""
    for after in (metrics.get("eval_after") or {}, metrics.get("preference_after") or {},
                  metrics.get("reward_after") or {}):
        if metric in after:
            return after[metric]
    value = metrics.get(metric)
    if isinstance(value, (int, float)):
        return float(value)
    history = [h[metric] for h in metrics.get("log_history", []) if metric in h]
    return history[-1] if history else None
