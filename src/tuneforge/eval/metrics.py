"""Evaluation: generation metrics on held-out prompts (through the shared inference helper), held-out
preference accuracy, eval loss and perplexity; the before/after table."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import string
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from tuneforge.data.formats import split_for_generation
from tuneforge.data.tokenize import IGNORE
from tuneforge.eval.inference import GenerationSettings, Rendered, answer_logprobs, eval_mode, generate

log = logging.getLogger(__name__)

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation or articles, single spaces."""
    text = _PUNCT.sub(" ", text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def normalized_exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer, tokenizers

    # The tokenizer rouge-score would pick itself, given: picking it logs "Using default tokenizer." through absl,
    # whose first log call installs a handler on the root logger, bound to whatever sys.stderr is at that moment.
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizers.DefaultTokenizer(use_stemmer=False))


def rouge_l(prediction: str, reference: str) -> float:
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def chrf(prediction: str, reference: str) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(prediction, [reference]).score / 100.0


METRICS = {"exact_match": exact_match, "normalized_exact_match": normalized_exact_match,
           "rouge_l": rouge_l, "chrf": chrf}


@dataclass
class GenerationEval:
    scores: dict[str, float]
    predictions: list[dict[str, Any]]


def generation_pairs(eval_rows, limit: int) -> list[tuple[Any, str]]:
    """(prompt, reference) for the first `limit` held-out rows: chat rows give their messages up to the
    last assistant turn; plain-text rows give the text up to their last trained span (rendered as is)."""
    pairs = []
    for row in eval_rows:
        if len(pairs) >= limit:
            break
        if row.get("messages"):
            pairs.append(split_for_generation(row["messages"]))
        elif row.get("text") and row.get("spans"):
            start, end = row["spans"][-1]
            pairs.append((Rendered(row["text"][:start]), row["text"][start:end]))
    return pairs


def evaluate_generations(model, tokenizer, pairs: list[tuple[Any, str]], settings: GenerationSettings) -> GenerationEval:
    predictions = generate(model, tokenizer, [p for p, _ in pairs], settings)
    return score_predictions(pairs, predictions, tokenizer.eos_token or "")


def score_predictions(pairs: list[tuple[Any, str]], predictions: list[str], eos: str) -> GenerationEval:
    """Every metric of METRICS for predictions already generated (by this process or another reader)."""
    rows = []
    for (prompt, ref), pred in zip(pairs, predictions):
        ref = ref[: -len(eos)] if eos and ref.endswith(eos) else ref
        prompt = prompt.text if isinstance(prompt, Rendered) else prompt
        rows.append({"prompt": prompt, "reference": ref, "prediction": pred,
                     **{name: fn(pred, ref) for name, fn in METRICS.items()}})
    n = max(len(rows), 1)
    scores = {name: sum(r[name] for r in rows) / n for name in METRICS}
    return GenerationEval(scores=scores, predictions=rows)


def preference_scores(model, tokenizer, rows, batch_size: int) -> dict[str, float]:
    """Held-out preference accuracy: the share of (prompt, chosen, rejected) rows where the model gives the chosen
    answer the higher log-probability (a NaN counts as wrong), and the mean log-probability margin."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chosen = answer_logprobs(model, rows["prompt_ids"], rows["chosen_ids"], pad, batch_size)
    rejected = answer_logprobs(model, rows["prompt_ids"], rows["rejected_ids"], pad, batch_size)
    margins = [c - r for c, r in zip(chosen, rejected)]
    n = max(len(margins), 1)
    return {"preference_accuracy": sum(1.0 for m in margins if m > 0) / n,
            "logp_margin": sum(margins) / n if margins else float("nan")}


def adapter_off(model):
    """A context in which `model` computes as its base: the same (4-bit) weights with the adapter switched off;
    a model without an adapter (full fine-tuning, before training) is its own base."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


@torch.inference_mode()
def eval_loss(model, dataset, collate, batch_size: int) -> dict[str, float]:
    """Token-weighted mean loss over the trained (label != IGNORE) tokens, and its perplexity."""
    total, count = 0.0, 0
    device = next(p.device for p in model.parameters())
    with eval_mode(model):
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            n = int((batch["labels"][:, 1:] != IGNORE).sum())  # the model shifts labels by one
            if n == 0:
                continue
            out = model(**batch, use_cache=False)
            total += float(out.loss) * n
            count += n
    loss = total / count if count else float("nan")
    return {"eval_loss": loss, "perplexity": math.exp(loss) if count else float("nan"), "eval_tokens": count}


def print_comparison(rows: dict[str, dict[str, float]], title: str, console: Console | None = None) -> None:
    """One column per model (e.g. base / fine-tuned), one row per metric, and the change."""
    names = list(rows)
    table = Table(title=title)
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    if len(names) == 2:
        table.add_column("change", justify="right")
    metrics = [m for m in rows[names[-1]] if all(m in rows[n] for n in names)]
    for metric in metrics:
        values = [rows[n][metric] for n in names]
        cells = [f"{v:.3f}" for v in values]
        if len(names) == 2:
            cells.append(f"{values[1] - values[0]:+.3f}")
        table.add_row(metric, *cells)
    (console or Console()).print(table)
