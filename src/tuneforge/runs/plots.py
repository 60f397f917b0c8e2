"""loss.png: the train (and eval) loss curves of a run; with online RL, the reward curve beside them (its loss is
~0 by construction: the reward is the progress signal)."""

from __future__ import annotations

from pathlib import Path


def plot_losses(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    rewards = [(h["step"], h["reward"]) for h in log_history if "reward" in h and "step" in h]
    if rewards:
        fig, (reward_ax, ax) = plt.subplots(1, 2, figsize=(11, 4))
        reward_ax.plot(*zip(*rewards), marker="o", color="tab:green", label="mean reward")
        per = sorted({k for h in log_history for k in h if k.startswith("rewards/") and k.endswith("/mean")})
        for key in per if len(per) > 1 else []:
            reward_ax.plot(*zip(*[(h["step"], h[key]) for h in log_history if key in h]), marker=".",
                           label=key[len("rewards/"):-len("/mean")])
        reward_ax.set_xlabel("step")
        reward_ax.set_ylabel("reward")
        reward_ax.set_title("reward (the progress signal)")
        reward_ax.grid(alpha=0.3)
        reward_ax.legend()
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), marker="o", label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="s", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if rewards:
        ax.set_title("loss (~0 by construction in GRPO)")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
