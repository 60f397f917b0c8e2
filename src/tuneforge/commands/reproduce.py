"""`tuneforge reproduce RUN_DIR [key=value ...] [--check]`: run a finished run again from its config.yaml.

The saved config (fully resolved) becomes the primary config of a Hydra app, so the new run gets its own
run directory, log and manifest exactly as `tuneforge train` would. Every difference between the versions
recorded in RUN_DIR/manifest.json and this environment is printed first. With `--check` the new loss curve
is compared with the original: every value both logged at each step, every number of metrics.json (the
final train loss at least, so a run shorter than train.logging_steps is compared too) and the adapter weights,
each within the relative tolerance `--rtol` (default 1e-4). The table lists every compared quantity; the run
stops at the first logged value that differs, and any difference (or a value the reproduction lacks) exits 1.
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from tuneforge.commands.base import Command, argparse_main, parser
from tuneforge.config import library_args
from tuneforge.config.errors import ConfigError
from tuneforge.runs import manifest, redaction, rundir

log = logging.getLogger("tuneforge")

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


# Values that measure the machine, not the run (runtimes, throughputs): never compared.
def _timing(key: str) -> bool:
    # step_time: TRL's online-RL trainers log each step's wall time.
    return "runtime" in key or "per_second" in key or key.endswith(("_load_s", "step_time"))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def logged_curve(log_history: list[dict]) -> dict[tuple[str, int], float]:
    """{(key, step): value} of every number a Trainer log history holds (loss, grad_norm, learning_rate,
    eval_loss, mean_token_accuracy, the final train_loss, ...), timings left out."""
    return {(k, h["step"]): float(v) for h in log_history if "step" in h
            for k, v in h.items() if k != "step" and _number(v) and not _timing(k)}


def final_values(metrics: dict) -> dict[str, float]:
    """The top-level numbers of metrics.json (train_loss, tokens_seen, train_steps, held-out scores, ...)."""
    return {k: float(v) for k, v in metrics.items() if _number(v) and not _timing(k)}


def rel_diff(a: float, b: float) -> float:
    if a == b:
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(a), 1e-12)


def _row(kind: str, metric: str, step, original: float, reproduced) -> dict:
    """kind: logged (a log-history value at a step), final (metrics.json) or weights (an adapter file)."""
    return {"kind": kind, "metric": metric, "step": step, "original": original, "reproduced": reproduced,
            "rel_diff": None if reproduced is None else rel_diff(original, reproduced)}


def verdict(rows: list[dict], rtol: float) -> dict:
    """`ok` only when something was compared and every value the original has is matched within rtol (a
    value missing from the reproduction, or NaN, fails: `<=` is False for NaN)."""
    missing = [r for r in rows if r["rel_diff"] is None]
    diffs = [r["rel_diff"] for r in rows if r["rel_diff"] is not None]
    max_rel = max(diffs, key=lambda d: math.inf if math.isnan(d) else d) if diffs else None
    ok = bool(rows) and not missing and all(d <= rtol for d in diffs)
    return {"ok": ok, "rtol": rtol, "max_rel_diff": max_rel, "compared": len(diffs),
            "missing": [f"{r['metric']}@{r['step'] if r['step'] is not None else 'final'}" for r in missing],
            "missing_steps": sorted({r["step"] for r in missing if r["step"] is not None}), "rows": rows}


def compare_curves(original: list[dict], new: list[dict], rtol: float) -> dict:
    """Every value the original logged, step by step, against the reproduction's."""
    a, b = logged_curve(original), logged_curve(new)
    by_step = sorted(a.items(), key=lambda kv: (kv[0][1], kv[0][0]))
    rows = [_row("logged", k, s, v, b.get((k, s))) for (k, s), v in by_step]
    return verdict(rows, rtol)


def compare_weights(original_dir: Path, new_dir: Path) -> list[dict]:
    """One row per safetensors file of RUN/adapter: the largest |difference| over all its tensors, relative to
    the largest |weight| of the original (`original`/`reproduced`: the largest |weight| of each)."""
    from safetensors.torch import load_file

    rows = []
    for path in sorted((Path(original_dir) / rundir.ADAPTER_DIR).glob("*.safetensors")):
        name = f"{rundir.ADAPTER_DIR}/{path.name}"
        other = Path(new_dir) / rundir.ADAPTER_DIR / path.name
        a = load_file(str(path))
        scale = max((t.double().abs().max().item() for t in a.values() if t.numel()), default=0.0)
        if not other.is_file():
            rows.append(_row("weights", name, None, scale, None))
            continue
        b = load_file(str(other))
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
            diff = math.inf  # a different adapter layout: nothing to match
        else:
            diff = max(((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel()), default=0.0)
        new_scale = max((t.double().abs().max().item() for t in b.values() if t.numel()), default=0.0)
        rel = 0.0 if diff == 0 else diff / max(scale, 1e-12)  # NaN stays NaN and fails the `<=`
        rows.append(_row("weights", name, None, scale, new_scale) | {"rel_diff": rel, "max_abs_diff": diff,
                                                                      "tensors": len(a)})
    return rows


def compare_runs(original_dir: Path, new_dir: Path, new_metrics: dict, rtol: float) -> dict:
    """What `--check` compares: every value both logs hold at each step (curves), every top-level number of
    metrics.json (at least the final train loss), and the adapter weights. Short runs that logged no step
    (max_steps < logging_steps) are still compared on their final values and weights."""
    original = rundir.read_json(Path(original_dir) / rundir.METRICS_FILE)
    curves = compare_curves(original.get("log_history", []), new_metrics.get("log_history", []), rtol)["rows"]
    new_finals = final_values(new_metrics)
    finals = [_row("final", k, None, v, new_finals.get(k)) for k, v in sorted(final_values(original).items())]
    return verdict(curves + finals + compare_weights(original_dir, new_dir), rtol)


def curve_check(original: list[dict], rtol: float):
    """A TrainerCallback that stops a `--check` reproduction at the first logged value that differs from the
    original (`.failed_at`: that step)."""
    from transformers import TrainerCallback  # when a run starts: `tuneforge --help` must not load torch

    class CurveCheck(TrainerCallback):
        """Stops a `--check` reproduction at the first logged value that differs from the original."""

        def __init__(self, original: list[dict], rtol: float):
            self.expected, self.rtol, self.failed_at = logged_curve(original), rtol, None

        def on_log(self, args, state, control, logs=None, **kwargs):
            got = logged_curve([{**(logs or {}), "step": state.global_step}])
            for (key, step), value in sorted(got.items()):
                want = self.expected.get((key, step))
                if want is not None and not rel_diff(want, value) <= self.rtol:
                    self.failed_at = step
                    log.error("reproduce --check: %s at step %d is %.8g, the original logged %.8g (rel diff %.3g > %g); "
                              "stopping.", key, step, value, want, rel_diff(want, value), self.rtol)
                    control.should_training_stop = True
                    break
            return control

    return CurveCheck(original, rtol)


def primary_config(run_dir: Path) -> dict:
    """The saved config as a Hydra primary config: typed by tuneforge's schema, with train's run-dir settings."""
    from tuneforge.config.paths import conf_dir

    saved = OmegaConf.to_container(rundir.read_config(run_dir), resolve=True)
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


def _reproduce(ns, rest: list[str]) -> int:
    """`rest`: overrides and Hydra flags, as for `tuneforge train`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tuneforge.config.compose import check_override_keys, explain, register_all, split_args, to_validated
    from tuneforge.config.schemas import TuneforgeConfig
    from tuneforge.runs.launch import needs_launch

    run_dir, check, rtol = Path(ns.run_dir), ns.check, ns.rtol
    rundir.read_config(run_dir)  # fails clearly when RUN_DIR is not a run
    flags, overrides, _ = split_args(rest)
    explicit = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")]
    if explicit:  # refused before anything else; claimed below, before Hydra writes .hydra/ into it
        rundir.check_run_dir_free(Path(explicit[-1]))
    for line in version_differences(manifest.read(run_dir), manifest.environment()):
        print(f"tuneforge reproduce: warning: version differs from the run: {line}", file=sys.stderr)
    metrics_path = run_dir / rundir.METRICS_FILE
    if check and not metrics_path.is_file():
        raise ConfigError(f"--check needs {metrics_path} (the original run did not finish).")
    history = rundir.read_json(metrics_path).get("log_history", []) if check else []
    register_all()
    with tempfile.TemporaryDirectory(prefix="tuneforge-reproduce-") as tmp:
        (Path(tmp) / "reproduce.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(primary_config(run_dir))))
        check_override_keys(overrides, TuneforgeConfig)
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=tmp, version_base="1.3", job_name="train"):
                cfg = to_validated(compose(config_name="reproduce", overrides=overrides))
                library_args.check(cfg)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(explain(exc)) from exc
        finally:
            GlobalHydra.instance().clear()
        if explicit and not needs_launch(cfg):  # a launched main rank claims it in its own process
            rundir.claim_run_dir(Path(explicit[-1]))
        return _run(tmp, run_dir, rest, history if check else None, rtol)


def _run(config_dir: str, original_dir: Path, args: list[str], history, rtol: float) -> int:
    import hydra

    outcome = {"code": 0}

    def app(dcfg):
        from hydra.core.hydra_config import HydraConfig

        from tuneforge.tasks import lifecycle

        new_dir = Path(HydraConfig.get().runtime.output_dir)
        rundir.redact_hydra_files(new_dir)
        checker = curve_check(history, rtol) if history is not None else None
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
        result = compare_runs(original_dir, new_dir, metrics, rtol)
        rundir.write_json(new_dir / "reproduce.json", {"original": str(original_dir)} | result)
        _print(result, original_dir, new_dir)
        outcome["code"] = 0 if result["ok"] else 1

    from tuneforge.config.compose import hydra_args

    sys.argv = ["tuneforge reproduce"] + hydra_args(args)
    hydra.main(version_base="1.3", config_path=config_dir, config_name="reproduce")(app)()
    return outcome["code"]


def _print(result: dict, original_dir: Path, new_dir: Path) -> None:
    """The table of every compared quantity, then the verdict and what it rests on."""
    rows = result["rows"]
    names = [r["metric"] + (" (max |w|)" if r["kind"] == "weights" else "") for r in rows]
    width = max([len("compared"), *map(len, names)])
    print(f"{'step':>6} {'compared':<{width}} {'original':>14} {'reproduced':>14} {'rel diff':>10}")
    for r, name in zip(rows, names):
        new = "missing" if r["reproduced"] is None else f"{r['reproduced']:.8g}"
        rel = "-" if r["rel_diff"] is None else f"{r['rel_diff']:.2e}"
        step = "final" if r["step"] is None else r["step"]
        print(f"{step:>6} {name:<{width}} {r['original']:>14.8g} {new:>14} {rel:>10}")
    logged = [r for r in rows if r["kind"] == "logged"]
    weights = [r for r in rows if r["kind"] == "weights" and "max_abs_diff" in r]
    what = (f"{len(logged)} logged values at {len({r['step'] for r in logged})} step(s), "
            f"{sum(r['kind'] == 'final' for r in rows)} final metrics, "
            + (f"adapter weights ({sum(r['tensors'] for r in weights)} tensors, max |diff| "
               f"{max(r['max_abs_diff'] for r in weights):.3g})" if weights else "no adapter weights"))
    max_rel = "n/a" if result["max_rel_diff"] is None else f"{result['max_rel_diff']:.3g}"
    missing = f"; missing from the reproduction: {', '.join(result['missing'])}" if result["missing"] else ""
    print(f"reproduce --check: {'MATCH' if result['ok'] else 'MISMATCH'} (compared {what}; max relative difference "
          f"{max_rel}, tolerance {result['rtol']:g}{missing}) {original_dir} -> {new_dir}")


PARSER = parser("reproduce", "Re-run a run from its config.yaml into a new run directory; key=value overrides and "
                "Hydra flags as for `tuneforge train`.")
PARSER.add_argument("run_dir", help="the run directory to reproduce")
PARSER.add_argument("--check", action="store_true",
                    help="compare every logged metric, the final metrics and the adapter weights; exit 1 unless they "
                         "match")
PARSER.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of --check (default 1e-4)")
main = argparse_main("reproduce", PARSER, _reproduce, known_only=False)
COMMAND = Command("reproduce", "re-run a run from its config.yaml into a new run directory", main,
                  "tuneforge reproduce RUN_DIR [overrides] [--check]  (--check: exit 1 unless metrics and weights "
                  "match)")
