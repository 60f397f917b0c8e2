"""Reward models (task=reward) and ORPO (task=orpo) end to end on the tiny model: the reward-demo recipe's plumbing
(QLoRA, a one-output score head trained and saved with the adapter, pairwise accuracy rising), the saved reward model
reloaded in a fresh process scoring what the training process scored, ORPO's plumbing (TRL's experimental trainer on
the prepared pairs), a reward run as the reward of a GRPO run, and the refusals (one line, before weights load).

Every run trains the tiny random model built from the embedded model's config with its real tokenizer
(tests/conftest.py); the demos' learning on the embedded model is measured by the demos themselves (README)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import cli_in_process, run_cli
from tuneforge.config.errors import ConfigError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tiny_model):
    """The reward-demo recipe as the README runs it (4-bit base, LoRA, the new score head), ten steps on the tiny
    model at a learning rate that moves it."""
    run_dir = tmp_path_factory.mktemp("reward") / "run"
    result = cli_in_process("train", "recipe=reward-demo", f"model.name_or_path={tiny_model}", "train.max_steps=10",
                            "train.learning_rate=1e-2", "train.logging_steps=5", "train.save_steps=5",
                            "data.builtin_rows=120", "eval.num_samples=12", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


@pytest.fixture(scope="module")
def orpo_run(tmp_path_factory, tiny_model):
    run_dir = tmp_path_factory.mktemp("orpo") / "run"
    result = cli_in_process("train", "recipe=orpo-demo", f"model.name_or_path={tiny_model}", "train.max_steps=3",
                            "train.logging_steps=1", "train.learning_rate=1e-2", "data.builtin_rows=40",
                            "eval.num_samples=4", "eval.max_new_tokens=4", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_reward_head_trains_saves_and_pairwise_accuracy_rises(reward_run):
    run_dir, result = reward_run
    for name in ("config.yaml", "manifest.json", "metrics.json", "predictions.jsonl", "predictions_before.jsonl",
                 "README.md", "loss.png", "doctor.json", "adapter/adapter_model.safetensors"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train_steps"] == 10 and metrics["tokens_seen"] > 0 and metrics["eval_pairs"] == 12
    before, after = metrics["reward_before"], metrics["reward_after"]
    assert after["pairwise_accuracy"] > before["pairwise_accuracy"] and after["mean_margin"] > before["mean_margin"]
    assert after["pairwise_loss"] < before["pairwise_loss"]  # the Bradley-Terry loss RewardTrainer minimised
    logged = [h for h in metrics["log_history"] if "loss" in h]
    assert [h["step"] for h in logged] == [5, 10] and all({"accuracy", "margin"} <= set(h) for h in logged)
    # The head is trained in full and saved beside the LoRA matrices (PEFT's SEQ_CLS modules_to_save).
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    head = [k for k in saved if "score" in k]
    assert head and saved[head[0]].shape[0] == 1 and any("lora_B" in k for k in saved)
    assert "Held-out pairs (12" in result.stdout and "score.weight" not in result.stdout + result.stderr
    card = (run_dir / "README.md").read_text()
    assert "| pairwise_accuracy |" in card and "answer=" in card and "num_labels=1" in card
    assert "Held-out generation" not in card and "tuneforge merge" not in card
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and "recipe=reward-demo" in manifest["command"]


def test_a_reward_run_reloaded_in_a_fresh_process_scores_the_same(reward_run, tmp_path):
    """`tuneforge infer` in a new process (base reloaded in 4-bit, the adapter with its head, the saved tokenizer and
    template) scores every held-out answer as the training process did at the end of training."""
    run_dir, _ = reward_run
    pairs = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    rows = []
    for p in pairs:  # both input forms: messages ending in the answer, and prompt + answer
        rows.append({"messages": p["prompt"] + [{"role": "assistant", "content": p["chosen"]}]})
        rows.append({"prompt": p["prompt"], "answer": p["rejected"]})
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "scores.jsonl"
    result = run_cli("infer", f"run_dir={run_dir}", f"prompts_file={answers}", f"output_file={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    scores = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    expected = [s for p in pairs for s in (p["chosen_score"], p["rejected_score"])]
    assert len(scores) == len(expected) == 24
    assert max(abs(a - b) for a, b in zip(scores, expected)) <= 1e-4, (scores, expected)
    printed = [float(s) for s in result.stdout.splitlines() if s.strip().lstrip("-").replace(".", "").isdigit()]
    assert printed == pytest.approx(scores, abs=1e-4)  # printed one per line
    # One answer on the command line, typed as a person would.
    one = cli_in_process("infer", f"run_dir={run_dir}", f"prompt={pairs[0]['prompt'][-1]['content']}",
                         f"answer={pairs[0]['chosen']}")
    assert one.returncode == 0, one.stderr[-2000:]
    assert float(one.stdout.split()[-1]) == pytest.approx(pairs[0]["chosen_score"], abs=1e-3)


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


def test_a_reward_run_as_the_reward_of_grpo(reward_run, tiny_model, tmp_path):
    """rewards=[{model: RUN}]: the reward run scores each sampled completion (4-bit, as the policy), through TRL's
    training steps, the reward doctor and the held-out table."""
    reward_dir, _ = reward_run
    run_dir = tmp_path / "grpo"
    result = cli_in_process("train", "recipe=grpo-demo", "quant=nf4", f"model.name_or_path={tiny_model}",
                            "train.max_steps=2", "train.num_generations=2", "train.per_device_train_batch_size=4",
                            "train.max_completion_length=6", "data.builtin_rows=40", "doctor.reward_prompts=2",
                            "eval.num_samples=2", "eval.max_new_tokens=6",
                            f"rewards=[{{model:'{reward_dir}',name:judge}}]", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    logged = [h for h in metrics["log_history"] if "reward" in h]
    assert [h["step"] for h in logged] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["rewards/judge/mean"])) for h in logged)
    assert "judge" in metrics["reward_doctor"]["rewards"]
    assert "rewards/judge" in metrics["eval_after"]
    assert f"Reward model {reward_dir} loaded (4-bit)" in result.stdout + result.stderr


def test_the_reward_function_renders_the_prompt_with_its_own_template(reward_run):
    """TRL hands the policy's rendered prompt text; the reward model scores the conversation it came from with its
    own template, as `infer` does."""
    from tuneforge.config.schemas import QuantConfig
    from tuneforge.eval.reward_model import ModelReward

    run_dir, _ = reward_run
    pair = json.loads((run_dir / "predictions.jsonl").read_text().splitlines()[0])
    conversation = [m for m in pair["prompt"] if m["role"] != "system"]  # the row's own turns
    reward = ModelReward(str(run_dir), "rewards[0]", {})
    reward.bind(QuantConfig(), {"<the policy's rendering>": conversation})
    assert reward(["<the policy's rendering>"], [pair["chosen"]]) == pytest.approx([pair["chosen_score"]], abs=1e-4)


def test_refusals_in_one_line_before_weights_load(reward_run, orpo_run, tiny_model, tmp_path):
    from tuneforge.config.schemas import RewardConfig
    from tuneforge.eval.rewards import load_rewards

    reward_dir, orpo_dir = reward_run[0], orpo_run[0]
    for entry, message in [
        (RewardConfig(model=str(tmp_path / "gone")), r"rewards\[0\]\.model=.*gone: no such directory"),
        (RewardConfig(model=str(orpo_dir)), "is a task=orpo run, not a reward model"),
        (RewardConfig(model=tiny_model), "is not a reward model: its config says LlamaForCausalLM"),
        (RewardConfig(model=str(tmp_path)), "neither a tuneforge run"),
        (RewardConfig(model=str(reward_dir), kwargs={"colum": "answer"}), r"kwargs\.colum: a reward model takes"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_rewards([entry], ["answer"])
    for args, message in [
        (["infer", f"run_dir={reward_dir}", "chat=true"], "is a reward model: it scores answers"),
        (["infer", f"run_dir={reward_dir}", "prompt=hi"], 'prompt="..." answer="..."'),
        (["infer", f"run_dir={orpo_dir}", "prompt=hi", "answer=hello"], "answer= is scored by a reward model"),
        (["eval", f"run_dir={reward_dir}"], "a reward model scores answers, it does not generate"),
        (["train", "recipe=grpo-demo", "rewards=[{model:run,name:'a b'}]"], "rewards[0].name='a b'"),
        (["train", "recipe=reward-demo", "collator=completion_only"], "with task=reward use collator=padding"),
        (["train", "recipe=orpo-demo", "train.generate_during_eval=true"], "ORPOTrainer samples from the prompt"),
    ]:
        result = cli_in_process(*args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stdout[-2000:], result.stderr[-2000:])
        assert message in result.stdout + result.stderr, (args, result.stderr[-2000:])


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
