"""Runs you can trust, through the real CLI: manifest and secrets, reproduce --check, SIGKILL + resume
equivalence, SIGTERM checkpoint, NaN stop, and a grid sweep with one failed job + its report.

The fault tests train a tiny random model built from the embedded model's config (2 layers, width 64) with
its real tokenizer: they test the run machinery, and each step costs milliseconds instead of seconds. The
sweep test uses the embedded model itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, cli_in_process, logged_losses, run_cli

pytestmark = pytest.mark.slow

SECRET = "hf_tuneforgeTESTsecret123"
ENV_SECRET = "wandbTESTsecret456"
HF_ENV_SECRET = "hf_tuneforgeENVsecret789"


def _args(model: str, *extra: str) -> list[str]:
    return [f"model.name_or_path={model}", "train.max_steps=6", "train.save_steps=2", "train.logging_steps=1",
            "train.per_device_train_batch_size=4", "train.warmup_steps=1", "train.learning_rate=3e-3",
            "data.max_samples=48", "eval.before_after=false", "quant=none", *extra]


def _hooked(*args: str) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process (a kill or a signal stops only it), with tests/ importable, for
    `callbacks=[tests.fault_hooks:...]`."""
    return run_cli(*args, env_extra={"PYTHONPATH": str(REPO)})



@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_model):
    run_dir = tmp_path_factory.mktemp("base") / "run"
    result = subprocess.run([str(Path(sys.executable).with_name("tuneforge")), "train",
                             *_args(tiny_model, f"model.token={SECRET}", f"hydra.run.dir={run_dir}")],
                            cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "WANDB_API_KEY": ENV_SECRET, "HF_TOKEN": HF_ENV_SECRET})
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_manifest_contents(baseline, tiny_model):
    manifest = json.loads((baseline / "manifest.json").read_text())
    assert manifest["tuneforge"] and manifest["python"] and manifest["status"] == "finished"
    assert set(manifest["packages"]) == {"torch", "transformers", "trl", "peft", "datasets", "accelerate",
                                         "bitsandbytes", "hydra-core"}
    assert all(manifest["packages"].values())
    assert manifest["device"]["type"] == "cpu" and manifest["world_size"] == 1 and manifest["seed"] == 42
    assert len(manifest["data"]["fingerprint"]) == 20  # the data cache key
    metrics = json.loads((baseline / "metrics.json").read_text())
    assert manifest["tokenizer"]["content_hash"] == metrics["tokenizer"]["content_hash"]
    assert manifest["command"].startswith("tuneforge train") and "train.max_steps=6" in manifest["command"]
    if (REPO / ".git").exists():
        assert len(manifest["git"]["commit"]) == 40 and isinstance(manifest["git"]["dirty"], bool)
    assert (baseline / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(baseline.glob("adapter/*.bin")) and not list(baseline.glob(".adapter-*"))  # no pickles
    assert [p.name for p in sorted(baseline.glob("checkpoint-*"))] == ["checkpoint-4", "checkpoint-6"]  # limit 2


def test_no_secret_in_any_file(baseline):
    """model.token on the command line, HF_TOKEN and WANDB_API_KEY in the environment: in no file of the run."""
    files = [p for p in baseline.rglob("*") if p.is_file()]
    leaked = [str(p) for p in files if any(s.encode() in p.read_bytes() for s in (SECRET, ENV_SECRET, HF_ENV_SECRET))]
    assert not leaked
    names = {p.relative_to(baseline).as_posix() for p in files}
    for scanned in ("config.yaml", "manifest.json", "train.log", ".hydra/config.yaml", ".hydra/hydra.yaml",
                    ".hydra/overrides.yaml"):
        assert scanned in names
    assert any(p.name.startswith("events.out.tfevents") for p in files)  # TensorBoard's event files too
    assert "REDACTED" in (baseline / "config.yaml").read_text()
    assert "REDACTED" in (baseline / "manifest.json").read_text()
    assert "REDACTED" in (baseline / ".hydra" / "overrides.yaml").read_text()


def test_reproduce_check_passes_as_is_and_fails_with_another_seed(baseline, tmp_path):
    same = run_cli("reproduce", str(baseline), "--check", f"hydra.run.dir={tmp_path / 'same'}")
    assert same.returncode == 0, same.stdout[-3000:] + same.stderr[-3000:]
    assert "reproduce --check: MATCH" in same.stdout
    check = json.loads((tmp_path / "same" / "reproduce.json").read_text())
    assert check["ok"] and check["max_rel_diff"] <= 1e-4 and not check["missing"]
    compared = {(r["kind"], r["metric"], r["step"]) for r in check["rows"]}
    assert {("logged", k, s) for k in ("loss", "grad_norm", "learning_rate") for s in range(1, 7)} <= compared
    assert ("final", "train_loss", None) in compared
    assert ("weights", "adapter/adapter_model.safetensors", None) in compared
    assert not any("runtime" in r["metric"] or "per_second" in r["metric"] for r in check["rows"])
    assert json.loads((tmp_path / "same" / "manifest.json").read_text())["reproduced_from"] == str(baseline)
    other = run_cli("reproduce", str(baseline), "--check", "train.seed=7", f"hydra.run.dir={tmp_path / 'other'}")
    assert other.returncode == 1
    assert "MISMATCH" in other.stdout and "stopping" in other.stdout + other.stderr


def test_reproduce_check_of_a_run_shorter_than_logging_steps(tiny_model, tmp_path):
    """max_steps=2 with logging every 5: the log history holds only the final summary. --check still compares
    the final train loss, the values logged at the last step and the adapter weights, and says so."""
    run_dir = tmp_path / "short"
    first = cli_in_process("train", *_args(tiny_model, "train.max_steps=2", "train.logging_steps=5",
                                           "data.max_samples=16", f"hydra.run.dir={run_dir}"))
    assert first.returncode == 0, first.stderr[-3000:]
    same = run_cli("reproduce", str(run_dir), "--check", f"hydra.run.dir={tmp_path / 'again'}")
    assert same.returncode == 0, same.stdout[-3000:] + same.stderr[-3000:]
    check = json.loads((tmp_path / "again" / "reproduce.json").read_text())
    assert check["ok"] and not check["missing"]
    rows = {(r["kind"], r["metric"]): r for r in check["rows"]}
    assert rows[("final", "train_loss")]["rel_diff"] <= 1e-4 and rows[("logged", "train_loss")]["step"] == 2
    weights = rows[("weights", "adapter/adapter_model.safetensors")]
    assert weights["tensors"] > 0 and weights["max_abs_diff"] <= 1e-6
    assert not any(r["kind"] == "logged" and r["metric"] == "loss" for r in check["rows"])  # none was logged
    verdict = [line for line in same.stdout.splitlines() if line.startswith("reproduce --check:")]
    assert len(verdict) == 1 and "MATCH" in verdict[0] and "MISMATCH" not in verdict[0]
    assert "final metrics" in verdict[0] and "adapter weights" in verdict[0] and "n/a" not in verdict[0]
    assert "train_loss" in same.stdout and "adapter/adapter_model.safetensors" in same.stdout  # the table


def test_sigkill_then_resume_equals_an_uninterrupted_run(baseline, tiny_model, tmp_path):
    """kill -9 right after checkpoint-2, resume (auto); SIGTERM the resumed run at step 3 (checkpoint + exit 143),
    resume again: same losses at every step and the same adapter as the uninterrupted baseline. The faults come
    from TrainerCallbacks at known steps (tests/fault_hooks.py), so nothing depends on timing."""
    run_dir = tmp_path / "run"
    args = ["train", *_args(tiny_model, f"hydra.run.dir={run_dir}")]
    killed = _hooked(*args, "callbacks=[tests.fault_hooks:KillAfterCheckpoint2]")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (run_dir / "checkpoint-2" / "trainer_state.json").is_file() and not (run_dir / "adapter").exists()

    again = cli_in_process(*args)  # the same command without resume: refused, nothing overwritten
    assert again.returncode == 2 and "resume_from_checkpoint=auto" in again.stderr

    resumed = _hooked(*args, "train.resume_from_checkpoint=auto", "callbacks=[tests.fault_hooks:TermAtStep3]")
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 143, out[-3000:]
    assert "train.resume_from_checkpoint=auto" in out and "checkpoint saved" in out
    stopped_at = max(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))
    assert stopped_at == 3 and not (run_dir / "adapter").exists()

    final = cli_in_process(*args, "train.resume_from_checkpoint=auto")
    assert final.returncode == 0, final.stderr[-3000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [r["from"].rsplit("-", 1)[1] for r in manifest["resumed"]] == ["2", "3"]

    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (baseline, run_dir))
    assert abs(ma["train_loss"] - mb["train_loss"]) <= 1e-4 * ma["train_loss"]  # over the whole run
    assert ma["tokens_seen"] == mb["tokens_seen"] and mb["train_steps"] == 6
    a, b = logged_losses(baseline), logged_losses(run_dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    rel = {s: abs(a[s] - b[s]) / abs(a[s]) for s in a}
    assert max(rel.values()) <= 1e-4, rel
    wa = load_file(str(baseline / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"resume equivalence: final loss rel diff {rel[6]:.3g}, max rel diff {max(rel.values()):.3g}, "
          f"max abs adapter diff {diff:.3g}")
    assert diff <= 1e-5


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    proc = cli_in_process("train", *_args(tiny_model, "train.save_steps=1", f"hydra.run.dir={run_dir}"),
                          "callbacks=[tests.fault_hooks:NanFromStep3]")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-3000:]
    assert "became NaN/inf at step 3" in out and "checkpoint-2" in out and "learning_rate" in out
    assert [p.name for p in sorted(run_dir.glob("checkpoint-*"))] == ["checkpoint-1", "checkpoint-2"]
    assert not (run_dir / "adapter").exists() and not (run_dir / "metrics.json").exists()
    failed = json.loads((run_dir / "failed.json").read_text())
    assert "Diverged" in failed["error"]
    state = json.loads((run_dir / "checkpoint-2" / "trainer_state.json").read_text())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in state["log_history"] if "loss" in h)


def test_grid_sweep_with_a_failed_job_and_its_report(tmp_path):
    """Embedded model, a 2-job grid: one job trains, the other fails when it runs (every value passes validation
    before the sweep starts: a bad value would stop the whole sweep in one line); the sweep goes on (exit 0) and
    the report lists both, the finished one ranked."""
    sweep = tmp_path / "sweep"
    result = cli_in_process("train", "-m", "model.name_or_path=embedded:smollm2-135m-instruct,embedded:no-such-model",
                            "train.max_steps=2", "train.logging_steps=1",
                            "train.per_device_train_batch_size=2", "data.max_samples=48", "eval.before_after=false",
                            "quant=none", "peft.target_modules=[q_proj,v_proj]", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (sweep / "0" / "metrics.json").is_file() and (sweep / "0" / "manifest.json").is_file()
    assert "unknown embedded model" in json.loads((sweep / "1" / "failed.json").read_text())["error"]
    rep = cli_in_process("report", str(sweep))
    assert rep.returncode == 0, rep.stderr[-3000:]
    md = (sweep / "report.md").read_text()
    assert "1 finished, 1 failed" in md and "| rank | job | status | model.name_or_path | last_logged_loss |" in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    # Hydra escapes the colon of an override value: embedded\:...
    assert any(r.startswith("| 1 | 0 | ok | embedded\\:smollm2-135m-instruct |") for r in rows), md
    assert any(r.startswith("|  | 1 | failed | embedded\\:no-such-model |") for r in rows), md
    lines = (sweep / "report.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[-1].split(",")[2] == "failed"
    assert (sweep / "report.png").stat().st_size > 10_000
