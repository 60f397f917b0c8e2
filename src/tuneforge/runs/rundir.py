"""Run directories: claimed once and never overwritten, every file written atomically (the resolved config
with its secrets redacted, metrics, predictions, the adapter), and the disk space a run needs checked first.
What identifies a run is in manifest.py, checkpoints and resume in checkpoints.py, secrets in redaction.py."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import OmegaConf

from tuneforge.config.errors import ConfigError
from tuneforge.runs import checkpoints, scratch
from tuneforge.runs.checkpoints import resume_requested
from tuneforge.runs.redaction import redact

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
FAILED_FILE = "failed.json"
ADAPTER_DIR = "adapter"


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
    """Claim a run directory for this process: refused (ConfigError) when it holds another run
    (check_run_dir_free) or another process is using it. The claim is a lock (flock on RUN/.tuneforge.lock)
    held until this process ends or `release_run_dir`: two commands started at once into one directory cannot
    both pass a check-then-create. Claiming a directory this process already holds checks it again."""
    run_dir = Path(run_dir)
    check_run_dir_free(run_dir, resume)  # a finished run is refused before anything is written into it
    _lock(run_dir)
    check_run_dir_free(run_dir, resume)  # again under the lock: the process that held it may have finished
    scratch.remove_stale(run_dir)  # what a killed writer left half-written (an adapter, a file)
    if not os.access(run_dir, os.W_OK):
        raise ConfigError(f"{run_dir} is not writable.")
    return run_dir


LOCK_FILE = ".tuneforge.lock"
_held: dict[Path, int] = {}  # run directory -> the open lock file this process holds


def _lock(run_dir: Path) -> None:
    """The kernel drops an flock when its process ends, however it ends (kill -9 included): a crashed run
    leaves no stale lock behind, and resuming it needs no cleanup."""
    import fcntl

    key = run_dir.resolve()
    if key in _held:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot create the run directory {run_dir}: {exc.strerror}; choose another "
                          "hydra.run.dir.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ConfigError(f"{run_dir} is in use by another tuneforge command (process {holder}); wait for it to "
                          "finish, or choose another hydra.run.dir.") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())  # who holds it, for the message another process prints
    _held[key] = fd


def release_run_dir(run_dir: Optional[Path] = None) -> None:
    """Give up this process's claim on `run_dir` (every claim when None); the directory stays as it is."""
    keys = list(_held) if run_dir is None else [Path(run_dir).resolve()]
    for key in keys:
        fd = _held.pop(key, None)
        if fd is not None:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside the target, then rename: readers never see half a file."""
    tmp = path.parent / scratch.scratch_name(path.name)  # named after this process: see scratch.remove_stale
    try:
        with open(tmp, "x") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_config(run_dir: Path, cfg: Any) -> None:
    """The fully resolved config (CLI overrides included), with secrets redacted."""
    plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    if isinstance(plain, dict):
        plain.pop("hydra", None)
    atomic_write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.create(redact(plain))))


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


def refuse_non_empty(path: Path, hint: str = "a run never overwrites its outputs") -> None:
    """An output directory must be missing or empty: never write into (or over) files someone has there."""
    path = Path(path)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise ConfigError(f"{path} exists and is not empty; nothing was written into it ({hint}).")


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`, renamed to it when the block succeeds: a crash or a full
    disk never leaves a half-written adapter under the final name, and an existing non-empty `final` is never
    written into (an empty one is replaced)."""
    final = Path(final)
    refuse_non_empty(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = scratch.make_scratch_dir(final)
    try:
        yield tmp
        try:
            # rename(2) replaces only a missing or empty directory: one filled meanwhile stays untouched.
            os.replace(tmp, final)
        except OSError as exc:
            raise ConfigError(f"{final} was created by something else meanwhile ({exc.strerror}); nothing was "
                              "written into it.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def discard_unfinished_adapter(run_dir: Path) -> None:
    """A resumed run's adapter/ without metrics.json is this run's own, saved before a signal stopped its scoring:
    the resume saves it again from the same checkpoint (a finished run, with metrics.json, is never resumed)."""
    adapter = Path(run_dir) / ADAPTER_DIR
    if adapter.is_dir() and not (Path(run_dir) / METRICS_FILE).exists():
        aside = adapter.parent / scratch.scratch_name(adapter.name)
        os.rename(adapter, aside)
        shutil.rmtree(aside, ignore_errors=True)
        log.info("Resuming: %s of the interrupted run is saved again.", adapter)


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
        _drop_frozen_adapters(trainer.model, tmp)
        tokenizer.save_pretrained(str(tmp))
    return True


def _drop_frozen_adapters(model, adapter_dir: Path) -> None:
    """The run's adapter is the one it trained. PEFT saves every adapter a model holds, the others in subfolders
    named after them: TRL's frozen "ref" copy of a pretrained adapter (DPO from an SFT run) is the SFT run's
    adapter again, not part of this run's."""
    model = getattr(model, "module", model)
    for name in getattr(model, "peft_config", {}):
        if name != model.active_adapter and (adapter_dir / name).is_dir():
            shutil.rmtree(adapter_dir / name)


def read_config(run_dir: Path):
    """RUN/config.yaml, checked on read: a missing or damaged file is one line naming it."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a tuneforge run directory (no {CONFIG_FILE}).")
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml's and OmegaConf's errors for a truncated or edited file
        raise ConfigError(f"{path} is damaged ({str(exc).splitlines()[0]}); restore it from the run's "
                          ".hydra/config.yaml or a backup.") from None
    # write_config writes every section: one missing is a truncated file (which can still parse).
    missing = [k for k in ("task", "model", "data", "train", "eval") if not OmegaConf.is_dict(cfg) or k not in cfg]
    if missing:
        raise ConfigError(f"{path} is damaged (no {', '.join(missing)} section); restore it from the run's "
                          ".hydra/config.yaml or a backup.")
    _drop_foreign_train_keys(cfg)
    return cfg


def _drop_foreign_train_keys(cfg) -> None:
    """`train.*` keys that the run's task's trainer config does not have held their default when the run started
    (validation refuses any other value), and a later tuneforge may default them otherwise (a task added whose library
    default differs: train.max_completion_length became null with task=orpo): dropped from what was read, so the
    current default applies and the run still reads back (infer, eval, resume, reproduce)."""
    from tuneforge.config import library_keys
    from tuneforge.config.tasks import TASKS

    spec, train = TASKS.get(cfg.get("task")), cfg.get("train")
    if spec is None or not OmegaConf.is_dict(train):
        return
    try:
        own = library_keys.library_fields(spec.trainer_config)
    except library_keys.MissingLibraryClass:
        return
    keys = library_keys.TRAIN.keys()
    for name in [k for k in train if k in keys and k not in own]:
        if keys[name]["origin"] != ["tuneforge"] and name not in library_keys.TRAIN.every_task:
            del train[name]


def read_json(path: Path) -> Any:
    """A JSON file a run wrote (metrics, manifest), checked on read: damage is one line naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing: the run did not finish, or the file was removed.") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is damaged ({type(exc).__name__}: {exc}).") from None


def run_config(run_dir: Path):
    """A run's config.yaml as the validated config it ran with (TuneforgeConfig); a file that no longer validates
    (edited, damaged, or from another tuneforge) is one line naming it."""
    from tuneforge.config.compose import to_validated
    from tuneforge.config.schemas import TuneforgeConfig

    path = Path(run_dir) / CONFIG_FILE
    saved = read_config(run_dir)
    try:
        return to_validated(OmegaConf.merge(OmegaConf.structured(TuneforgeConfig), saved))
    except ConfigError as exc:
        raise ConfigError(f"{path} cannot be read back ({exc}): it was edited, damaged, or written by another "
                          "tuneforge version.") from None
    except Exception as exc:  # OmegaConf's merge errors: a key or type the schema lacks
        raise ConfigError(f"{path} cannot be read back ({str(exc).splitlines()[0]}): it was edited, damaged, or "
                          "written by another tuneforge version.") from None


def check_resume_matches(run_dir: Path, cfg) -> None:
    """A resume may not change what the run's checkpoints hold (checkpoints.HELD_BY_CHECKPOINT): refused in one
    line before anything is written, so the run's config.yaml and manifest stay those of its checkpoints."""
    from dataclasses import asdict

    if not resume_requested(cfg.train.resume_from_checkpoint) or not (Path(run_dir) / CONFIG_FILE).is_file():
        return
    changes = checkpoints.resume_changes(asdict(run_config(run_dir)), asdict(cfg))
    if changes:
        raise ConfigError(f"train.resume_from_checkpoint: this resume changes what the checkpoints in {run_dir} "
                          f"hold ({'; '.join(changes)}); resume with the run's own values, or start a new run in "
                          "another hydra.run.dir.")


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


