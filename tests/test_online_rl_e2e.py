"""Online RL end to end (task=grpo|rloo): the grpo-demo recipe's plumbing through the real CLI (QLoRA, the reward
doctor, TRL's reward metrics, the console line, the before/after table, run directory, model card), what training
changes (every LoRA parameter, never the base; the reference = adapter off), the refusals (a reward that does not
import, a wrong output at the first batch, no signal before and during training), SIGKILL + resume, reproduce
--check.

Every run trains the tiny random model built from the embedded model's config with its real tokenizer
(tests/conftest.py): these tests check the machinery; the demo's learning is measured by the demo itself. The tiny
model never writes a date, so the runs that must learn are rewarded by a user's reward file in the working directory
(its completions' lengths differ, so groups have signal), which also checks that such files import."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import set_seed

from tests.conftest import REPO, cli_in_process, run_cli

pytestmark = pytest.mark.slow

REWARDS = ("def length(prompts, completions, **columns):\n"
           "    return [len(c) / 50 for c in completions]\n"
           "def constant(prompts, completions, **columns):\n"
           "    return [1.0 for _ in completions]\n"
           "def wrong_length(prompts, completions, **columns):\n"
           "    return [1.0, 0.0]\n")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The working directory of the runs: a user's reward file beside them."""
    path = tmp_path_factory.mktemp("rl_work")
    (path / "rl_test_rewards.py").write_text(REWARDS)
    return path


def _args(model: str, run_dir: Path, *extra: str) -> list[str]:
    # QLoRA (the demo recipe trains unquantized on a CPU for speed): the 4-bit path is the one to test.
    return ["train", "recipe=grpo-demo", "quant=nf4", f"model.name_or_path={model}", "train.max_steps=4",
            "train.save_steps=2",
            "train.num_generations=2", "train.per_device_train_batch_size=4", "train.max_completion_length=6",
            "data.builtin_rows=40", "doctor.reward_prompts=2", "eval.num_samples=2", "eval.max_new_tokens=6",
            "rewards=[{name:iso_date,kwargs:{column:answer}},{name:'rl_test_rewards:length',weight:0.5}]",
            f"hydra.run.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tiny_model, workdir):
    """The demo recipe on a 4-bit base (LoRA, the iso_date reward) plus the user's reward, four steps on the tiny
    model."""
    run_dir = tmp_path_factory.mktemp("grpo") / "run"
    result = cli_in_process(*_args(tiny_model, run_dir), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_demo_recipe_plumbing(grpo_run):
    run_dir, result = grpo_run
    for name in ("config.yaml", "manifest.json", "metrics.json", "predictions.jsonl", "predictions_before.jsonl",
                 "README.md", "loss.png", "doctor.json", "reward_doctor.json", "adapter/adapter_model.safetensors"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train_steps"] == 4 and metrics["tokens_seen"] > 0
    logged = [h for h in metrics["log_history"] if "reward" in h]
    assert [h["step"] for h in logged] == [1, 2, 3, 4]
    for h in logged:
        assert {"rewards/iso_date/mean", "rewards/length/mean", "frac_reward_zero_std", "completions/mean_length",
                "completions/clipped_ratio"} <= set(h)
        assert 0.0 <= h["frac_reward_zero_std"] <= 1.0 and torch.isfinite(torch.tensor(h["reward"]))
    doctor = metrics["reward_doctor"]
    assert (doctor["prompts"], doctor["generations"]) == (2, 2) and set(doctor["rewards"]) == {"iso_date", "length",
                                                                                                "total"}
    assert doctor["no_signal_fraction"] < 1.0 and 0.0 <= doctor["clipped_fraction"] <= 1.0
    for side in ("eval_before", "eval_after"):
        assert set(metrics[side]) == {"reward", "rewards/iso_date", "rewards/length", "exact_match",
                                      "normalized_exact_match", "rouge_l"}
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2 and all(len(p["reference"]) == 10 for p in predictions)  # the ISO date
    out = result.stdout + result.stderr
    assert out.count("the loss is ~0 by construction") == 1 and "step 4/4: reward" in out
    assert "reward doctor: 2 prompts x 2 completions" in out and "Held-out prompts (2, greedy" in out
    card = (run_dir / "README.md").read_text()
    assert "rewards/iso_date" in card and "recipe=grpo-demo" in card
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "finished"


def _trained(tiny_model: str, workdir: Path, run_dir: Path, *overrides: str, steps: int = 2):
    """The online-RL stages as lifecycle.run calls them, trained `steps` steps in this process: (task, model, trainer,
    the adapter and base weights before training)."""
    import os

    from tuneforge.config import library_args
    from tuneforge.config.compose import load_config
    from tuneforge.tasks.online_rl import OnlineRL
    from tuneforge.tasks.stages import stages_class

    cfg = load_config(["recipe=grpo-demo", f"model.name_or_path={tiny_model}", "quant=none",
                       f"train.max_steps={steps}", "train.learning_rate=5e-2", "train.warmup_steps=0",
                       "train.num_generations=4", "train.per_device_train_batch_size=8",
                       "train.max_completion_length=6", "train.save_strategy=no", "train.report_to=none",
                       "data.builtin_rows=40", "eval.before_after=false", "doctor.reward_prompts=0",
                       "rewards=[{name:'rl_test_rewards:length'}]", *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = Path.cwd()
    os.chdir(workdir)
    try:
        task: OnlineRL = stages_class(cfg.task)(cfg, run_dir, True)
        task.prepare()
        task.check()
        set_seed(cfg.train.seed)
        model = task.build_model()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = task.build_trainer(model, library_args.trainer_arguments(cfg, run_dir), [])
        trainer.train()
    finally:
        os.chdir(previous)
    return task, model, trainer, before


@pytest.mark.parametrize("task", ["grpo", "rloo"])
def test_every_lora_parameter_changes_and_the_base_does_not(tiny_model, workdir, tmp_path, task):
    """TRL's own test of its GRPO/RLOO trainers with PEFT (two steps: LoRA's B starts at 0, so A moves from the
    second), with beta > 0: the reference is the base (adapter off), never a second copy, and the KL to it is
    logged."""
    _, model, trainer, before = _trained(tiny_model, workdir, tmp_path, f"task={task}", "train.beta=0.1")
    assert type(trainer).__name__ == {"grpo": "GRPOTrainer", "rloo": "RLOOTrainer"}[task]
    assert "ref" not in model.peft_config  # TRL's copy of a fresh adapter is not kept: adapter off is the base
    changed = {n: not torch.equal(before[n], p) for n, p in model.named_parameters()}
    lora = [n for n in changed if "lora_" in n]
    assert lora and all(changed[n] for n in lora), [n for n in lora if not changed[n]]
    assert not any(changed[n] for n in changed if "lora_" not in n)
    logged = [h for h in trainer.state.log_history if "kl" in h]
    assert logged and all(torch.isfinite(torch.tensor(h["kl"])) for h in logged)
    assert logged[-1]["kl"] > 0  # the policy moved away from the (unchanged) base


def test_a_reward_that_does_not_import_is_refused_before_weights_load(tiny_model, workdir, tmp_path):
    result = cli_in_process(*_args(tiny_model, tmp_path / "run", "rewards=[{name:'rl_test_rewards:missing'}]"),
                            cwd=workdir)
    assert result.returncode == 2
    out = result.stdout + result.stderr
    assert "rewards[0].name: module 'rl_test_rewards'" in out and "has no 'missing'" in out
    assert "Loaded" not in out  # no weights loaded


def test_a_wrong_reward_output_stops_at_the_first_batch_naming_the_reward(tiny_model, workdir, tmp_path):
    result = cli_in_process(*_args(tiny_model, tmp_path / "run", "doctor.reward_prompts=0",
                                   "rewards=[{name:'rl_test_rewards:wrong_length'}]"), cwd=workdir)
    assert result.returncode == 2
    assert "reward 'wrong_length' (rewards[0]) at step 0 returned 2 values for 4 completions" in result.stdout + result.stderr


def test_a_constant_reward_is_refused_by_the_reward_doctor_and_stopped_in_training(tiny_model, workdir, tmp_path):
    constant = "rewards=[{name:'rl_test_rewards:constant'}]"
    refused = cli_in_process(*_args(tiny_model, tmp_path / "a", constant), cwd=workdir)
    assert refused.returncode == 2
    assert "the reward doctor: 100% of 2 prompt groups (2 completions each) scored alike" in refused.stdout + refused.stderr
    assert not list((tmp_path / "a").glob("checkpoint-*"))  # refused before training
    doctor = cli_in_process(*["doctor" if a == "train" else a for a in _args(tiny_model, tmp_path / "d", constant)],
                            cwd=workdir)
    assert doctor.returncode == 1 and "reward signal" in doctor.stdout and "scored alike" in doctor.stdout
    stopped = cli_in_process(*_args(tiny_model, tmp_path / "b", constant, "doctor.reward_prompts=0",
                                    "train.no_signal_patience=2", "train.logging_steps=1"), cwd=workdir)
    assert stopped.returncode == 5, stopped.stderr[-3000:]
    assert "no learning signal: from step 1 to step 2" in stopped.stdout + stopped.stderr
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["status"] == "no_signal"


def test_sigkill_then_resume_equals_the_uninterrupted_grpo_run(grpo_run, tiny_model, workdir, tmp_path):
    baseline, _ = grpo_run
    run_dir = tmp_path / "run"
    args = _args(tiny_model, run_dir)
    # The fault hook imports from the repository; the package from its src/ (this checkout's, not another install).
    killed = run_cli(*args, "callbacks=[tests.fault_hooks:KillAfterCheckpoint2]", cwd=workdir,
                     env_extra={"PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (run_dir / "checkpoint-2" / "trainer_state.json").is_file() and not (run_dir / "adapter").exists()
    resumed = cli_in_process(*args, "train.resume_from_checkpoint=auto", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = {p: json.loads((p / "metrics.json").read_text())["log_history"] for p in (baseline, run_dir)}
    a, b = ({h["step"]: h["reward"] for h in history[p] if "reward" in h} for p in (baseline, run_dir))
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and a == b  # the same completions sampled after the resume
    wa = load_file(str(baseline / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5


def test_reproduce_check_of_a_grpo_run(grpo_run, workdir, tmp_path):
    baseline, _ = grpo_run
    # In this process, as the baseline was: reproduce runs the job in the process that checks it.
    same = cli_in_process("reproduce", str(baseline), "--check", f"hydra.run.dir={tmp_path / 'same'}", cwd=workdir)
    assert same.returncode == 0, same.stdout[-3000:] + same.stderr[-3000:]
    assert "reproduce --check: MATCH" in same.stdout
    compared = {(r["kind"], r["metric"]) for r in json.loads((tmp_path / "same" / "reproduce.json").read_text())["rows"]}
    assert {("logged", "reward"), ("logged", "rewards/length/mean"), ("final", "train_loss"),
            ("weights", "adapter/adapter_model.safetensors")} <= compared
