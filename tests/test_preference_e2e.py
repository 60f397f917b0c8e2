"""Preference tuning end to end: the dpo-demo recipe's plumbing through the real CLI (QLoRA, TRL's reward metrics,
the before/after tables, run directory, model card), the reference model (adapter-off base: no drift; an SFT
start: a frozen copy of the SFT adapter, not saved with the run), SIGKILL + resume, reproduce --check, a sweep
with its report, and KTO on unpaired rows.

Every run trains the tiny random model built from the embedded model's config with its real tokenizer
(tests/conftest.py): these tests check the machinery, and the demo's learning is measured by the demo itself."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import set_seed

from tests.conftest import REPO, cli_in_process, logged_losses, run_cli

pytestmark = pytest.mark.slow


def _args(model: str, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "recipe=dpo-demo", f"model.name_or_path={model}", "train.max_steps=4", "train.save_steps=2",
            "train.logging_steps=1", "data.builtin_rows=80", "eval.num_samples=6", "eval.max_new_tokens=8",
            f"hydra.run.dir={run_dir}", *extra]



@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model):
    """The demo recipe as the README runs it (4-bit base, LoRA, sigmoid + NLL loss), four steps on the tiny model,
    through the CLI entry point in this process (a fresh-process start is test_train_e2e's)."""
    run_dir = tmp_path_factory.mktemp("dpo") / "run"
    result = cli_in_process(*_args(tiny_model, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_demo_recipe_plumbing(dpo_run):
    run_dir, result = dpo_run
    for name in ("config.yaml", "manifest.json", "metrics.json", "predictions.jsonl", "predictions_before.jsonl",
                 "README.md", "loss.png", "adapter/adapter_model.safetensors", "adapter/chat_template.jinja"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train_steps"] == 4 and metrics["tokens_seen"] > 0
    for side in ("preference_before", "preference_after"):
        assert 0.0 <= metrics[side]["preference_accuracy"] <= 1.0
        assert torch.isfinite(torch.tensor(metrics[side]["logp_margin"]))
    # TRL's held-out reward accuracy and margins, on the rows the table scores.
    assert {"eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen"} <= set(metrics)
    assert metrics["eval_samples"] == 6 and set(metrics["eval_before"]) == set(metrics["eval_after"]) >= {"exact_match"}
    logged = [h for h in metrics["log_history"] if "loss" in h]
    assert [h["step"] for h in logged] == [1, 2, 3, 4] and all("rewards/margins" in h for h in logged)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and "recipe=dpo-demo" in manifest["command"]
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6 and all(p["reference"] for p in predictions)  # reference = the chosen answer
    assert "Held-out preference pairs (6" in result.stdout and "Held-out generation (6 prompts" in result.stdout
    card = (run_dir / "README.md").read_text()
    assert "huggingface.co/None" not in card and "recipe=dpo-demo" in card


def _trained(cfg_overrides: list[str], run_dir: Path, steps: int = 3):
    """The preference stages as lifecycle.run calls them, trained `steps` steps in this process: (task, model,
    trainer), for tests that look inside the trainer."""
    from tuneforge.config import library_args
    from tuneforge.config.compose import load_config
    from tuneforge.tasks.stages import stages_class

    cfg = load_config(["recipe=dpo-demo", "quant=none", f"train.max_steps={steps}", "train.learning_rate=1e-2",
                       "train.save_strategy=no", "train.report_to=none", "data.builtin_rows=40",
                       "eval.before_after=false", "data.cache=false", *cfg_overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    task = stages_class(cfg.task)(cfg, run_dir, True)  # the task table's stages for task=dpo
    task.prepare()
    task.check()
    set_seed(cfg.train.seed)
    model = task.build_model()
    trainer = task.build_trainer(model, library_args.trainer_arguments(cfg, run_dir), [])
    trainer.train()
    return task, model, trainer


def _completion_logps(model, batch) -> torch.Tensor:
    """Sum of log p(token) over each row's completion tokens, computed here rather than by TRL."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logps = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(-1)


def test_reference_is_the_adapter_off_base_after_training(tiny_model, tmp_path):
    """After steps at a high learning rate the policy has moved; the reference TRL scores against (adapter off) is
    still the base model loaded afresh: no drift, and no second copy of the weights."""
    from tuneforge.config.schemas import ModelConfig, QuantConfig
    from tuneforge.models.loading import load_model

    _, model, trainer = _trained([f"model.name_or_path={tiny_model}"], tmp_path)
    assert "ref" not in model.peft_config  # TRL's copy of the adapter is not kept for a fresh adapter
    model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
    base = load_model(tiny_model, ModelConfig(dtype="float32"), QuantConfig(load_in_4bit=False)).eval()
    expected = _completion_logps(base, batch)
    assert torch.allclose(torch.cat([ref_chosen, ref_rejected]).float(), expected, rtol=1e-5, atol=1e-4)
    policy = _completion_logps(model, batch)
    assert torch.isfinite(policy).all() and (policy - expected).abs().max() > 1e-2  # the adapter did train


def test_sft_start_keeps_a_frozen_copy_of_the_sft_adapter_as_reference(tiny_model, tmp_path):
    from tuneforge.runs import rundir

    sft = tmp_path / "sft"
    trained = cli_in_process("train", f"model.name_or_path={tiny_model}", "quant=none", "train.max_steps=2",
                      "train.learning_rate=1e-2", "data.max_samples=16", "eval.before_after=false",
                      f"hydra.run.dir={sft}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    sft_weights = load_file(str(sft / "adapter" / "adapter_model.safetensors"))

    dpo = tmp_path / "dpo"
    task, model, trainer = _trained([f"model.name_or_path={tiny_model}", f"model.adapter={sft}"], dpo)
    assert task.sft_adapter == sft / "adapter"
    ref = get_peft_model_state_dict(model, adapter_name="ref")
    policy = get_peft_model_state_dict(model, adapter_name="default")
    assert ref.keys() == policy.keys() == sft_weights.keys()
    assert max((ref[k].cpu() - sft_weights[k]).abs().max().item() for k in ref) == 0.0  # the reference never moved
    assert max((policy[k].cpu() - sft_weights[k]).abs().max().item() for k in ref) > 1e-4  # the policy did
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".ref." in n)

    rundir.save_adapter(trainer, task.tokenizer, dpo)
    saved = load_file(str(dpo / "adapter" / "adapter_model.safetensors"))
    assert not (dpo / "adapter" / "ref").exists()  # the run's adapter is the trained one alone
    assert max((saved[k] - policy[k].cpu()).abs().max().item() for k in saved) == 0.0


def test_sigkill_then_resume_equals_the_uninterrupted_dpo_run(dpo_run, tiny_model, tmp_path):
    baseline, _ = dpo_run
    run_dir = tmp_path / "run"
    args = _args(tiny_model, run_dir)
    env = {"PYTHONPATH": str(REPO)}
    killed = run_cli(*args, "callbacks=[tests.fault_hooks:KillAfterCheckpoint2]", env_extra=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (run_dir / "checkpoint-2" / "trainer_state.json").is_file() and not (run_dir / "adapter").exists()
    resumed = cli_in_process(*args, "train.resume_from_checkpoint=auto")  # only the kill needs its own process
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = logged_losses(baseline), logged_losses(run_dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert max(abs(a[s] - b[s]) / abs(a[s]) for s in a) <= 1e-4, (a, b)
    wa = load_file(str(baseline / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5
    resumed_from = json.loads((run_dir / "manifest.json").read_text())["resumed"]
    assert [r["from"].rsplit("-", 1)[1] for r in resumed_from] == ["2"]


def test_reproduce_check_of_a_dpo_run(dpo_run, tmp_path):
    baseline, _ = dpo_run
    same = run_cli("reproduce", str(baseline), "--check", f"hydra.run.dir={tmp_path / 'same'}")
    assert same.returncode == 0, same.stdout[-3000:] + same.stderr[-3000:]
    assert "reproduce --check: MATCH" in same.stdout
    compared = {(r["kind"], r["metric"]) for r in json.loads((tmp_path / "same" / "reproduce.json").read_text())["rows"]}
    assert {("logged", "loss"), ("logged", "rewards/margins"), ("final", "train_loss"),
            ("weights", "adapter/adapter_model.safetensors")} <= compared


def test_sweep_over_beta_and_its_report_rank_by_preference_accuracy(tiny_model, tmp_path):
    sweep = tmp_path / "sweep"
    result = cli_in_process("train", "-m", "recipe=dpo-demo", f"model.name_or_path={tiny_model}", "train.beta=0.1,0.5",
                            "train.max_steps=2", "train.logging_steps=1", "data.builtin_rows=40",
                            "eval.num_samples=4", "eval.max_new_tokens=4", "eval.metric=preference_accuracy",
                            f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        assert json.loads((sweep / job / "manifest.json").read_text())["status"] == "finished"
    rep = cli_in_process("report", str(sweep))
    assert rep.returncode == 0, rep.stderr[-3000:]
    md = (sweep / "report.md").read_text()
    assert "2 finished" in md and "| rank | job | status | train.beta | preference_accuracy |" in md
    scores = {job: json.loads((sweep / job / "metrics.json").read_text())["preference_after"]["preference_accuracy"]
              for job in ("0", "1")}
    best = max(scores, key=lambda j: (scores[j], -int(j)))
    assert f"| 1 | {best} | ok |" in md


def test_kto_on_unpaired_rows(tiny_model, tmp_path):
    data = tmp_path / "kto.jsonl"
    rows = []
    for i in range(24):
        prompt = f"Rewrite this date in ISO 8601 format (YYYY-MM-DD). Answer with the date only.\nDate: March {i + 1}, 2021"
        rows.append({"prompt": prompt, "completion": f"2021-03-{i + 1:02d}", "label": True})
        rows.append({"prompt": prompt, "completion": f"{i + 1:02d}/03/2021", "label": False})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    result = cli_in_process("train", "task=kto", "format=unpaired", "data=local", f"data.path={data}",
                            "data.eval_fraction=0.25", f"model.name_or_path={tiny_model}", "train.max_steps=3",
                            "train.logging_steps=1", "train.per_device_train_batch_size=4",
                            "eval.num_samples=4", "eval.max_new_tokens=4", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    logged = [h for h in metrics["log_history"] if "loss" in h]
    assert [h["step"] for h in logged] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logged) and "kl" in logged[0]  # KTO's KL term ran
    assert metrics["data"]["train"]["rows_kept"] == 36 and (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "preference_after" not in metrics  # unpaired rows have no pair to rank
