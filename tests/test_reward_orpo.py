"""ORPO (task=orpo) end to end on the tiny model: its plumbing (TRL's experimental trainer on the prepared pairs) and
its refusals (one line, before weights load).

Every run trains the tiny random model built from the embedded model's config with its real tokenizer
(tests/conftest.py); the demos' learning on the embedded model is measured by the demos themselves (README)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from tests.conftest import cli_in_process
from tuneforge.config.errors import ConfigError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def orpo_run(tmp_path_factory, tiny_model):
    run_dir = tmp_path_factory.mktemp("orpo") / "run"
    result = cli_in_process("train", "recipe=orpo-demo", f"model.name_or_path={tiny_model}", "train.max_steps=3",
                            "train.logging_steps=1", "train.learning_rate=1e-2", "data.builtin_rows=40",
                            "eval.num_samples=4", "eval.max_new_tokens=4", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_orpo_plumbing(orpo_run):
    """TRL's experimental ORPOTrainer on the prepared pairs: its odds-ratio and NLL terms logged every step, the
    adapter trained, held-out preference accuracy and generations scored before and after, tokens counted."""
    run_dir, result = orpo_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    logged = [h for h in metrics["log_history"] if "loss" in h]
    assert [h["step"] for h in logged] == [1, 2, 3]
    assert all({"nll_loss", "log_odds_ratio", "rewards/accuracies"} <= set(h) for h in logged)
    assert metrics["tokens_seen"] > 0 and {"eval_rewards/accuracies", "eval_log_odds_ratio"} <= set(metrics)
    for side in ("preference_before", "preference_after"):
        assert 0.0 <= metrics[side]["preference_accuracy"] <= 1.0
    assert metrics["eval_samples"] == 4 and "exact_match" in metrics["eval_after"]
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert max(v.abs().max().item() for k, v in saved.items() if "lora_B" in k) > 0  # B starts at zero
    out = result.stdout + result.stderr
    assert "TRL marks it experimental" in out and "You are importing from 'trl.experimental'" not in out
    assert "Held-out preference pairs (4" in result.stdout


def test_orpo_refuses_what_its_trainer_cannot_run(tmp_path):
    result = cli_in_process("train", "recipe=orpo-demo", "train.generate_during_eval=true", cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 2 and "ORPOTrainer samples from the prompt" in out, out[-2000:]


def test_orpo_needs_trl_experimental_orpo(monkeypatch):
    """A TRL without trl.experimental.orpo (TRL may move or drop experimental trainers): task=orpo is refused by name
    with what to install, and every other task still composes."""
    import dataclasses

    from tuneforge.config import tasks
    from tuneforge.config.compose import load_config

    moved = dataclasses.replace(tasks.TASKS["orpo"], trainer_config="trl.experimental.orpo_gone:ORPOConfig")
    monkeypatch.setitem(tasks.TASKS, "orpo", moved)
    with pytest.raises(ConfigError, match=r"task=orpo trains with trl\.experimental\.orpo_gone\.ORPOConfig, but the "
                                          r"installed trl .* has no ORPOConfig"):
        load_config(["recipe=orpo-demo"])
    assert load_config(["recipe=dpo-demo"]).task == "dpo"


def test_a_run_saved_before_orpo_and_reward_reads_back(tmp_path):
    """ORPOConfig in the task table made train.max_completion_length's default null (GRPO's 512 is its library
    default again); a run saved before, holding the key at its old default, still reads back (infer, resume,
    reproduce)."""
    from omegaconf import OmegaConf

    from tuneforge.config.compose import load_config
    from tuneforge.runs import rundir

    saved = OmegaConf.structured(load_config(["recipe=dpo-demo"]))
    saved.train.max_completion_length = 512
    OmegaConf.save(saved, tmp_path / rundir.CONFIG_FILE)
    assert rundir.run_config(tmp_path).train.max_completion_length is None
