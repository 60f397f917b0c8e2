"""An export proven by an independent reader (DESIGN rule 13): the written model is loaded back by a reader that is
not the writer (transformers' own GGUF loader for a GGUF; a fresh process loading the folder for HF format), answers
the run's held-out prompts greedily, and is compared with the adapter on its training base: agreement of the greedy
answers, the run's metrics, the largest logit difference on the prompts; and the chat template read from the export
must render every held-out prompt as training did (same text, same token ids).

`python -m tuneforge.eval.verify_export DIR REQUEST OUT` is the fresh-process reader of an HF-format folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from tuneforge.eval.compare import prompt_logits
from tuneforge.eval.inference import GenerationSettings, Rendered, generate, prompt_ids, render_prompt
from tuneforge.eval.metrics import score_predictions
from tuneforge.models.tokenizer import stop_token_ids
from tuneforge.runs.faults import RunStopped


class ExportMismatch(RunStopped):
    """An unquantized export that does not answer as the adapter does, or a template that renders differently:
    nothing is published (exit 1, as a check that found a difference)."""

    exit_code = 1


@dataclass
class Reference:
    """The adapter on its training base: what every exported form is compared with."""

    pairs: list  # (prompt, reference answer) of the held-out rows
    references: list[str]  # the reference answers as scored (EOS text removed)
    answers: list[str]
    scores: dict[str, float]
    texts: list[str]  # each prompt as training rendered it
    ids: list[list[int]]
    logits: torch.Tensor  # at every token of the first `logit_prompts` prompts
    logit_prompts: int
    settings: GenerationSettings


def reference(model, tokenizer, pairs, settings: GenerationSettings, logit_prompts: int) -> Reference:
    prompts = [p for p, _ in pairs]
    answers = generate(model, tokenizer, prompts, settings)
    scored = score_predictions(pairs, answers, tokenizer.eos_token or "")
    n = min(logit_prompts, len(prompts))
    return Reference(pairs, [r["reference"] for r in scored.predictions], answers, scored.scores, [render_prompt(tokenizer, p) for p in prompts],
                     [prompt_ids(tokenizer, p, settings.max_input_tokens) for p in prompts],
                     prompt_logits(model, tokenizer, prompts[:n], settings.max_input_tokens), n, settings)


@dataclass
class Reading:
    """What a reader of the export produced on the held-out prompts."""

    answers: list[str]
    texts: list[str]
    ids: list[list[int]]
    logits: torch.Tensor
    eos_ids: list[int]
    pad_id: Optional[int]


def read_with(model, tokenizer, ref: Reference) -> Reading:
    """The export's answers, prompt renders and logits, through its own tokenizer (the one read from the file)."""
    prompts = [p for p, _ in ref.pairs]
    return Reading(generate(model, tokenizer, prompts, ref.settings),
                   [render_prompt(tokenizer, p) for p in prompts],
                   [prompt_ids(tokenizer, p, ref.settings.max_input_tokens) for p in prompts],
                   prompt_logits(model, tokenizer, prompts[:ref.logit_prompts], ref.settings.max_input_tokens),
                   stop_token_ids(tokenizer), tokenizer.pad_token_id)


def read_gguf(folder: Path, name: str, ref: Reference) -> Reading:
    """transformers' own GGUF loader (it de-quantizes to float32) and the tokenizer it builds from the file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return read_with(model, tokenizer, ref)


def read_hf_fresh(folder: Path, ref: Reference, scratch: Path) -> Reading:
    """The HF-format folder loaded by a new Python process, as a server would load it: nothing of this process
    (tokenizer fixes, patched config) can leak into what is checked."""
    from safetensors.torch import load_file

    request = scratch / "request.json"
    out = scratch / "reading.json"
    request.write_text(json.dumps({
        "prompts": [{"rendered": p.text} if isinstance(p, Rendered) else {"prompt": p} for p, _ in ref.pairs],
        "settings": ref.settings.__dict__, "logit_prompts": ref.logit_prompts}))
    proc = subprocess.run([sys.executable, "-m", "tuneforge.eval.verify_export", str(folder), str(request), str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the fresh-process reader of {folder} failed:\n{proc.stderr[-3000:]}")
    data = json.loads(out.read_text())
    logits = load_file(str(out.with_suffix(".safetensors")))["logits"]
    return Reading(data["answers"], data["texts"], data["ids"], logits, data["eos_ids"], data["pad_id"])


def _fresh_reader(folder: str, request: str, out: str) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    req = json.loads(Path(request).read_text())
    prompts = [Rendered(p["rendered"]) if "rendered" in p else p["prompt"] for p in req["prompts"]]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    settings = GenerationSettings(**req["settings"])
    # The served stop ids: the generation config's EOS list (what vLLM / SGLang / TGI read).
    eos = model.generation_config.eos_token_id
    n = req["logit_prompts"]
    save_file({"logits": prompt_logits(model, tokenizer, prompts[:n], settings.max_input_tokens).contiguous()},
              str(Path(out).with_suffix(".safetensors")))
    Path(out).write_text(json.dumps({
        "answers": generate(model, tokenizer, prompts, settings),
        "texts": [render_prompt(tokenizer, p) for p in prompts],
        "ids": [prompt_ids(tokenizer, p, settings.max_input_tokens) for p in prompts],
        "eos_ids": eos if isinstance(eos, list) else [eos], "pad_id": model.generation_config.pad_token_id}))


@dataclass
class FormCheck:
    """One exported form against the reference: one row of the table and of export.json."""

    form: str
    # Who read the export back (transformers' GGUF loader, a fresh process).
    reader: str
    unquantized: bool
    agreement: float
    scores: dict[str, float]
    max_abs_logit_diff: Optional[float]
    argmax_disagreement: Optional[float]
    template_same_text: int
    template_same_ids: int
    prompts: int
    stops_end_of_turn: bool
    pad_is_not_eos: bool
    differing: list[dict[str, Any]] = field(default_factory=list)
    # The export's greedy answer to each held-out prompt (what another consumer, llama.cpp, is compared with).
    answers: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        out = []
        if self.template_same_text < self.prompts or self.template_same_ids < self.prompts:
            out.append(f"{self.form}: the template read back renders {self.prompts - self.template_same_ids} of "
                       f"{self.prompts} held-out prompts unlike training")
        if not self.stops_end_of_turn:
            out.append(f"{self.form}: the end-of-turn token is not among the stop ids read back")
        if not self.pad_is_not_eos:
            out.append(f"{self.form}: PAD is EOS in the file read back")
        if self.unquantized and self.agreement < 1.0:
            out.append(f"{self.form}: unquantized, yet {len(self.differing)} of {self.prompts} greedy answers differ "
                       "from the adapter's")
        return out


def check(form: str, reader: str, unquantized: bool, reading: Reading, ref: Reference, end_of_turn: int) -> FormCheck:
    scored = score_predictions(ref.pairs, reading.answers, "")
    same = [a == b for a, b in zip(ref.answers, reading.answers)]
    diff = (ref.logits - reading.logits).abs() if reading.logits.shape == ref.logits.shape else None
    return FormCheck(
        form, reader, unquantized, sum(same) / max(len(same), 1), scored.scores,
        float(diff.max()) if diff is not None else float("nan"),
        float((ref.logits.argmax(-1) != reading.logits.argmax(-1)).float().mean()) if diff is not None else float("nan"),
        sum(a == b for a, b in zip(ref.texts, reading.texts)), sum(a == b for a, b in zip(ref.ids, reading.ids)),
        len(ref.pairs), end_of_turn in reading.eos_ids,
        reading.pad_id is not None and reading.pad_id not in reading.eos_ids[:1],
        [{"prompt": ref.texts[i], "adapter": ref.answers[i], "export": reading.answers[i]}
         for i, s in enumerate(same) if not s][:5], list(reading.answers))


def prompts_record(ref: Reference) -> list[dict[str, Any]]:
    """Each held-out prompt as training rendered and tokenized it, its reference answer and the adapter's."""
    return [{"text": text, "ids": ids, "reference": reference_answer, "adapter": answer}
            for text, ids, reference_answer, answer in zip(ref.texts, ref.ids, ref.references, ref.answers)]


def table(ref: Reference, checks: list[FormCheck], metric: str, title: str) -> None:
    """form | agreement | the run's metric | max |Δlogit| | argmax differs | template renders like training (of the
    held-out prompts)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for column in ("form", "agree", metric, "max |Δlogit|", "argmax ≠", "template"):
        t.add_column(column, justify="left" if column == "form" else "right")
    t.add_row("adapter (reference)", "-", f"{ref.scores.get(metric, float('nan')):.3f}", "-", "-", "-")
    for c in checks:
        t.add_row(c.form, f"{c.agreement:.3f}", f"{c.scores.get(metric, float('nan')):.3f}",
                  f"{c.max_abs_logit_diff:.3g}", f"{c.argmax_disagreement:.2%}",
                  f"{c.template_same_ids}/{c.prompts}")
    Console().print(t)
    for c in checks:
        print(f"{c.form}: read back by {c.reader}; greedy answers equal to the adapter's on {c.agreement:.1%} of "
              f"{c.prompts} held-out prompts; the template read back renders {c.template_same_ids}/{c.prompts} as "
              "training did")


if __name__ == "__main__":  # the fresh-process reader (read_hf_fresh)
    _fresh_reader(*sys.argv[1:4])
