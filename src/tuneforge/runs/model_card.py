"""The run's model card (RUN/README.md and RUN/adapter/README.md): what was trained on what, with which
command, how well it scores, and how to load it. Replaces TRL's generic card and PEFT's empty template."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from tuneforge.config.tasks import CAUSAL_LM, SEQUENCE_CLASSIFICATION, task

CARD_FILE = "README.md"


def _scores_table(before: Optional[dict], after: Optional[dict]) -> list[str]:
    if not after:
        return ["No held-out scores (eval.before_after=false)."]
    lines = ["| metric | before | after |", "|---|---|---|"]
    for name, value in after.items():
        old = (before or {}).get(name)
        lines.append(f"| {name} | {'-' if old is None else f'{old:.3f}'} | {value:.3f} |")
    return lines


def render(cfg: Any, metrics: dict, command: str, run_dir: Path, embedding_rows: Optional[int] = None) -> str:
    """Markdown for a finished run; `cfg` is the validated config, `metrics` what metrics.json holds,
    `embedding_rows` the embedding size training resized to (None: not resized)."""
    base = cfg.model.name_or_path
    lora = cfg.peft.method == "lora"
    quant = f"4-bit {cfg.quant.bnb_4bit_quant_type}" if cfg.quant.load_in_4bit else "unquantized"
    adapter = f"LoRA r={cfg.peft.r}, alpha={cfg.peft.lora_alpha} on {cfg.peft.target_modules}" if lora else \
        "full fine-tune (no adapter)"
    samples = metrics.get("eval_samples")
    data_rows = (metrics.get("data") or {}).get("train", {}).get("rows_kept", metrics.get("train_rows"))
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft" if lora else "library_name: transformers",
        "tags: [tuneforge, " + ("lora, " if lora else "") + f"{cfg.task}]",
        "---",
        "",
        f"# {run_dir.name}: {cfg.task} fine-tune of {base}",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` ({quant}) |",
        f"| adapter | {adapter} |",
        f"| data | `{cfg.data.path}` ({data_rows} training rows, format `{cfg.format.strategy}`) |",
        f"| steps | {metrics.get('train_steps', '-')} (learning rate {cfg.train.learning_rate:g}, "
        f"batch {cfg.train.per_device_train_batch_size} x {cfg.train.gradient_accumulation_steps} accumulation) |",
        f"| train loss | {metrics['train_loss']:.4f} |" if isinstance(metrics.get("train_loss"), float) else "| train loss | - |",
        *([f"| rewards | {', '.join(f'`{r.name}` x{r.weight:g}' for r in cfg.rewards)} (mean reward "
           f"{metrics.get('first_logged_reward', float('nan')):.3f} at the first logged step, "
           f"{metrics.get('last_logged_reward', float('nan')):.3f} at the last) |"] if getattr(cfg, "rewards", None) else []),
        "",
        "## Command",
        "",
        "```bash",
        command,
        "```",
        "",
        "The fully resolved config is `config.yaml` beside this card; `tuneforge reproduce RUN_DIR` re-runs it.",
    ]
    if task(cfg.task).generates:
        lines += ["", f"## Held-out generation{f' ({samples} prompts, same base weights)' if samples else ''}", "",
                  *_scores_table(metrics.get("eval_before"), metrics.get("eval_after"))]
    head = task(cfg.task).head
    if "reward_after" in metrics:
        lines += ["", f"## Held-out pairs ({metrics.get('eval_pairs')}, reward of chosen vs rejected)", "",
                  *_scores_table(metrics.get("reward_before"), metrics.get("reward_after"))]
    elif head == SEQUENCE_CLASSIFICATION and "eval_accuracy" in metrics:
        lines += ["", f"Held-out accuracy {metrics.get('eval_accuracy', float('nan')):.3f} "
                      f"(macro-F1 {metrics.get('eval_macro_f1', float('nan')):.3f}); majority-class baseline "
                      f"{metrics.get('majority_baseline_accuracy', float('nan')):.3f}."]
    lines += ["", "## Use it"]
    if head == CAUSAL_LM:
        lines += ["", "```bash", f"tuneforge infer run_dir={run_dir} prompt=\"...\"", "```"]
    elif task(cfg.task).scores:  # a reward model: the score of a prompt + answer
        lines += ["", "```bash", f"tuneforge infer run_dir={run_dir} prompt=\"...\" answer=\"...\"", "```", "",
                  f"As a reward of an online-RL run: `rewards=[{{model: {run_dir}}}]` (task=grpo|rloo)."]
    if lora:
        auto = "AutoModelForSequenceClassification" if head == SEQUENCE_CLASSIFICATION else "AutoModelForCausalLM"
        lines += ["", "or with PEFT (the adapter directory also holds the fixed tokenizer and chat template):", "",
                  "```python", "from peft import PeftModel", f"from transformers import {auto}, AutoTokenizer", "",
                  f"tokenizer = AutoTokenizer.from_pretrained(\"{run_dir}/adapter\")",
                  f"base = {auto}.from_pretrained(\"{base}\"{', num_labels=1' if task(cfg.task).scores else ''})"
                  "  # the same base weights (4-bit if trained so)",
                  *([f"base.resize_token_embeddings({embedding_rows})  # as in training: the tokenizer grew"]
                    if embedding_rows else []),
                  f"model = PeftModel.from_pretrained(base, \"{run_dir}/adapter\").eval()", "```"]
        if head == CAUSAL_LM:
            lines += ["", f"`tuneforge merge run_dir={run_dir}` folds the adapter into full-precision weights."]
    return "\n".join(lines) + "\n"


def write(cfg: Any, metrics: dict, command: str, run_dir: Path, embedding_rows: Optional[int] = None) -> None:
    """The card into the run directory and its adapter directory (what `save_pretrained` users look at)."""
    from tuneforge.runs.rundir import ADAPTER_DIR, atomic_write_text

    text = render(cfg, metrics, command, Path(run_dir), embedding_rows)
    atomic_write_text(Path(run_dir) / CARD_FILE, text)
    if (Path(run_dir) / ADAPTER_DIR).is_dir():
        atomic_write_text(Path(run_dir) / ADAPTER_DIR / CARD_FILE, text)
