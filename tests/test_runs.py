"""Run records without training: secret redaction, checkpoint completeness, resume rules, run-dir rules,
atomic adapter writes, the NaN guard's decisions, sweep reports and reproduce comparisons."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import cli_in_process
from tuneforge.commands import report, reproduce
from tuneforge.config.compose import load_config
from tuneforge.config.errors import ConfigError
from tuneforge.runs import checkpoints, manifest, redaction, rundir
from tuneforge.runs.faults import StopOnNaN
from tuneforge.runs.objective import objective

# --- secrets ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["model.token", "hf_token", "token", "wandb_api_key", "x.auth_token", "+model.token"])
def test_secret_keys(key):
    assert redaction.is_secret_key(key)


@pytest.mark.parametrize("key", ["tokenizer.pad_token", "eos_token", "add_special_tokens", "tokenizer", "max_tokens",
                                 "tokens_seen"])
def test_not_secret_keys(key):
    assert not redaction.is_secret_key(key)


def test_redact_config_and_command_line():
    cfg = {"model": {"token": "hf_abc", "name_or_path": "x"}, "tokenizer": {"pad_token": "<unk>"},
           "overrides": ["model.token=hf_abc", "train.seed=1"], "none": {"token": None}}
    out = redaction.redact(cfg)
    assert out["model"]["token"] == redaction.REDACTED and out["model"]["name_or_path"] == "x"
    assert out["tokenizer"]["pad_token"] == "<unk>" and out["none"]["token"] is None
    assert out["overrides"] == [f"model.token={redaction.REDACTED}", "train.seed=1"]
    line = redaction.command_line(["tuneforge train", "model.token=hf_abc", "train.seed=1"])
    assert "hf_abc" not in line and "train.seed=1" in line


def test_write_config_redacts(tmp_path):
    rundir.write_config(tmp_path, OmegaConf.create({"model": {"token": "hf_secret"}, "hydra": {"x": 1}}))
    text = (tmp_path / "config.yaml").read_text()
    assert "hf_secret" not in text and redaction.REDACTED in text and "hydra" not in text


def test_redact_hydra_files(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- model.token=hf_secret\n- train.seed=3\n")
    (tmp_path / ".hydra" / "config.yaml").write_text("model:\n  token: hf_secret\n")
    rundir.redact_hydra_files(tmp_path)
    for name in ("overrides.yaml", "config.yaml"):
        text = (tmp_path / ".hydra" / name).read_text()
        assert "hf_secret" not in text and redaction.REDACTED in text
    assert "train.seed=3" in (tmp_path / ".hydra" / "overrides.yaml").read_text()


# --- run directories, checkpoints, resume --------------------------------------------------------------------

def _checkpoint(run_dir: Path, step: int, complete: bool = True, missing: str = "") -> Path:
    ckpt = run_dir / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    import torch
    from safetensors.torch import save_file

    # Files in their real formats: a resume checks each is whole (checkpoints.file_problem).
    writers = {"adapter_model.safetensors": lambda p: save_file({"w": torch.zeros(2)}, str(p)),
               "optimizer.pt": lambda p: torch.save({"state": {}}, p), "scheduler.pt": lambda p: torch.save({}, p),
               "trainer_state.json": lambda p: p.write_text("{}")}
    for name, write in writers.items():
        if name != missing:
            write(ckpt / name)
    if not complete:
        (ckpt / "trainer_state.json").write_text('{"log_hist')
    return ckpt


def test_latest_complete_checkpoint_skips_half_written(tmp_path):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 4, missing="trainer_state.json")
    _checkpoint(tmp_path, 12, missing="adapter_model.safetensors")
    _checkpoint(tmp_path, 14, complete=False)
    assert checkpoints.latest_complete_checkpoint(tmp_path).name == "checkpoint-10"  # numeric order, not text order
    assert "trainer_state.json" in checkpoints.checkpoint_problem(tmp_path / "checkpoint-4")
    assert "weights" in checkpoints.checkpoint_problem(tmp_path / "checkpoint-12")
    assert "truncated" in checkpoints.checkpoint_problem(tmp_path / "checkpoint-14")


def test_resolve_resume(tmp_path):
    assert checkpoints.resolve_resume(None, tmp_path) is None
    assert checkpoints.resolve_resume("False", tmp_path) is None
    assert checkpoints.resolve_resume("auto", tmp_path) is None  # nothing yet: a fresh start
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        checkpoints.resolve_resume("True", tmp_path)
    good = _checkpoint(tmp_path, 3)
    _checkpoint(tmp_path, 5, missing="optimizer.pt")
    assert checkpoints.resolve_resume("auto", tmp_path) == str(good)
    assert checkpoints.resolve_resume("true", tmp_path) == str(good)
    with pytest.raises(ConfigError, match="optimizer.pt"):
        checkpoints.resolve_resume(str(tmp_path / "checkpoint-5"), tmp_path)


def test_run_dir_rules(tmp_path):
    run = tmp_path / "run"
    rundir.claim_run_dir(run)
    rundir.write_config(run, OmegaConf.create({"a": 1}))
    with pytest.raises(ConfigError, match="already holds a run.*resume_from_checkpoint=auto"):
        rundir.check_run_dir_free(run)
    rundir.check_run_dir_free(run, resume="auto")  # unfinished: resuming into it is allowed
    (run / "adapter").mkdir()
    (run / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match="finished run"):
        rundir.check_run_dir_free(run, resume="auto")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        rundir.check_run_dir_free(blocker / "run")


def test_atomic_dir_leaves_nothing_half_written(tmp_path):
    final = tmp_path / "adapter"
    with pytest.raises(OSError):
        with rundir.atomic_dir(final) as tmp:
            (tmp / "adapter_model.safetensors").write_text("half")
            raise OSError(28, "No space left on device")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with rundir.atomic_dir(final) as tmp:
        (tmp / "adapter_model.safetensors").write_text("whole")
    assert (final / "adapter_model.safetensors").read_text() == "whole"


def test_free_space_check(tmp_path):
    rundir.check_free_space(tmp_path, 1)
    with pytest.raises(ConfigError, match="MiB free"):
        rundir.check_free_space(tmp_path, 1 << 60)
    assert rundir.estimate_run_bytes(1_000_000, 2) == 4_000_000 * 7 + (64 << 20)


def test_run_keys_validated():
    assert load_config(["train.report_to=none"]).train.report_to == []
    assert load_config(["train.report_to=[tensorboard]"]).train.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="Did you mean 'tensorboard'"):
        load_config(["train.report_to=tensorbord"])
    with pytest.raises(ConfigError, match="nan_patience"):
        load_config(["train.nan_patience=0"])
    cfg = load_config(["train.resume_from_checkpoint=auto"])
    assert cfg.train.resume_from_checkpoint == "auto" and cfg.train.save_strategy == "steps"
    # A checkpoint path that does not exist fails with the config, before any weights load.
    with pytest.raises(ConfigError, match="no such checkpoint directory"):
        load_config(["train.resume_from_checkpoint=/no/such/checkpoint-3"])


def test_manifest_environment_and_objective(tmp_path):
    env = manifest.environment()
    assert set(manifest.PACKAGES) <= set(env["packages"]) and env["packages"]["torch"]
    assert env["device"]["type"] in ("cpu", "cuda") and env["world_size"] >= 1 and env["python"]
    m = {"eval_after": {"exact_match": 0.5}, "train_loss": 1.0, "log_history": [{"eval_loss": 2.0, "step": 1}]}
    assert objective(m, "exact_match") == 0.5
    assert objective(m, "train_loss") == 1.0
    assert objective(m, "eval_loss") == 2.0
    assert objective(m, "rouge_l") is None


# --- NaN guard ---------------------------------------------------------------------------------------------

def test_nan_guard_skips_bad_updates_and_stops_after_patience():
    model = torch.nn.Linear(2, 2)
    guard = StopOnNaN(patience=2)
    state = SimpleNamespace(global_step=4)

    def step(value):
        for p in model.parameters():
            p.grad = torch.full_like(p, value)
        control = SimpleNamespace(should_training_stop=False, should_save=True)
        guard.on_pre_optimizer_step(None, state, control, model=model)
        state.global_step += 1
        return guard.on_step_end(None, state, control)

    assert not step(1.0).should_training_stop and model.weight.grad is not None
    control = step(math.nan)
    assert not control.should_training_stop and model.weight.grad is None  # update skipped, weights kept
    control = step(math.inf)
    assert control.should_training_stop and not control.should_save
    assert guard.first_bad_step == 6 and guard.tripped_at == 7


def test_nan_guard_counts_huge_finite_gradients_as_finite():
    """The fused norm overflows on finite gradients above ~1e19; the guard then checks tensor by tensor."""
    from tuneforge.runs.faults import all_finite

    assert all_finite([torch.full((4,), 1e30), torch.ones(3)])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, math.nan])])
    assert not all_finite([torch.tensor([math.inf]), torch.ones(3)])


# --- reproduce and report ---------------------------------------------------------------------------------

def test_compare_curves_and_version_differences():
    a = [{"loss": 1.0, "grad_norm": 2.0, "step": 1}, {"loss": 0.5, "step": 2},
         {"train_loss": 0.7, "train_runtime": 3.2, "train_samples_per_second": 9.0, "step": 2}]
    same = [{"loss": 1.0 + 1e-6, "grad_norm": 2.0, "step": 1}, {"loss": 0.5, "step": 2},
            {"train_loss": 0.7, "train_runtime": 5.0, "step": 2}]  # timings differ: never compared
    good = reproduce.compare_curves(a, same, 1e-4)
    assert good["ok"] and {(r["metric"], r["step"]) for r in good["rows"]} == {
        ("loss", 1), ("grad_norm", 1), ("loss", 2), ("train_loss", 2)}
    bad = reproduce.compare_curves(a, [{"loss": 1.1, "grad_norm": 2.0, "step": 1}], 1e-4)
    assert not bad["ok"] and bad["missing_steps"] == [2] and bad["max_rel_diff"] == pytest.approx(0.1)
    nan = reproduce.compare_curves(a, [dict(h, loss=float("nan")) if "loss" in h else h for h in same], 1e-4)
    assert not nan["ok"]
    assert not reproduce.verdict([], 1e-4)["ok"]  # nothing compared is no match
    weights = {"kind": "weights", "metric": "adapter/x.safetensors", "step": None, "original": 1.0,
               "reproduced": float("nan"), "rel_diff": float("nan")}
    assert not reproduce.verdict([weights], 1e-4)["ok"]  # NaN weights fail the `<=`
    now = manifest.environment()
    old = json.loads(json.dumps(now))
    old["packages"]["trl"] = "0.0.1"
    old["device"] = {"type": "cuda", "name": "H100"}
    lines = reproduce.version_differences(old, now)
    assert any(line.startswith("trl: run 0.0.1") for line in lines) and any("device" in line for line in lines)


def _job(sweep: Path, num: int, overrides: list[str], metrics: dict | None = None, failed: str | None = None):
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (d / "config.yaml").write_text("eval:\n  metric: exact_match\n")
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    if failed:
        (d / "failed.json").write_text(json.dumps({"error": failed}))


def test_report_on_a_partially_failed_sweep(tmp_path):
    def metrics(em, losses):
        return {"eval_after": {"exact_match": em}, "train_loss": sum(losses) / len(losses),
                "last_logged_loss": losses[-1], "log_history": [{"loss": v, "step": i + 1} for i, v in enumerate(losses)]}

    _job(tmp_path, 0, ["train.learning_rate=1e-4", "peft.r=8"], metrics(0.2, [1.0, 0.8]))
    _job(tmp_path, 1, ["train.learning_rate=3e-4", "peft.r=8"], metrics(0.6, [1.0, 0.4]))
    _job(tmp_path, 2, ["train.learning_rate=1e-4", "peft.r=16"], failed="RuntimeError: boom")
    _job(tmp_path, 3, ["train.learning_rate=3e-4", "peft.r=16"])  # killed: no metrics, no failed.json
    result = report.report(tmp_path)
    assert result["metric"] == "exact_match" and result["direction"] == "maximize"
    assert [r[1] for r in result["rows"]] == ["1", "0", "2", "3"]  # best first, then the failed/unfinished
    md = (tmp_path / "report.md").read_text()
    assert "| train.learning_rate | peft.r |" not in md  # columns sorted by name
    assert "| peft.r | train.learning_rate | exact_match |" in md and "RuntimeError: boom" in md
    assert "2 finished, 1 failed, 1 incomplete" in md
    rows = (tmp_path / "report.csv").read_text().splitlines()
    assert rows[0].startswith("rank,job,status,peft.r,train.learning_rate,exact_match") and len(rows) == 5
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert report.main([str(tmp_path), "--metric", "last_logged_loss"]) == 0
    assert report.build_table(report.load_jobs(tmp_path), "last_logged_loss")[1][0][1] == "1"


def test_report_command_on_a_non_sweep_directory(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "holds no sweep jobs" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "is not a directory; pass a multirun directory" in capsys.readouterr().err


def test_optuna_sweeper_config_composes_with_a_direction(tmp_path):
    result = cli_in_process("train", "hydra/sweeper=optuna", "hydra.sweeper.direction=maximize",
                            "hydra.sweeper.n_trials=2", "--cfg", "hydra", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "direction: maximize" in result.stdout and "OptunaSweeper" in result.stdout
