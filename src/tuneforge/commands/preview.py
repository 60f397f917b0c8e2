"""`tuneforge preview`: see exactly what the model will train on, before loading any weights.

Prints n prepared samples with trained tokens (label != -100) and masked tokens told apart -- colour
in a terminal (rich), plain markers elsewhere -- and the data statistics that decide batch shapes:
rows kept/dropped (and why), token lengths, truncation, padding waste without packing. Writes
preview.html (the same samples, coloured) and a token-length histogram PNG to `preview.output_dir`.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from tuneforge.commands.base import INSPECT_ARGS, hydra_command
from tuneforge.config.compose import to_validated
from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import TuneforgeConfig
from tuneforge.config.tasks import task

# Imported where used: `tuneforge --help` reads every command module, and must not load torch.
if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from tuneforge.data.pipeline import DataStats, PreparedData

log = logging.getLogger(__name__)

# Plain-text markers around trained text when the output is not a terminal (logs, CI, pipes).
OPEN, CLOSE = "\u00ab", "\u00bb"  # « »
PREVIEW_ROOT = Path("outputs") / "preview"


@dataclass
class LengthStats:
    rows: int
    min: int
    median: float
    p95: int
    max: int
    truncated_fraction: float
    padding_waste: float  # padded positions / all positions, batches in dataset order, no packing
    batch_size: int


def segments(tokenizer: PreTrainedTokenizerBase, ids: list[int], labels: list[int]) -> list[tuple[bool, str]]:
    """(trained?, text) runs of consecutive tokens with the same mask."""
    from tuneforge.data.tokenize import IGNORE

    runs: list[tuple[bool, list[int]]] = []
    for tok, lab in zip(ids, labels):
        trained = lab != IGNORE
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(tok)
        else:
            runs.append((trained, [tok]))
    return [(t, tokenizer.decode(r, skip_special_tokens=False)) for t, r in runs]


def plain(segs: list[tuple[bool, str]]) -> str:
    return "".join(f"{OPEN}{text}{CLOSE}" if trained else text for trained, text in segs)


def as_html(segs: list[tuple[bool, str]]) -> str:
    return "".join(f'<span class="{"t" if trained else "m"}">{html.escape(text)}</span>' for trained, text in segs)


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile (an actual row length, no interpolation)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


def padding_waste(lengths: list[int], batch_size: int, multiple: Optional[int] = None) -> float:
    """Share of positions that would be padding when rows are batched in order and padded to the batch max."""
    total = padded = 0
    for i in range(0, len(lengths), batch_size):
        batch = lengths[i:i + batch_size]
        width = max(batch)
        if multiple:
            width = -(-width // multiple) * multiple
        total += width * len(batch)
        padded += width * len(batch) - sum(batch)
    return padded / total if total else 0.0


def length_stats(ds: Dataset, st: DataStats, batch_size: int, multiple: Optional[int]) -> tuple[LengthStats, list[int]]:
    import pyarrow.compute as pc

    lengths = pc.list_value_length(ds.with_format("arrow")[:]["input_ids"]).to_pylist() if len(ds) else []
    ordered = sorted(lengths)
    return LengthStats(
        rows=len(lengths),
        min=ordered[0] if ordered else 0,
        median=statistics.median(ordered) if ordered else 0,
        p95=percentile(ordered, 0.95),
        max=ordered[-1] if ordered else 0,
        truncated_fraction=st.truncated / st.rows_kept if st.rows_kept else 0.0,
        padding_waste=padding_waste(lengths, batch_size, multiple),
        batch_size=batch_size,
    ), lengths


def histogram(lengths: list[int], max_length: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(lengths, bins=min(50, max(5, len(set(lengths)))), color="#4c72b0")
    ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"train.max_length={max_length}")
    ax.set_xlabel("tokens per row")
    ax.set_ylabel("rows")
    ax.set_title("Token lengths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def stats_lines(st: DataStats, ls: LengthStats, split: str) -> list[str]:
    lines = [
        f"{split}: {st.rows_in} rows read, {st.rows_kept} kept, {st.rows_dropped} dropped "
        f"({sum(st.bad_rows.values())} malformed, {st.fully_masked} with nothing to train)",
    ]
    for reason, count in st.bad_rows.items():
        lines.append(f"  dropped {count} x {reason}")
    if st.bad_positions():
        lines.append(f"  {st.bad_positions()}")
    for source, count in st.sources.items():
        lines.append(f"  from {source}: {count} rows")
    lines += [
        f"tokens per row: min {ls.min}, median {ls.median:g}, p95 {ls.p95}, max {ls.max}",
        f"tokens: {st.tokens} ({st.trained_tokens} trained, {st.trained_tokens / st.tokens:.1%})" if st.tokens else "tokens: 0",
        f"truncated to train.max_length: {st.truncated} rows ({ls.truncated_fraction:.1%})",
        f"padding waste at batch size {ls.batch_size}, no packing: {ls.padding_waste:.1%} of positions",
    ]
    return lines


_CSS = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "pre{white-space:pre-wrap;background:#f7f7f7;padding:.6em;border-radius:4px}"
        ".t{background:#c8f0c8;color:#0a5a0a;font-weight:bold}.m{color:#777}")


def write_html(path: Path, samples: list[list[tuple[bool, str]]], lines: list[str], png: str, title: str) -> Path:
    body = [f"<h1>{html.escape(title)}</h1>",
            '<p><span class="t">trained</span> tokens (label = token id) vs <span class="m">masked</span> (label -100)</p>',
            "<h2>Statistics</h2><pre>" + html.escape("\n".join(lines)) + "</pre>",
            f'<img src="{html.escape(png)}" alt="token-length histogram">', "<h2>Samples</h2>"]
    body += [f"<h3>row {i}</h3><pre>{as_html(s)}</pre>" for i, s in enumerate(samples)]
    path.write_text(f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
                    f"<style>{_CSS}</style>" + "\n".join(body))
    return path


def output_dir(configured: Optional[str]) -> Path:
    """preview.output_dir, else a fresh outputs/preview/<date>/<time> (never the working directory itself)."""
    if configured:
        return Path(configured).expanduser()
    now = dt.datetime.now()
    return PREVIEW_ROOT / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S-%f")


def show(data: PreparedData, tokenizer: PreTrainedTokenizerBase, cfg: TuneforgeConfig, console=None) -> Path:
    """Print samples + statistics and write preview.html and token_lengths.png; returns the directory."""
    from rich.console import Console
    from rich.text import Text

    console = console or Console(highlight=False, soft_wrap=True)
    split = cfg.preview.split
    ds, st = (data.train, data.stats["train"]) if split == "train" else (data.eval, data.stats["eval"])
    out = output_dir(cfg.preview.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = ds.select(range(min(cfg.preview.n, len(ds))))
    samples = [segments(tokenizer, r["input_ids"], r["labels"]) for r in rows]
    terminal = console.is_terminal
    legend = ("[bold green]trained[/] vs [dim]masked[/] tokens" if terminal
              else f"{OPEN}trained{CLOSE} tokens are marked; the rest is masked (label -100)")
    sources = ", ".join(f"{s.path} ({(s.format or cfg.format).strategy})" for s in cfg.data.mix) or (
        f"{cfg.data.path} ({cfg.format.strategy})")
    console.print(f"data: {sources}; collator={cfg.collator.name}; train.max_length={cfg.train.max_length}"
                  + (f"; prepared data from cache {data.cache_path}" if data.cache_hit else ""), markup=False)
    console.print(f"{len(samples)} {split} sample(s) as the model sees them: {legend}")
    for i, segs in enumerate(samples):
        console.rule(f"row {i}", style="dim") if terminal else console.print(f"--- row {i} ---")
        if terminal:
            text = Text()
            for trained, piece in segs:
                text.append(piece, style="bold green" if trained else "dim")
            console.print(text)
        else:
            console.print(plain(segs), markup=False)
    ls, lengths = length_stats(ds, st, cfg.train.per_device_train_batch_size, cfg.collator.pad_to_multiple_of)
    lines = stats_lines(st, ls, split)
    png = histogram(lengths, cfg.train.max_length, out / "token_lengths.png")
    page = write_html(out / "preview.html", samples, lines, png.name, f"tuneforge preview: {cfg.data.path} ({split})")
    console.print("--- statistics ---")
    for line in lines:
        console.print(line, markup=False)
    console.print(f"wrote {page} and {png}", markup=False)
    return out


def run(cfg: TuneforgeConfig) -> Path:
    """The task's own data stage (tokenizer + prepared rows, cached like `train`), then `show`: no model weights
    are loaded."""
    spec = task(cfg.task)
    if not spec.preview:  # its rows are not input_ids + labels (e.g. prompt + answer ids)
        raise ConfigError(f"tuneforge preview shows input ids with their loss masks; for task={cfg.task} run `tuneforge "
                          "doctor` with the same arguments: it prepares the task's rows and reports the bad, cut and "
                          "usable ones." if spec.doctor else
                          f"tuneforge preview shows input ids with their loss masks; task={cfg.task} trains on none.")
    from tuneforge.tasks.stages import stages_class

    stages = stages_class(cfg.task)(cfg, None, True)  # no run directory: prepare() only reads and caches
    stages.prepare()
    return show(stages.data, stages.tokenizer, cfg)


def cli_args(args: list[str]) -> list[str]:
    """`n=5` is short for `preview.n=5`; everything else passes through."""
    return [f"preview.{a}" if a.startswith("n=") else a for a in args]


def app(dcfg) -> Path:
    """The Hydra app behind `tuneforge preview`: files go to preview.output_dir, else a fresh
    outputs/preview/<date>/<time> (never Hydra's run directory, which for inspection commands is the cwd)."""
    return run(to_validated(dcfg))


COMMAND = hydra_command(
    "preview", "formatted samples with trained/masked tokens + data statistics, no weights loaded",
    "tuneforge preview [overrides] [n=5]   (writes preview.html under outputs/preview/)",
    config_name="config", schema=TuneforgeConfig, app=app, rewrite_args=cli_args, extra_args=INSPECT_ARGS)
