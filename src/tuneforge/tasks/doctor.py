"""The doctor: catch the silent failures of fine-tuning before any weights load (at the start of `train`, and as
`tuneforge doctor`).

Runs on the fixed tokenizer, the model's config (no weights) and the prepared data -- the very
labels training will use, counted before any trainer drops a row. Every check says what it found,
why it matters and what was done or what to do. Errors stop `train`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import TuneforgeConfig
from tuneforge.config.tasks import task
from tuneforge.data.pipeline import DataStats, PreparedData
from tuneforge.data.tokenize import IGNORE
from tuneforge.models.loading import resize_rows
from tuneforge.models.tokenizer import TokenizerReport, stop_token_ids

log = logging.getLogger(__name__)

OK, FIXED, WARNING, ERROR = "ok", "fixed", "warning", "error"
# Rows inspected by the per-row checks (the counts from the data stage cover every row).
SAMPLE = 256


@dataclass
class Check:
    name: str
    status: str
    why: str
    action: str


@dataclass
class Context:
    cfg: TuneforgeConfig
    tokenizer: Any
    report: TokenizerReport
    model_config: Any
    data: PreparedData


def _ids(tokenizer, token: str | None) -> int | None:
    return None if token is None else tokenizer.convert_tokens_to_ids(token)


def special_tokens(ctx: Context) -> list[Check]:
    tok, original = ctx.tokenizer, ctx.report.original
    out = []
    pad_fixed = original.get("pad") in (None, original.get("eos")) and tok.pad_token != tok.eos_token
    if tok.pad_token is not None and tok.pad_token == tok.eos_token:
        out.append(Check("PAD != EOS", ERROR, "with PAD == EOS the end of every answer looks like padding: the model "
                         "never learns to stop", "use tokenizer=auto (UNK or a new <|pad|> as PAD)"))
    else:
        out.append(Check("PAD != EOS", FIXED if pad_fixed else OK, "PAD == EOS hides EOS as padding",
                         f"PAD {original.get('pad')!r} -> {tok.pad_token!r}" if pad_fixed else f"PAD {tok.pad_token!r}"))
    for name in ("bos", "unk"):
        value = getattr(tok, f"{name}_token")
        label = f"{name.upper()} != EOS"
        if value is not None and value == tok.eos_token:
            out.append(Check(label, WARNING, f"a {name.upper()} equal to EOS puts 'stop' where text starts or is unknown",
                             "tokenizer.chat_template=chatml gives BOS <|im_start|>; or choose a distinct token"))
        else:
            changed = original.get(name) != value
            out.append(Check(label, FIXED if changed else OK, f"{name.upper()} must not read as end of text",
                             f"{name.upper()} {original.get(name)!r} -> {value!r}" if changed else f"{name.upper()} {value!r}"))
    return out


def _trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, label in enumerate(labels + [IGNORE]):
        if label != IGNORE and start is None:
            start = i
        elif label == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def eos_trained(ctx: Context) -> list[Check]:
    stops = set(stop_token_ids(ctx.tokenizer))
    rows = ctx.data.train.select(range(min(SAMPLE, len(ctx.data.train))))
    bad = doubled = cut = 0
    example = None
    columns = rows.column_names
    for i, (ids, labels) in enumerate(zip(rows["input_ids"], rows["labels"])):
        if ctx.cfg.collator.name == "lm":
            ok = any(t in stops and l != IGNORE for t, l in zip(ids, labels))
        else:
            # Each trained stretch (an answer) must end with a trained end-of-turn / EOS token. A stretch reaching
            # the row's end is excused only when truncation really cut the row (its `truncated` flag): a template
            # whose turns carry no end-of-turn token also ends its last answer at the row's end.
            truncated = bool(rows[i]["truncated"]) if "truncated" in columns else False
            runs = _trained_runs(labels)
            ends = [b for _, b in runs if ids[b - 1] not in stops]
            cut += bool(ends) and truncated and all(b == len(ids) for b in ends)
            ok = not ends or (truncated and all(b == len(ids) for b in ends))
            if not ok and example is None:
                a, b = next((a, b) for a, b in runs if b in ends)
                example = ctx.tokenizer.decode(ids[a:b])
        bad += not ok
        doubled += any(a in stops and b in stops and la != IGNORE and lb != IGNORE
                       for a, b, la, lb in zip(ids, ids[1:], labels, labels[1:]))
    names = ", ".join(ctx.tokenizer.convert_ids_to_tokens(sorted(stops)))
    template = f"tokenizer.chat_template={ctx.cfg.tokenizer.chat_template}"
    if ctx.cfg.tokenizer.chat_template == "keep":
        template += " (the model's own template)"
    detail = (f"{bad} of {len(rows)} sampled rows have an answer not ending in a trained {names}"
              + (f", e.g. the trained span {example[-60:]!r}" if example is not None else "")
              + f": the chat template ({template}) or the format ends assistant turns without it, so the model "
              f"never learns to stop. Use a template whose assistant turns end with {names} (e.g. "
              "tokenizer.chat_template=chatml), or format.append_eos=true for text formats")
    ok_detail = f"every sampled answer ends with a trained {names}" + (
        f" ({cut} cut by truncation at train.max_length={ctx.cfg.train.max_length}: counted under truncation)"
        if cut else "")
    out = [Check("EOS / end-of-turn trained", ERROR if bad else OK,
                 "an untrained end-of-turn token means the model never learns to stop", detail if bad else ok_detail)]
    if doubled:
        out.append(Check("no doubled EOS", WARNING, "two EOS in a row teaches the model to emit EOS after EOS",
                         f"{doubled} sampled rows; set format.append_eos=false when the text already ends with EOS"))
    return out


def chat_template(ctx: Context) -> list[Check]:
    tok = ctx.tokenizer
    messages = [m for m in (ctx.data.eval["messages"] if "messages" in ctx.data.eval.column_names else []) if m]
    if not messages:
        has = "present" if tok.chat_template else "absent"
        return [Check("chat template", OK, "plain-text format: no chat template needed", f"template {has}")]
    if not tok.chat_template:
        return [Check("chat template", ERROR, "chat data needs the chat template that inference will use",
                      "set tokenizer.chat_template=chatml (or a .jinja path)")]
    # One template for training and inference: the prepared ids must equal apply_chat_template's, and the
    # inference prompt (generation prompt) must be a prefix of them.
    from tuneforge.data.formats import split_for_generation
    from tuneforge.eval.inference import prompt_ids

    mismatched = 0
    rows = ctx.data.eval.select(range(min(16, len(ctx.data.eval))))
    for row in rows:
        if not row["messages"]:
            continue
        expected = tok(tok.apply_chat_template(row["messages"], tokenize=False), add_special_tokens=False)["input_ids"]
        prompt = prompt_ids(tok, split_for_generation(row["messages"])[0], 10**9)
        n = len(row["input_ids"])
        if row["input_ids"] != expected[:n] or expected[: len(prompt)] != prompt:
            mismatched += 1
    return [Check("one chat template", ERROR if mismatched else OK,
                  "training text and inference prompts must come from the same template",
                  f"{mismatched} held-out rows differ from apply_chat_template" if mismatched
                  else "training ids == apply_chat_template ids; inference prompt is their prefix")]


def response_templates(ctx: Context) -> list[Check]:
    col, tok = ctx.cfg.collator, ctx.tokenizer
    out = []
    for key in ("response_template", "instruction_template"):
        template = getattr(col, key)
        if not isinstance(template, str):
            continue
        alone = tok(template, add_special_tokens=False)["input_ids"]
        in_context = _in_context_ids(tok, template, ctx)
        if in_context is None:
            out.append(Check(f"collator.{key} found", ERROR, "a template never found leaves every label -100",
                             f"{template!r} occurs in no sampled row; check the format"))
        elif in_context != alone:
            out.append(Check(f"collator.{key} in context", WARNING,
                             "templates can tokenize differently after a newline than alone (SentencePiece)",
                             f"alone {alone} vs in context {in_context}: tuneforge matches in context; to match by ids "
                             f"use collator.{key}={in_context}, or tokenizer.add_special_tokens=[{template!r}]"))
        else:
            out.append(Check(f"collator.{key} in context", OK, "same ids alone and in context", f"{alone}"))
    return out


def _in_context_ids(tok, template: str, ctx: Context) -> list[int] | None:
    rows = ctx.data.train.select(range(min(32, len(ctx.data.train))))
    for ids in rows["input_ids"]:
        text = tok.decode(ids)
        at = text.find(template)
        if at < 0:
            continue
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return [i for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if a < at + len(template) and b > at]
    return None


def masking_and_lengths(ctx: Context) -> list[Check]:
    st = ctx.data.stats["train"]
    threshold = ctx.cfg.doctor.max_fully_masked
    formatted = max(st.rows_in - sum(st.bad_rows.values()), 1)
    masked = st.fully_masked / formatted
    out = [Check("labels not all -100", ERROR if masked > threshold else (WARNING if masked else OK),
                 "rows with every label -100 train nothing (TRL drops them silently)",
                 f"{st.fully_masked} of {formatted} rows ({masked:.1%}, limit {threshold:.0%}); check the templates "
                 "and train.max_length" if masked else "every row has trained tokens")]
    truncated = st.truncated / formatted
    out.append(Check("truncation", WARNING if truncated else OK, "truncated rows lose their end (often the answer)",
                     f"{st.truncated} rows ({truncated:.1%}) longer than train.max_length={ctx.cfg.train.max_length}"))
    context = getattr(ctx.model_config, "max_position_embeddings", None)
    if context and ctx.cfg.train.max_length > context:
        out.append(Check("max_length vs context", ERROR, "positions past the model's context are untrained",
                         f"train.max_length={ctx.cfg.train.max_length} > the model's {context}"))
    else:
        out.append(Check("max_length vs context", OK, "positions past the model's context are untrained",
                         f"{ctx.cfg.train.max_length} <= {context}"))
    train_hashes = {_digest(ids) for ids in ctx.data.train["input_ids"]}
    leaked = sum(_digest(ids) in train_hashes for ids in ctx.data.eval["input_ids"])
    out.append(Check("held-out not in train", WARNING if leaked else OK, "duplicated held-out rows inflate eval scores",
                     f"{leaked} of {len(ctx.data.eval)} held-out rows also appear in training" if leaked
                     else f"0 of {len(ctx.data.eval)} held-out rows appear in training"))
    return out


def _digest(ids: list[int]) -> bytes:
    return hashlib.blake2b(json.dumps(ids).encode(), digest_size=16).digest()


def vocabulary(ctx: Context) -> list[Check]:
    rows = getattr(ctx.model_config, "vocab_size", None) or len(ctx.tokenizer)
    needed = len(ctx.tokenizer)
    new_rows = resize_rows(rows, needed)
    added = [t for t in ctx.report.added_tokens if t != ctx.tokenizer.pad_token]
    out = [Check("vocabulary vs embeddings", FIXED if new_rows != rows else OK,
                 "token ids beyond the embedding rows crash or read garbage",
                 f"{needed} tokens, {rows} rows -> resize to {new_rows} (new rows = mean embedding)"
                 if new_rows != rows else f"{needed} tokens fit in {rows} rows")]
    if added:
        trainable = ctx.cfg.peft.method == "none" or ctx.cfg.peft.train_new_tokens
        out.append(Check("new tokens trainable", OK if trainable else WARNING,
                         "new tokens start as the mean embedding: frozen, they carry no meaning",
                         f"{added} trainable" if trainable else f"{added} frozen: set peft.train_new_tokens=true"))
    return out


def padding_sides(ctx: Context) -> list[Check]:
    return [Check("padding side", OK, "generation must pad on the left",
                  f"training pads {ctx.tokenizer.padding_side}; the inference helper pads left")]


def _dropped(st: DataStats, on_bad_row: str) -> str:
    """How many rows were dropped as malformed, why, and where the first are (row indices, FILE:LINE)."""
    reasons = "; ".join(f"{n}x {r}" for r, n in st.bad_rows.items())
    where = st.bad_positions()
    return (f"{sum(st.bad_rows.values())} of {st.rows_in} rows {'refused' if on_bad_row == 'error' else 'dropped'}: "
            f"{reasons}" + (f" ({where})" if where else ""))


def malformed_rows(ctx: Context) -> list[Check]:
    """data.on_bad_row=drop: what the data stage left out (data/pipeline.py counts it), so no row is lost
    unnoticed."""
    st = ctx.data.stats["train"]
    bad = sum(st.bad_rows.values())
    return [Check("malformed rows", WARNING if bad else OK, "dropped rows are data you meant to train on",
                  _dropped(st, ctx.cfg.data.on_bad_row) if bad else f"none of {st.rows_in} rows malformed")]


def preference_rows(ctx: Context) -> list[Check]:
    """task=dpo|kto: what the preference data stage dropped (data/preference.py lists the reasons) and cut."""
    st = ctx.data.stats["train"]
    bad = sum(st.bad_rows.values())
    action = _dropped(st, ctx.cfg.data.on_bad_row) if bad else f"{st.rows_kept} of {st.rows_in} rows usable"
    out = [Check("preference rows", WARNING if bad else OK, "chosen == rejected, an empty side, an answer that repeats "
                 "the prompt or is cut whole teaches nothing, or the wrong thing", action)]
    out.append(Check("answers truncated", WARNING if st.truncated else OK, "a cut answer loses its end-of-turn token: "
                     "the model is not taught to stop after it",
                     f"{st.truncated} of {st.rows_kept} rows have an answer cut at train.max_length="
                     f"{ctx.cfg.train.max_length}: raise it" if st.truncated else "no answer cut"))
    return out


def preference_eos(ctx: Context) -> list[Check]:
    """Every uncut answer ends with EOS or the end-of-turn token (DESIGN rule 2)."""
    stops = set(stop_token_ids(ctx.tokenizer))
    rows = ctx.data.train.select(range(min(SAMPLE, len(ctx.data.train))))
    answers = [c for c in ("chosen_ids", "rejected_ids", "completion_ids") if c in rows.column_names]
    room = ctx.cfg.train.max_length
    missing = sum(1 for row in rows for c in answers
                  if len(row["prompt_ids"]) + len(row[c]) < room and (not row[c] or row[c][-1] not in stops))
    total = len(rows) * len(answers)
    return [Check("EOS trained", ERROR if missing else OK, "an answer without its end token teaches the model not to "
                  "stop", f"{missing} of {total} sampled answers lack EOS / end-of-turn: check the chat template"
                  if missing else f"all {total} sampled answers end with EOS / end-of-turn")]


def prompt_rows(ctx: Context) -> list[Check]:
    """task=grpo|rloo: the prompt rows the policy completes (data/prompts.py lists what it dropped), and the columns
    the reward functions will receive."""
    st = ctx.data.stats["train"]
    bad = sum(st.bad_rows.values())
    columns = [c for c in ctx.data.train.column_names if c != "prompt"]
    action = _dropped(st, ctx.cfg.data.on_bad_row) if bad else f"{st.rows_kept} of {st.rows_in} prompts usable"
    return [Check("prompt rows", WARNING if bad else OK, "a row without a prompt, ending in an answer, or longer than "
                  "train.max_length cannot be sampled", action),
            Check("reward columns", OK, "every column besides the prompt reaches the reward functions by its name",
                  ", ".join(columns) if columns else "none: the rewards see only prompts and completions")]


CHECKS: list[Callable[[Context], list[Check]]] = [
    special_tokens, eos_trained, chat_template, response_templates, malformed_rows, masking_and_lengths, vocabulary,
    padding_sides,
]
# Preference rows (task=dpo|kto) hold prompt and answer ids, not labels.
PREFERENCE_CHECKS: list[Callable[[Context], list[Check]]] = [
    special_tokens, preference_eos, preference_rows, vocabulary, padding_sides,
]
# Prompt rows (task=grpo|rloo) hold rendered prompts and the reward functions' columns; the reward doctor
# (tasks/reward_doctor.py) samples from the starting policy once the weights are loaded.
PROMPT_CHECKS: list[Callable[[Context], list[Check]]] = [special_tokens, prompt_rows, vocabulary, padding_sides]
# The check list each task names (config/tasks.Task.doctor).
CHECK_LISTS = {"sft": CHECKS, "preference": PREFERENCE_CHECKS, "prompts": PROMPT_CHECKS}


def run_checks(ctx: Context) -> list[Check]:
    return [check for fn in CHECK_LISTS[task(ctx.cfg.task).doctor] for check in fn(ctx)]


def before_training(cfg: TuneforgeConfig, tokenizer, tok_report, model_path: str, data: PreparedData,
                    run_dir: Path | None) -> None:
    """The doctor's checks on what training will use; errors stop the run before weights load. `run_dir`: where
    doctor.json goes (None: not the main process)."""
    from tuneforge.models.loading import load_config

    checks = run_checks(Context(cfg, tokenizer, tok_report, load_config(model_path, cfg.model), data))
    if run_dir is not None:
        write_json(checks, run_dir / "doctor.json")
    if has_errors(checks):
        print_table(checks)
        raise ConfigError("the doctor found errors (table above); fix them or set doctor.enabled=false to override.")
    for c in checks:
        if c.status in (WARNING, FIXED):
            log.info("doctor: %s %s: %s", c.name, c.status, c.action)


def has_errors(checks: list[Check]) -> bool:
    return any(c.status == ERROR for c in checks)


_STYLE = {OK: "green", FIXED: "cyan", WARNING: "yellow", ERROR: "bold red"}


def print_table(checks: list[Check], console: Console | None = None) -> None:
    table = Table(title="tuneforge doctor")
    for column in ("check", "status", "why it matters", "done / to do"):
        table.add_column(column, overflow="fold")
    for c in checks:
        table.add_row(c.name, f"[{_STYLE[c.status]}]{c.status}[/]", c.why, c.action)
    (console or Console()).print(table)


def write_json(checks: list[Check], path: Path) -> None:
    from tuneforge.runs.rundir import write_json as atomic_json

    atomic_json(path, {"errors": has_errors(checks), "checks": [asdict(c) for c in checks]})
