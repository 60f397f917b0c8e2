"""`tuneforge preview`: samples with trained/masked tokens, statistics, preview.html and the histogram."""

from __future__ import annotations

import io
from pathlib import Path

from conftest import cli_in_process
from rich.console import Console

from tuneforge.commands.preview import CLOSE, OPEN, cli_args, output_dir, padding_waste, percentile, segments, show
from tuneforge.config.schemas import DataConfig, TuneforgeConfig
from tuneforge.data.pipeline import prepare


def test_padding_waste_and_percentile():
    # batches [10, 2] -> width 10, [5, 5] -> width 5: 8 padded of 30 positions
    assert padding_waste([10, 2, 5, 5], batch_size=2) == 8 / 30
    assert padding_waste([3, 3], batch_size=2, multiple=8) == 10 / 16
    assert percentile(list(range(1, 101)), 0.95) == 95 and percentile([7], 0.95) == 7


def test_segments_split_trained_from_masked(smollm_tokenizer):
    ids = smollm_tokenizer("Q: capital of France?\nA: Paris", add_special_tokens=False)["input_ids"]
    labels = [-100] * (len(ids) - 1) + [ids[-1]]
    assert segments(smollm_tokenizer, ids, labels) == [(False, "Q: capital of France?\nA:"), (True, " Paris")]


def test_show_prints_marked_samples_stats_and_writes_files(smollm_tokenizer, tmp_path):
    cfg = TuneforgeConfig(data=DataConfig(builtin_rows=30, cache_dir=str(tmp_path / "cache")))
    cfg.preview.n, cfg.preview.output_dir = 2, str(tmp_path / "preview")
    data = prepare(cfg.data, cfg.format, cfg.train, smollm_tokenizer)
    buf = io.StringIO()
    out = show(data, smollm_tokenizer, cfg, Console(file=buf, width=200))  # not a terminal: plain markers
    text = buf.getvalue()
    assert text.count("--- row") == 2
    answer = data.train[0]["input_ids"]
    completion = smollm_tokenizer.decode([i for i, l in zip(answer, data.train[0]["labels"]) if l != -100])
    assert f"{OPEN}{completion}{CLOSE}" in text and f"{OPEN}<|im_start|>" not in text
    assert "27 rows read, 27 kept, 0 dropped" in text
    assert "tokens per row: min" in text and "p95" in text and "padding waste at batch size 8" in text
    page = (out / "preview.html").read_text()
    assert page.count('<span class="t">') >= 2 and "token_lengths.png" in page
    assert (out / "token_lengths.png").read_bytes()[:4] == b"\x89PNG"


def test_terminal_output_is_coloured_not_marked(smollm_tokenizer, tmp_path):
    cfg = TuneforgeConfig(data=DataConfig(builtin_rows=30, cache_dir=str(tmp_path / "cache")))
    cfg.preview.n, cfg.preview.output_dir = 1, str(tmp_path / "preview")
    data = prepare(cfg.data, cfg.format, cfg.train, smollm_tokenizer)
    buf = io.StringIO()
    show(data, smollm_tokenizer, cfg, Console(file=buf, width=200, force_terminal=True, color_system="standard"))
    text = buf.getvalue()
    assert "\x1b[1;32m" in text and "\x1b[2m" in text  # bold green = trained, dim = masked
    assert OPEN not in text


def test_cli_args_shorthand_and_default_directory():
    assert cli_args(["n=3", "data.builtin_rows=40"]) == ["preview.n=3", "data.builtin_rows=40"]
    assert str(output_dir(None)).startswith("outputs/preview/") and output_dir("~/pv") == Path("~/pv").expanduser()


def test_preview_cli_on_the_demo(tmp_path):
    out = tmp_path / "pv"
    proc = cli_in_process("preview", "n=1", "data.builtin_rows=40", f"preview.output_dir={out}",
                   f"data.cache_dir={tmp_path}/cache", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--- row 0 ---" in proc.stdout and OPEN in proc.stdout and "padding waste" in proc.stdout
    assert (out / "preview.html").exists() and (out / "token_lengths.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "pv"]  # nothing dropped into the cwd
    default = cli_in_process("preview", "n=1", "data.builtin_rows=40", f"data.cache_dir={tmp_path}/cache", cwd=tmp_path)
    assert default.returncode == 0, default.stderr
    (page,) = (tmp_path / "outputs" / "preview").glob("*/*/preview.html")
    assert not (tmp_path / "preview.html").exists()
    bad = cli_in_process("preview", "n=1", "data.on_bad_rows=drop")
    assert bad.returncode == 2 and "data.on_bad_row" in bad.stderr
