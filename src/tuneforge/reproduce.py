"""`tuneforge reproduce RUN_DIR [key=value ...] [--check]`: run a finished run again from its config.yaml.

The saved config (fully resolved) becomes the primary config of a Hydra app, so the new run gets its own
run directory, log and manifest exactly as `tuneforge train` would. Every difference between the versions
recorded in RUN_DIR/manifest.json and this environment is printed first. With `--check` the new loss curve
is compared step by step with the original (relative tolerance `--rtol`, default 1e-4); the run stops at
the first logged step that differs and the command exits 1.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf
from transformers import TrainerCallback

from tuneforge import library_args, manifest, redaction, runs
from tuneforge.config import ConfigError

log = logging.getLogger("tuneforge")

USAGE = "usage: tuneforge reproduce RUN_DIR [key=value ...] [--check] [--rtol 1e-4] [hydra flags]"
# Per-run values that must not carry over into the reproduction.
_RESET = {("train", "resume_from_checkpoint"): None}


def version_differences(manifest: dict, now: dict) -> list[str]:
    """Human-readable lines, one per version/device difference between a manifest and this environment."""
    out = []
    for key in ("tuneforge", "python", "world_size"):
        if manifest.get(key) != now.get(key):
            out.append(f"{key}: run {manifest.get(key)} -> now {now.get(key)}")
    for name in sorted(set(manifest.get("packages", {})) | set(now.get("packages", {}))):
        a, b = manifest.get("packages", {}).get(name), now.get("packages", {}).get(name)
        if a != b:
            out.append(f"{name}: run {a} -> now {b}")
    a, b = manifest.get("device") or {}, now.get("device") or {}
    if (a.get("type"), a.get("name")) != (b.get("type"), b.get("name")):
        out.append(f"device: run {a.get('type')} {a.get('name')} -> now {b.get('type')} {b.get('name')}")
    ga, gb = manifest.get("git") or {}, now.get("git") or {}
    if ga.get("commit") != gb.get("commit") or ga.get("dirty") or gb.get("dirty"):
        out.append(f"git: run {ga.get('commit')}{' (dirty)' if ga.get('dirty') else ''} -> "
                   f"now {gb.get('commit')}{' (dirty)' if gb.get('dirty') else ''}")
    return out


def logged_curve(log_history: list[dict]) -> dict[tuple[str, int], float]:
    """{(loss|eval_loss, step): value} of a Trainer log history."""
    return {(k, h["step"]): h[k] for h in log_history for k in ("loss", "eval_loss") if k in h}


def rel_diff(a: float, b: float) -> float:
    if a == b:
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(a), 1e-12)


def compare_curves(original: list[dict], new: list[dict], rtol: float) -> dict:
    """Step-by-step comparison; `ok` when every logged value of the original is matched within rtol."""
    a, b = logged_curve(original), logged_curve(new)
    rows = [{"metric": k, "step": s, "original": v, "reproduced": b.get((k, s)),
             "rel_diff": rel_diff(v, b[(k, s)]) if (k, s) in b else None}
            for (k, s), v in sorted(a.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    missing = [r for r in rows if r["rel_diff"] is None]
    diffs = [r["rel_diff"] for r in rows if r["rel_diff"] is not None]
    max_rel = max(diffs) if diffs else None
    ok = bool(rows) and not missing and max_rel is not None and max_rel <= rtol
    return {"ok": ok, "rtol": rtol, "max_rel_diff": max_rel, "missing_steps": [r["step"] for r in missing],
            "rows": rows}


class CurveCheck(TrainerCallback):
    """Stops a `--check` reproduction at the first logged value that differs from the original."""

    def __init__(self, original: list[dict], rtol: float):
        self.expected, self.rtol, self.failed_at = logged_curve(original), rtol, None

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "eval_loss"):
            want = self.expected.get((key, state.global_step))
            if key in (logs or {}) and want is not None and rel_diff(want, logs[key]) > self.rtol:
                self.failed_at = state.global_step
                log.error("reproduce --check: %s at step %d is %.8g, the original logged %.8g (rel diff %.3g > %g); "
                          "stopping.", key, state.global_step, logs[key], want, rel_diff(want, logs[key]), self.rtol)
                control.should_training_stop = True
        return control


def _parse(args: list[str]) -> tuple[Path, list[str], bool, float]:
    check, rtol, rest, i = False, 1e-4, [], 0
    while i < len(args):
        if args[i] == "--check":
            check = True
        elif args[i] == "--rtol" and i + 1 < len(args):
            rtol, i = float(args[i + 1]), i + 1
        elif args[i].startswith("--rtol="):
            rtol = float(args[i].split("=", 1)[1])
        else:
            rest.append(args[i])
        i += 1
    positional = [a for a in rest if "=" not in a and not a.startswith("-")]
    if not positional:
        raise ConfigError(f"which run? {USAGE}")
    rest.remove(positional[0])
    return Path(positional[0]), rest, check, rtol


def primary_config(run_dir: Path) -> dict:
    """The saved config as a Hydra primary config: typed by tuneforge's schema, with train's run-dir settings."""
    from tuneforge.paths import conf_dir

    saved = OmegaConf.to_container(runs.read_config(run_dir), resolve=True)
    for (section, key), value in _RESET.items():
        saved.setdefault(section, {})[key] = value
    saved = _unredact(saved)
    hydra = OmegaConf.to_container(OmegaConf.load(conf_dir() / "config.yaml").hydra, resolve=False)
    return {"defaults": ["tuneforge_schema", "_self_"], **saved, "hydra": hydra}


def _unredact(obj):
    """Redacted secrets become null: the reproduction reads them from the environment (HF_TOKEN, ...)."""
    if isinstance(obj, dict):
        return {k: _unredact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unredact(v) for v in obj]
    return None if obj == redaction.REDACTED else obj


def main(args: list[str]) -> int:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tuneforge.compose import check_override_keys, explain, register_all, split_args, to_validated
    from tuneforge.config import TuneforgeConfig

    try:
        run_dir, rest, check, rtol = _parse(args)
        original = runs.read_config(run_dir)  # noqa: F841 (fails clearly when RUN_DIR is not a run)
        flags, overrides, _ = split_args(rest)
        explicit = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")]
        if explicit:  # before Hydra writes .hydra/ into it
            runs.check_run_dir_free(Path(explicit[-1]))
        for line in version_differences(manifest.read(run_dir), manifest.environment()):
            print(f"tuneforge reproduce: warning: version differs from the run: {line}", file=sys.stderr)
        metrics_path = run_dir / runs.METRICS_FILE
        if check and not metrics_path.is_file():
            raise ConfigError(f"--check needs {metrics_path} (the original run did not finish).")
        history = json.loads(metrics_path.read_text()).get("log_history", []) if check else []
        register_all()
        with tempfile.TemporaryDirectory(prefix="tuneforge-reproduce-") as tmp:
            (Path(tmp) / "reproduce.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(primary_config(run_dir))))
            check_override_keys(overrides, TuneforgeConfig)
            GlobalHydra.instance().clear()
            try:
                with initialize_config_dir(config_dir=tmp, version_base="1.3", job_name="train"):
                    library_args.check(to_validated(compose(config_name="reproduce", overrides=overrides)))
            except ConfigError:
                raise
            except Exception as exc:
                raise ConfigError(explain(exc)) from exc
            finally:
                GlobalHydra.instance().clear()
            return _run(tmp, run_dir, rest, history if check else None, rtol)
    except ConfigError as exc:
        print(f"tuneforge reproduce: config error: {exc}", file=sys.stderr)
        return 2


def _run(config_dir: str, original_dir: Path, args: list[str], history, rtol: float) -> int:
    import hydra

    outcome = {"code": 0}

    def app(dcfg):
        from hydra.core.hydra_config import HydraConfig

        from tuneforge import lifecycle

        new_dir = Path(HydraConfig.get().runtime.output_dir)
        runs.redact_hydra_files(new_dir)
        checker = CurveCheck(history, rtol) if history is not None else None
        try:
            _, metrics = lifecycle.job(dcfg, new_dir, callbacks=[checker] if checker else None)
        except Exception as exc:
            code = lifecycle.exit_code(exc)
            if code is None:
                raise
            outcome["code"] = code
            return
        manifest.write(new_dir, reproduced_from=str(original_dir))
        if history is None:
            log.info("Reproduction of %s saved in %s", original_dir, new_dir)
            return
        result = compare_curves(history, metrics.get("log_history", []), rtol)
        runs.write_json(new_dir / "reproduce.json", {"original": str(original_dir)} | result)
        _print(result, original_dir, new_dir)
        outcome["code"] = 0 if result["ok"] else 1

    from tuneforge.compose import hydra_args

    sys.argv = ["tuneforge reproduce"] + hydra_args(args)
    hydra.main(version_base="1.3", config_path=config_dir, config_name="reproduce")(app)()
    return outcome["code"]


def _print(result: dict, original_dir: Path, new_dir: Path) -> None:
    print(f"{'step':>6} {'metric':<10} {'original':>14} {'reproduced':>14} {'rel diff':>10}")
    for r in result["rows"]:
        new = "missing" if r["reproduced"] is None else f"{r['reproduced']:.8g}"
        rel = "-" if r["rel_diff"] is None else f"{r['rel_diff']:.2e}"
        print(f"{r['step']:>6} {r['metric']:<10} {r['original']:>14.8g} {new:>14} {rel:>10}")
    verdict = "MATCH" if result["ok"] else "MISMATCH"
    max_rel = "n/a" if result["max_rel_diff"] is None else f"{result['max_rel_diff']:.3g}"
    print(f"reproduce --check: {verdict} (max relative difference {max_rel}, tolerance {result['rtol']:g}) "
          f"{original_dir} -> {new_dir}")
