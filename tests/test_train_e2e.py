"""End to end through the real CLI: a short QLoRA run on CPU, its run directory, and DESIGN rule 11
(generation from the in-memory model after training == generation from the saved adapter reloaded
in a fresh process)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import cli_in_process, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, smollm_dir):
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    # An empty matplotlib config dir, as on a new machine: its font-cache message is noise the console filters.
    fresh_matplotlib = {"MPLCONFIGDIR": str(tmp_path_factory.mktemp("mpl"))}
    result = run_cli(
        "train", "train.max_steps=3", "train.logging_steps=1", "train.per_device_train_batch_size=4",
        "data.builtin_rows=120", "eval.num_samples=6", "eval.max_new_tokens=12", f"hydra.run.dir={run_dir}",
        "eval.sample_every_steps=2", "eval.sample_prompts=2", env_extra=fresh_matplotlib,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_run_directory_contents(trained_run):
    run_dir, result = trained_run
    for name in ("config.yaml", "metrics.json", "loss.png", "predictions.jsonl", "train.log",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json",
                 "adapter/chat_template.jinja"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "runs").rglob("events.out.tfevents.*"))  # TensorBoard by default
    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.train.max_steps == 3 and cfg.data.builtin_rows == 120  # overrides recorded, resolved
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train_steps"] == 3
    assert metrics["tokens_seen"] > 0 and metrics["tokens_per_second"] > 0
    assert metrics["eval_samples"] == 6
    assert set(metrics["eval_before"]) == set(metrics["eval_after"]) >= {"exact_match"}
    assert metrics["tokenizer"]["fixes"]  # PAD != EOS fix recorded
    assert len([h for h in metrics["log_history"] if "loss" in h]) == 3
    log = (run_dir / "train.log").read_text()
    assert [line.split("step ", 1)[1].split(":")[0] for line in log.splitlines() if "] - step " in line
            and "loss " in line] == ["1/3", "2/3", "3/3"]  # one line per logged step
    assert "Held-out generation" in result.stdout


def test_console_shows_one_line_per_step_and_no_library_noise(trained_run):
    _, result = trained_run
    out = result.stdout + result.stderr
    assert "{'loss'" not in out  # the Trainer's own dict print is replaced by tuneforge's line
    assert sum(f"step {k}/3: loss " in out for k in (1, 2, 3)) == 3
    for noise in ("is_gradient_checkpointing", "pin_memory", "gemm_4bit_forward", "generated new fontManager"):
        assert noise not in out, noise


def test_model_card_describes_the_run(trained_run):
    run_dir, _ = trained_run
    card = (run_dir / "README.md").read_text()
    assert "huggingface.co/None" not in card and "Model Card for Model ID" not in card  # TRL's / PEFT's templates
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert card.startswith("---\nbase_model: embedded:smollm2-135m-instruct\n")
    assert "train.max_steps=3" in card and "data.builtin_rows=120" in card  # the exact command
    assert f"| exact_match | {metrics['eval_before']['exact_match']:.3f} | {metrics['eval_after']['exact_match']:.3f} |" in card
    assert "PeftModel.from_pretrained" in card and f"tuneforge infer run_dir={run_dir}" in card
    assert (run_dir / "adapter" / "README.md").read_text() == card


def _infer(run_dir, rows, tmp_path, fresh_process: bool = True) -> list[str]:
    """`tuneforge infer` on the prompts of prediction rows; its completions in order."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": r["prompt"]}) + "\n" for r in rows))
    answers = tmp_path / "answers.jsonl"
    result = (run_cli if fresh_process else cli_in_process)(
        "infer", f"run_dir={run_dir}", f"prompts_file={prompts}", f"output_file={answers}", "max_new_tokens=12")
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line)["completion"] for line in answers.read_text().splitlines()]


def test_sample_generations_during_training(trained_run):
    """Samples every 2 steps and at the end, through the shared helper: the last ones are the
    final model's answers, so they equal the after-training predictions for the same prompts."""
    run_dir, _ = trained_run
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 2, 3, 3]
    final = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()][:2]
    assert [s["prediction"] for s in samples[2:]] == [p["prediction"] for p in final]
    assert [s["reference"] for s in samples[2:]] == [p["reference"] for p in final]
    assert "step 2 samples:" in (run_dir / "train.log").read_text()


def test_infer_with_the_readme_prompt_as_typed(trained_run, tmp_path):
    """The README's command: a prompt with parentheses, a comma and a newline, unquoted for Hydra; the answer is
    the one the same prompt gets from a prompts file."""
    run_dir, _ = trained_run
    prompt = "Rewrite this date in ISO 8601 format (YYYY-MM-DD). Answer with the date only.\nDate: July 4th, 1976"
    result = cli_in_process("infer", f"run_dir={run_dir}", f"prompt={prompt}", "max_new_tokens=12")
    assert result.returncode == 0, result.stderr[-3000:]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": prompt}) + "\n")
    from_file = cli_in_process("infer", f"run_dir={run_dir}", f"prompts_file={prompts}",
                               f"output_file={tmp_path / 'a.jsonl'}", "max_new_tokens=12")
    assert from_file.returncode == 0, from_file.stderr[-3000:]
    expected = json.loads((tmp_path / "a.jsonl").read_text())["completion"]
    assert expected and result.stdout.strip().splitlines()[-1] == expected


def test_interactive_chat_streams_each_answer(trained_run):
    run_dir, _ = trained_run
    date_prompt = "Rewrite this date in ISO 8601 format (YYYY-MM-DD). Answer with the date only. Date: "  # one line
    result = cli_in_process("infer", f"run_dir={run_dir}", "chat=true", "max_new_tokens=12",
                            input=f"{date_prompt}July 4th, 1976\n{date_prompt}the 3rd of March 2021\n\n")
    assert result.returncode == 0, result.stderr[-3000:]
    # Two turns, each streamed after its own "model>" marker.
    turns = result.stdout.split("model> ")[1:]
    assert len(turns) == 2 and all(t.strip() and "you>" in t for t in turns)


def test_load_best_model_at_end_keeps_the_best_checkpoint(tmp_path, tiny_model):
    """The saved adapter is the best evaluation's checkpoint, not the last weights. Training lowers the
    eval loss step by step, so `greater_is_better=true` makes step 2 the "best" one: it tells the kept
    checkpoint apart from the last one whatever the exact losses are."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "best"
    result = cli_in_process(
        "train", f"model.name_or_path={tiny_model}", "train.learning_rate=3e-3",  # the checkpoint choice is tested
        "train.max_steps=4", "train.per_device_train_batch_size=4", "data.builtin_rows=60",
        "eval.before_after=false", "train.eval_strategy=steps", "train.eval_steps=2", "train.save_strategy=steps",
        "train.save_steps=2", "train.load_best_model_at_end=true", "train.metric_for_best_model=eval_loss",
        "train.greater_is_better=true", f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    evals = {h["step"]: h["eval_loss"] for h in metrics["log_history"] if "eval_loss" in h}
    assert set(evals) == {2, 4} and evals[2] > evals[4]
    assert metrics["best_model_checkpoint"].endswith("checkpoint-2") and metrics["best_metric"] == evals[2]
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    best = load_file(run_dir / "checkpoint-2" / "adapter_model.safetensors")
    last = load_file(run_dir / "checkpoint-4" / "adapter_model.safetensors")
    assert saved.keys() == best.keys()
    assert all(torch.equal(saved[k], best[k]) for k in saved)
    assert not all(torch.equal(saved[k], last[k]) for k in saved)


def test_load_best_model_at_end_with_mismatched_save_steps_fails_before_loading():
    result = cli_in_process("train", "train.eval_strategy=steps", "train.eval_steps=3", "train.save_strategy=steps",
                     "train.save_steps=4", "train.load_best_model_at_end=true")
    assert result.returncode == 2
    assert "train.save_steps (4) must be a multiple of train.eval_steps (3)" in result.stderr


def test_in_memory_generation_equals_reloaded_adapter(trained_run, tmp_path):
    run_dir, _ = trained_run
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert _infer(run_dir, rows, tmp_path) == [r["prediction"] for r in rows]


def test_second_run_into_same_directory_is_refused(trained_run):
    run_dir, _ = trained_run
    before = (run_dir / "metrics.json").read_bytes()
    result = cli_in_process("train", "train.max_steps=1", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2
    assert "already holds a run" in result.stderr + result.stdout
    assert (run_dir / "metrics.json").read_bytes() == before
    assert (run_dir / ".hydra" / "overrides.yaml").read_text().count("train.max_steps=3") == 1


def test_eval_command_scores_base_and_fine_tuned_and_matches_infer(trained_run, tmp_path):
    run_dir, _ = trained_run
    result = cli_in_process("eval", f"run_dir={run_dir}", "eval.compare_base=true", "eval.num_samples=4",
                     "eval.max_new_tokens=12")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "eval" / "eval.json").read_text())
    for model in ("fine_tuned", "base"):
        scores = report[model]
        assert {"exact_match", "normalized_exact_match", "rouge_l", "chrf", "eval_loss", "perplexity"} <= set(scores)
        assert abs(scores["perplexity"] - math.exp(scores["eval_loss"])) < 1e-6 * scores["perplexity"]
    assert report["fine_tuned"]["eval_loss"] != report["base"]["eval_loss"]  # the adapter is really applied
    rows = [json.loads(line) for line in (run_dir / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"prompt", "reference", "prediction", "base_prediction", "chrf"} <= set(rows[0])
    # `infer` and `eval` go through the same helper: same prompt, same answer (a fresh process: the test above).
    assert _infer(run_dir, rows, tmp_path, fresh_process=False) == [r["prediction"] for r in rows]


def test_merge_into_dequantized_base_reproduces_the_adapter(trained_run, tmp_path):
    run_dir, _ = trained_run
    out = tmp_path / "merged"
    result = cli_in_process("merge", f"run_dir={run_dir}", f"out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "chat_template.jinja").is_file()
    check = json.loads((out / "merge_check.json").read_text())
    assert check["identical_generations"] == check["prompts"] == 4
    assert check["max_abs_logit_diff"] < 1e-2
    assert "greedy generations identical" in result.stdout
