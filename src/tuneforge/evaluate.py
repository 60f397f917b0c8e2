"""Generation metrics on held-out conversations, through the shared inference helper."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from tuneforge.data.formats import split_for_generation
from tuneforge.inference import GenerationSettings, generate

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


METRICS = {"exact_match": exact_match, "normalized_exact_match": normalized_exact_match}


@dataclass
class GenerationEval:
    scores: dict[str, float]
    predictions: list[dict[str, Any]]


def evaluate_generations(model, tokenizer, conversations: list[list[dict]], settings: GenerationSettings) -> GenerationEval:
    prompts, references = zip(*(split_for_generation(c) for c in conversations)) if conversations else ((), ())
    predictions = generate(model, tokenizer, list(prompts), settings)
    rows = []
    for prompt, ref, pred in zip(prompts, references, predictions):
        rows.append({"prompt": prompt, "reference": ref, "prediction": pred,
                     **{name: fn(pred, ref) for name, fn in METRICS.items()}})
    n = max(len(rows), 1)
    scores = {name: sum(r[name] for r in rows) / n for name in METRICS}
    return GenerationEval(scores=scores, predictions=rows)


def print_comparison(before: dict[str, float], after: dict[str, float], n: int, console: Console | None = None) -> None:
    table = Table(title=f"Held-out generation ({n} prompts, same 4-bit base)")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for name in after:
        table.add_row(name, f"{before[name]:.3f}", f"{after[name]:.3f}", f"{after[name] - before[name]:+.3f}")
    (console or Console()).print(table)
