"""The `tuneforge` command: `tuneforge COMMAND [hydra overrides and flags]`.

Each command is a Hydra app over the shipped configs. Before Hydra runs, the overrides are
composed and validated here, so a bad key, type or value fails in a fraction of a second with a
message that names the key and the closest valid one -- before any model is loaded.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

from tuneforge.console import silence_library_noise

# Before tuneforge.config: on a cold schema cache (a new machine, new library versions) loading it imports
# PEFT, which imports bitsandbytes, whose import-time log line the filters must already catch.
silence_library_noise()
from tuneforge.config import ConfigError  # noqa: E402

log = logging.getLogger("tuneforge")

USAGE = """usage: tuneforge COMMAND [key=value ...] [hydra flags]

commands:
  train    fine-tune (default recipe: demo). e.g. tuneforge train recipe=demo train.max_steps=50
  infer    answer with a trained run: tuneforge infer run_dir=PATH prompt="..."
  doctor   check tokenizer, template, masks and data before training (--json also writes doctor.json)
  merge    fold the adapter into full-precision weights: tuneforge merge run_dir=PATH [out=DIR] [merge.base=original]
  eval     score a trained run on its held-out split: tuneforge eval run_dir=PATH [eval.compare_base=true]
  preview  formatted samples with trained/masked tokens + data statistics, no weights loaded:
           tuneforge preview [overrides] [n=5]   (writes preview.html under outputs/preview/)
  report   table + plots of a sweep: tuneforge report multirun/DATE/TIME [--metric NAME] [--direction minimize]
  keys     every train.*/peft.*/quant.* key with its type, default and origin: tuneforge keys [train] [--task TASK]
  reproduce  re-run a run from its config.yaml into a new run directory:
           tuneforge reproduce RUN_DIR [overrides] [--check]  (--check: exit 1 unless metrics and weights match)

Hydra flags work as usual: -m/--multirun, --cfg job, hydra.run.dir=DIR, --help.
A failure you can fix is one line and a documented exit code (README: "When something goes wrong");
--debug (or HYDRA_FULL_ERROR=1) prints its full traceback too.
"""

# Hydra flags that only print (no pre-validation needed).
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc"}


def _train_app(dcfg) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from tuneforge import lifecycle, manifest, runs
    from tuneforge.faults import Diverged, Interrupted
    from tuneforge.redaction import redact

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    runs.redact_hydra_files(run_dir, Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else run_dir)
    if hc.mode != RunMode.MULTIRUN:
        try:
            return lifecycle.sweep_value(*lifecycle.job(dcfg, run_dir))
        except Diverged as exc:
            manifest.write_failure(run_dir, exc)
            raise
    try:  # one failed job must not stop the sweep (Hydra's basic launcher stops at the first exception)
        return lifecycle.sweep_value(*lifecycle.job(dcfg, run_dir))
    except Interrupted:
        raise  # a person asked the whole sweep to stop
    except Exception as exc:
        log.error("job %s failed: %s", hc.job.num, exc)
        run_dir.mkdir(parents=True, exist_ok=True)
        manifest.write_failure(run_dir, exc, job=hc.job.num, overrides=redact(list(hc.overrides.task)))
        return None  # the Optuna sweeper records the trial as failed (NaN would crash its bookkeeping)
    finally:  # a long sweep in one process would otherwise hold one open lock file per finished job
        runs.release_run_dir(run_dir)


def _preview_app(dcfg) -> None:
    from tuneforge.data import preview

    preview.app(dcfg)


def _infer_app(dcfg) -> None:
    from omegaconf import OmegaConf

    from tuneforge import infer

    infer.run(OmegaConf.to_object(dcfg))


def _doctor_app(dcfg) -> None:
    from tuneforge import doctor
    from tuneforge.compose import to_validated

    if doctor.has_errors(doctor.run(to_validated(dcfg))):
        sys.exit(1)


def _debug() -> bool:
    """Full tracebacks asked for: `--debug`, or Hydra's own switch (which `--debug` sets)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def _friendly(app):
    """Failures a user can cause, found inside a job (e.g. a taken run directory, a stopped run), exit with
    their documented code after one clear line (lifecycle.exit_code), and no traceback unless asked for
    (a bug's traceback, exit_code None, is its report: Hydra prints it)."""

    def wrapped(dcfg):
        from tuneforge.lifecycle import exit_code

        try:
            return app(dcfg)
        except Exception as exc:
            code = exit_code(exc)
            if code is None:
                raise
            sys.exit(code)  # SystemExit passes Hydra's job wrapper untouched: no "Error executing job"

    wrapped.__name__ = app.__name__
    return wrapped


def _merge_app(dcfg) -> None:
    from omegaconf import OmegaConf

    from tuneforge import merge

    merge.run(OmegaConf.to_object(dcfg))


def _eval_app(dcfg) -> None:
    from omegaconf import OmegaConf

    from tuneforge import evaluate

    evaluate.run(OmegaConf.to_object(dcfg))


def _report_main(args: list[str]) -> int:
    from tuneforge import report

    return report.main(args)


def _reproduce_main(args: list[str]) -> int:
    from tuneforge import reproduce

    return reproduce.main(args)


def _keys_main(args: list[str]) -> int:
    from tuneforge import keys

    return keys.main(args)


# Commands that take a path, not a Hydra config of their own.
PLAIN_COMMANDS = {"report": _report_main, "reproduce": _reproduce_main, "keys": _keys_main}

COMMANDS = {
    "train": ("config", _friendly(_train_app)),
    "infer": ("infer", _friendly(_infer_app)),
    "eval": ("evaluate", _friendly(_eval_app)),
    "merge": ("merge", _friendly(_merge_app)),
    "doctor": ("config", _friendly(_doctor_app)),
    "preview": ("config", _friendly(_preview_app)),
}


def _precheck(command: str, config_name: str, overrides: list[str], multirun: bool) -> None:
    from tuneforge.compose import compose_config, load_config

    if config_name == "config":
        cfg = load_config(overrides, multirun=multirun)
        if command == "train":  # the libraries' own checks of the trainer, LoRA and bitsandbytes configs
            from tuneforge import library_args

            library_args.check(cfg)
        # Hydra writes .hydra/ into the run directory before the job starts: refuse a taken one first.
        explicit = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")]
        from tuneforge.launch import in_launched_process

        # A launched rank shares the run directory its launching job resolved (and rank 0 may claim it first).
        # Only train makes a run directory (doctor and preview run in `.`, whatever it holds).
        if command == "train" and explicit and not multirun and not in_launched_process():
            from tuneforge.launch import needs_launch
            from tuneforge.runs import check_run_dir_free, claim_run_dir

            if not needs_launch(cfg):
                # Claimed (locked) before Hydra writes .hydra/ into it: of two commands started at once into one
                # run directory, the second is refused before it writes anything. The job claims it again.
                claim_run_dir(Path(explicit[-1]), cfg.train.resume_from_checkpoint)
            else:  # the launched main rank claims it, in its own process
                check_run_dir_free(Path(explicit[-1]), cfg.train.resume_from_checkpoint)
    else:
        from omegaconf import OmegaConf

        OmegaConf.to_object(compose_config(overrides, config_name=config_name))


def _run_hydra(command: str, config_name: str, app, args: list[str]) -> None:
    import hydra

    from tuneforge.compose import hydra_args, register_all
    from tuneforge.paths import conf_dir

    register_all()
    sys.argv = [f"tuneforge {command}"] + hydra_args(args, config_name)
    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=config_name)(app)()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, args = argv[0], argv[1:]
    if "--debug" in args:
        args = [a for a in args if a != "--debug"]
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's own switch: its job wrapper re-raises too
    try:
        return _main(command, args)
    except KeyboardInterrupt:  # Ctrl-C outside training (which saves a checkpoint and exits 130 itself)
        if _debug():
            traceback.print_exc()
        print(f"tuneforge {command}: interrupted.", file=sys.stderr)
        return 130


def _main(command: str, args: list[str]) -> int:
    if command in PLAIN_COMMANDS:
        return PLAIN_COMMANDS[command](args)
    if command not in COMMANDS:
        from tuneforge.config import closest

        print(f"tuneforge: unknown command '{command}'.{closest(command, [*COMMANDS, *PLAIN_COMMANDS])}\n\n{USAGE}",
              file=sys.stderr)
        return 2
    config_name, app = COMMANDS[command]
    if command in ("doctor", "preview"):
        # Inspection commands make no run directory and no log file (user overrides still win).
        args = ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=stdout"] + args
    if command == "doctor" and "--json" in args:  # a flag people expect; Hydra would reject it
        args = [a for a in args if a != "--json"] + ["doctor.json_path=doctor.json"]
    if command == "train":
        from tuneforge.launch import rank_args

        args = rank_args(args)
    if command == "preview":
        from tuneforge.data.preview import cli_args

        args = cli_args(args)
    if command == "infer":
        from tuneforge.compose import quote_free_text

        args = quote_free_text(args)
    from tuneforge.compose import split_args

    flags, overrides, multirun = split_args(args)
    try:
        if not set(flags) & _INFO_FLAGS:
            _precheck(command, config_name, overrides, multirun)
        _run_hydra(command, config_name, app, args)
    except ConfigError as exc:
        if _debug():
            traceback.print_exc()
        print(f"tuneforge {command}: config error: {exc}", file=sys.stderr)
        return 2
    finally:
        if command == "train":  # the command is over (in-process callers, e.g. tests, run several)
            from tuneforge.runs import release_run_dir

            release_run_dir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
