"""Run directories: never overwritten, written atomically, with the resolved config, a manifest, metrics,
checkpoints that a resume can trust, and no secrets in any file."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import OmegaConf

from tuneforge.config import RESUME_LATEST, RESUME_OFF, ConfigError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
MANIFEST_FILE = "manifest.json"
FAILED_FILE = "failed.json"
ADAPTER_DIR = "adapter"
CHECKPOINT_PREFIX = "checkpoint-"
REDACTED = "***REDACTED***"
# Versions recorded in every manifest (and compared by `tuneforge reproduce`).
PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "hydra-core")


def resume_requested(value: Any) -> bool:
    """`train.resume_from_checkpoint`: null/false = start fresh; auto/true/a path = resume."""
    return value is not None and str(value).strip().lower() not in RESUME_OFF


def check_run_dir_free(run_dir: Path, resume: Any = None) -> None:
    """Refuse a directory that already holds a run: a run never overwrites another run's outputs.

    With a resume requested, a run directory whose training did not finish is accepted (that is where its
    checkpoints are); a finished one is still refused."""
    run_dir = Path(run_dir)
    taken = (run_dir / CONFIG_FILE).exists() or (run_dir / ADAPTER_DIR).exists()
    if taken and resume_requested(resume):
        if (run_dir / ADAPTER_DIR).exists() and (run_dir / METRICS_FILE).exists():
            raise ConfigError(f"{run_dir} holds a finished run (adapter/ and metrics.json); there is nothing to resume. "
                              "Choose another hydra.run.dir for a new run.")
        return
    if taken:
        raise ConfigError(
            f"{run_dir} already holds a run; choose another hydra.run.dir (or leave it unset for a new one), "
            "or add train.resume_from_checkpoint=auto to continue it from its latest checkpoint."
        )
    check_writable(run_dir)


def check_writable(path: Path) -> None:
    """The directory, or the nearest existing parent it would be created in, must be writable."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{path} is not writable (checked {probe}); choose another hydra.run.dir.")


def claim_run_dir(run_dir: Path, resume: Any = None) -> Path:
    check_run_dir_free(run_dir, resume)
    if resume_requested(resume):
        (run_dir / FAILED_FILE).unlink(missing_ok=True)  # the resumed run decides anew
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the run directory {run_dir}: {exc.strerror}.") from None
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
    """The fully resolved config (CLI overrides included), with secrets redacted."""
    plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    if isinstance(plain, dict):
        plain.pop("hydra", None)
    atomic_write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(redact(plain))))


# --- secrets ---------------------------------------------------------------------------------------------

# Tokenizer special-token names end in `_token` but are vocabulary, not credentials.
_NOT_SECRET = {"pad_token", "bos_token", "eos_token", "unk_token", "sep_token", "cls_token", "mask_token",
               "add_special_tokens", "add_tokens"}
_SECRET_KEY = re.compile(r"(?:^|_)(?:token|api_key|apikey|secret|password)$", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """`model.token`, `hf_token`, `wandb_api_key`, ... (the last dotted part decides)."""
    name = str(key).rsplit(".", 1)[-1].lstrip("+~")
    return name not in _NOT_SECRET and bool(_SECRET_KEY.search(name))


def redact(obj: Any) -> Any:
    """A copy of a config mapping with the values of secret keys replaced (None stays None), and
    `key=value` pairs inside strings (override lists, Hydra's override_dirname) redacted too."""
    if isinstance(obj, dict):
        return {k: (REDACTED if v is not None and is_secret_key(k) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_arg(obj)
    return obj


_PAIR = re.compile(r"([+~]?[\w.\-/]+)=([^,\s]+)")


def redact_arg(arg: str) -> str:
    """`model.token=hf_abc` -> `model.token=***REDACTED***`, wherever such a pair occurs in the string."""
    if "=" not in arg:
        return arg
    key, _, value = arg.partition("=")
    if value and is_secret_key(key.strip().lstrip("- ")):  # one argument: all of its value
        return f"{key}={REDACTED}"
    return _PAIR.sub(lambda m: f"{m.group(1)}={REDACTED}" if is_secret_key(m.group(1)) else m.group(0), arg)


def command_line(argv: Optional[list[str]] = None) -> str:
    argv = list(sys.argv if argv is None else argv)
    return " ".join(argv[:1] + [shlex.quote(redact_arg(a)) for a in argv[1:]])


def redact_hydra_files(*dirs: Path) -> None:
    """Hydra writes the overrides (and the composed config) before tuneforge runs: redact them in place."""
    for d in dirs:
        for path in [*Path(d).glob(".hydra/*.yaml"), Path(d) / "multirun.yaml"]:
            if not path.is_file():
                continue
            text = path.read_text()
            if not re.search(r"token|api_key|apikey|secret|password", text, re.IGNORECASE):
                continue
            data = redact(OmegaConf.to_container(OmegaConf.load(path), resolve=False))
            if "hydra" in data:  # hydra.overrides.task / .hydra lists hold `key=value` strings
                data["hydra"] = redact(data["hydra"])
            atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(data)))


# --- manifest --------------------------------------------------------------------------------------------

def _version(dist: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def git_state(path: Path) -> Optional[dict]:
    """{commit, dirty} when tuneforge runs from a git checkout, else None."""
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    """Versions, device and world size: what a reproduction must match."""
    import torch

    from tuneforge.paths import _REPO_ROOT

    if torch.cuda.is_available():
        device = {"type": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    else:
        device = {"type": "cpu", "name": platform.processor() or platform.machine(), "count": os.cpu_count()}
    repo = _REPO_ROOT if (_REPO_ROOT / ".git").exists() else None
    return {
        "tuneforge": _version("tuneforge"),
        "git": git_state(repo) if repo else None,
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "device": device,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }


def write_manifest(run_dir: Path, **fields: Any) -> dict:
    """manifest.json: the environment + what identifies this run's inputs; fields merge into an existing one
    (a resumed run keeps its history)."""
    path = Path(run_dir) / MANIFEST_FILE
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    if not manifest:
        manifest = environment() | {"command": command_line(), "started_at": _now()}
    manifest.update(fields)
    write_json(path, redact(manifest))
    return manifest


def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / MANIFEST_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_failure(run_dir: Path, exc: BaseException, **fields: Any) -> None:
    """failed.json: why a run (or sweep job) stopped, for people and for `tuneforge report`."""
    import traceback

    write_json(Path(run_dir) / FAILED_FILE, {
        "status": "failed", "error": f"{type(exc).__name__}: {exc}", "at": _now(),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:], **fields,
    })


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


# --- checkpoints -----------------------------------------------------------------------------------------

_WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why a checkpoint directory cannot be resumed from (a kill while writing it), or None."""
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    state = path / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (written last: the save was interrupted)"
    try:
        json.loads(state.read_text())
    except ValueError:
        return "trainer_state.json is truncated"
    if not any((path / w).is_file() for w in _WEIGHTS):
        return "no model/adapter weights"
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (path / name).is_file():
            return f"no {name}"
    return None


def checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-N directories, oldest first."""
    found = [p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_complete_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint that is whole; half-written ones are skipped (and said so)."""
    for ckpt in reversed(checkpoints(run_dir)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        log.warning("Skipping %s: %s.", ckpt, problem)
    return None


def resolve_resume(value: Any, run_dir: Path) -> Optional[str]:
    """`train.resume_from_checkpoint` -> the checkpoint path to give the Trainer, or None (start fresh).

    auto: the latest complete checkpoint in the run directory, or a fresh start when there is none;
    true: the same, but having none is an error; a path: that checkpoint, which must be complete."""
    if not resume_requested(value):
        return None
    text = str(value).strip()
    if text.lower() in RESUME_LATEST:
        ckpt = latest_complete_checkpoint(run_dir)
        if ckpt is None and text.lower() != "auto":
            raise ConfigError(f"train.resume_from_checkpoint={text}: no complete checkpoint in {run_dir}. "
                              "Use auto to start fresh when there is none.")
        if ckpt is None:
            log.info("train.resume_from_checkpoint=auto: no checkpoint in %s yet, starting from step 0.", run_dir)
            return None
        return str(ckpt)
    problem = checkpoint_problem(Path(text))
    if problem:
        raise ConfigError(f"train.resume_from_checkpoint={text}: cannot resume from it ({problem}).")
    return text


# --- disk ------------------------------------------------------------------------------------------------

def estimate_run_bytes(trainable_params: int, checkpoints_kept: int) -> int:
    """Adapter (fp32) + per checkpoint: weights + AdamW's two moments, + 64 MiB for tokenizer, logs, plots."""
    weights = 4 * trainable_params
    return weights + checkpoints_kept * 3 * weights + (64 << 20)


def check_free_space(run_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise ConfigError(
            f"{run_dir} has {free / 2**20:.0f} MiB free; this run needs about {needed / 2**20:.0f} MiB "
            "(adapter + checkpoints). Free some space, lower train.save_total_limit, or choose another hydra.run.dir."
        )


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`, renamed to it when the block succeeds: a crash or a full
    disk never leaves a half-written adapter under the final name."""
    final = Path(final)
    if final.exists():
        raise ConfigError(f"{final} already exists; a run never overwrites its outputs.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_adapter(trainer, tokenizer, run_dir: Path, initial_adapter: Optional[str] = None) -> bool:
    """The trained adapter + tokenizer into RUN/adapter, atomically; True on the process that wrote it. Every
    rank must call it (FSDP gathers the weights); the others return False. `initial_adapter`: a PiSSA/OLoRA
    run's adapter before training (models/adapters.keep_initial_adapter), to save the converted adapter."""
    if not trainer.args.should_save:
        trainer.save_model(str(run_dir / ADAPTER_DIR))  # collectives only: the main process writes
        return False
    with atomic_dir(run_dir / ADAPTER_DIR) as tmp:
        trainer.save_model(str(tmp))
        if initial_adapter:
            trainer.model.save_pretrained(str(tmp), path_initial_model_for_weight_conversion=initial_adapter)
        # Trainer.save_model adds training_args.bin, a pickle (reading it runs code): the run's config.yaml
        # already holds every setting, so the adapter stays safetensors + JSON only.
        (tmp / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(str(tmp))
    return True


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


def estimate_for(model, train_cfg) -> int:
    """estimate_run_bytes for this model (trainable parameters) and these checkpoint settings."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kept = 0
    if train_cfg.save_strategy != "no":
        # Training by epochs, the step count is unknown here: without a limit, assume ten checkpoints.
        saves = train_cfg.max_steps // max(train_cfg.save_steps, 1) if train_cfg.max_steps > 0 else 10
        kept = max(1, min(train_cfg.save_total_limit or saves, saves))
    return estimate_run_bytes(trainable, kept + 1)  # + one checkpoint when a signal stops the run


def run_identity(cfg, data, tokenizer_hash: str) -> dict:
    """The manifest fields that identify this run's inputs."""
    fingerprint = Path(data.cache_path).name if data.cache_path else getattr(data.train, "_fingerprint", None)
    return {"seed": cfg.train.seed, "tokenizer": {"content_hash": tokenizer_hash},
            "data": {"fingerprint": fingerprint, "cache_hit": data.cache_hit,
                     "rows": {"train": len(data.train), "eval": len(data.eval)}}}


def use_token(model_cfg) -> None:
    """model.token -> HF_TOKEN for this process only (huggingface_hub reads it); never written anywhere."""
    token = getattr(model_cfg, "token", None)
    if token and token != REDACTED:
        os.environ["HF_TOKEN"] = token
