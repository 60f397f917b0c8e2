"""Run directories: never overwritten, written atomically, with the resolved config and metrics."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from tuneforge.config import ConfigError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
ADAPTER_DIR = "adapter"


def check_run_dir_free(run_dir: Path) -> None:
    """Refuse a directory that already holds a run: a run never overwrites another run's outputs."""
    if (run_dir / CONFIG_FILE).exists() or (run_dir / ADAPTER_DIR).exists():
        raise ConfigError(
            f"{run_dir} already holds a run; choose another hydra.run.dir (or leave it unset for a new one)."
        )


def claim_run_dir(run_dir: Path) -> Path:
    check_run_dir_free(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(run_dir, os.W_OK):
        raise ConfigError(f"{run_dir} is not writable.")
    return run_dir


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside the target, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_config(run_dir: Path, cfg: Any) -> None:
    atomic_write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))


def read_config(run_dir: Path):
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a tuneforge run directory (no {CONFIG_FILE}).")
    return OmegaConf.load(path)


def plot_losses(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), marker="o", label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="s", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_predictions(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
