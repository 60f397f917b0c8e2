"""Data preparation throughput on alpaca_5000 with the embedded SmolLM2 tokenizer.

Arms (same rows, same chat template, same max_length; the token ids of every arm are asserted equal):
  floor          one batched fast-tokenizer call over the already-formatted texts (nothing else)
  naive          the tutorial way: load, drop empty outputs, `Dataset.map` one row at a time
                 (render the chat template, one tokenizer call per row); no loss masks
  tuneforge cold `prepare()` from the JSON file to tokens + loss masks + stats, empty cache
  tuneforge hot  `prepare()` again: answered from tuneforge's content-keyed cache

Every arm runs --repeats times, interleaved (so drift in machine load hits all arms alike); the table
reports median wall times (rows/s and the ratios the targets use) and median process CPU times (all
threads), which are less sensitive to other processes competing for the cores. The raw JSON -> Arrow
conversion is cached by `datasets` after a warm-up (untimed) for the arms that load the file.

    python benchmarks/preprocess.py [--data PATH] [--repeats 5] [--out benchmarks/results/preprocess.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_5000.json"
MAX_LENGTH = 512
TARGETS = {"cold_vs_naive": 2.0, "cold_vs_floor": 0.6, "hot_vs_naive": 20.0}


def messages(row: dict) -> list[dict[str, str]]:
    """Alpaca as chat, written independently of tuneforge's formatter (the ids comparison checks both)."""
    user = row["instruction"] + (f"\n\n{row['input']}" if row["input"].strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def arm_floor(tokenizer, texts):
    enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=MAX_LENGTH)
    return enc["input_ids"]


def arm_naive(tokenizer, path):
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(path), split="train")
    ds = ds.filter(lambda r: bool(r["output"].strip()))

    def one_row(row):
        text = tokenizer.apply_chat_template(messages(row), tokenize=False)
        return tokenizer(text, add_special_tokens=False, truncation=True, max_length=MAX_LENGTH)

    # Recompute every repeat (datasets would otherwise answer from its own cache of this very map).
    out = ds.map(one_row, remove_columns=ds.column_names, load_from_cache_file=False)
    return out["input_ids"]


def data_config(path, cache_dir):
    from tuneforge.config.schemas import DataConfig

    return DataConfig(path=str(path), eval_fraction=0.0, shuffle=False, cache_dir=str(cache_dir))


def arm_tuneforge(tokenizer, path, cache_dir):
    from tuneforge.config.schemas import FormatConfig, TrainConfig
    from tuneforge.data.pipeline import prepare

    data = prepare(data_config(path, cache_dir), FormatConfig(strategy="alpaca"), TrainConfig(max_length=MAX_LENGTH),
                   tokenizer)
    return data


# What this benchmark runs: uncommitted changes here are listed next to the commit in the results.
_MEASURED = ["src/tuneforge/data", "src/tuneforge/models/tokenizer.py", "src/tuneforge/config", "benchmarks/preprocess.py"]


def git_commit() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *_MEASURED], cwd=REPO,
                               capture_output=True, text=True).stdout.split("\n")
        return {"commit": sha, "uncommitted": [line[3:] for line in dirty if line.strip()]}
    except OSError:
        return {"commit": "unknown", "uncommitted": []}


def versions() -> dict:
    import datasets
    import tokenizers
    import transformers

    return {"python": platform.python_version(), "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "datasets": datasets.__version__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "preprocess.json"))
    args = parser.parse_args(argv)
    path = Path(args.data)
    if not path.exists():
        print(f"{path} not found (the shared data lives beside the checkout); pass --data.", file=sys.stderr)
        return 2

    from datasets import disable_progress_bars
    from transformers.utils import logging as hf_logging

    from tuneforge.config.schemas import TokenizerConfig
    from tuneforge.models.embedded import resolve
    from tuneforge.models.tokenizer import load_tokenizer

    disable_progress_bars()
    hf_logging.set_verbosity_error()
    tokenizer, _ = load_tokenizer(str(resolve("embedded:smollm2-135m-instruct")), TokenizerConfig())
    rows = [r for r in json.loads(path.read_text()) if r["output"].strip()]
    texts = tokenizer.apply_chat_template([messages(r) for r in rows], tokenize=False)
    tmp = Path(tempfile.mkdtemp(prefix="tf-bench-"))
    load_avg_start = os.getloadavg()

    # Warm-up (untimed): datasets' JSON -> Arrow cache, the chat-template compile cache, the BPE word cache.
    reference = arm_floor(tokenizer, texts)
    arm_naive(tokenizer, path)
    arm_tuneforge(tokenizer, path, tmp / "warm")

    runs: dict[str, list[tuple[float, float]]] = {"floor": [], "naive": [], "tuneforge cold": [], "tuneforge hot": []}
    for r in range(args.repeats):
        ids, wall, cpu = timed(lambda: arm_floor(tokenizer, texts))
        assert ids == reference
        runs["floor"].append((wall, cpu))
        ids, wall, cpu = timed(lambda: arm_naive(tokenizer, path))
        assert ids == reference, "naive ids differ from the floor's"
        runs["naive"].append((wall, cpu))
        cache = tmp / f"run{r}"
        data, wall, cpu = timed(lambda: arm_tuneforge(tokenizer, path, cache))
        assert not data.cache_hit and data.train["input_ids"] == reference, "tuneforge ids differ from the floor's"
        runs["tuneforge cold"].append((wall, cpu))
        data, wall, cpu = timed(lambda: arm_tuneforge(tokenizer, path, cache))
        assert data.cache_hit and data.train["input_ids"] == reference, "cached ids differ from the floor's"
        runs["tuneforge hot"].append((wall, cpu))
        shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)

    n = len(reference)
    med = {arm: statistics.median(w for w, _ in v) for arm, v in runs.items()}
    cpu = {arm: statistics.median(c for _, c in v) for arm, v in runs.items()}
    results = {}
    for arm, v in runs.items():
        results[arm] = {"wall_s_median": med[arm], "wall_s_min": min(w for w, _ in v), "wall_s_all": [w for w, _ in v],
                        "cpu_s_median": cpu[arm], "cpu_s_all": [c for _, c in v], "rows_per_s": n / med[arm],
                        "vs_naive": med["naive"] / med[arm], "vs_floor": med["floor"] / med[arm],
                        # Process CPU time (all threads): less sensitive to other people's load on the machine.
                        "cpu_vs_naive": cpu["naive"] / cpu[arm], "cpu_vs_floor": cpu["floor"] / cpu[arm]}
    checks = {
        "cold >= 2x naive rows/s": results["tuneforge cold"]["vs_naive"] >= TARGETS["cold_vs_naive"],
        "cold >= 0.6x floor rows/s": results["tuneforge cold"]["vs_floor"] >= TARGETS["cold_vs_floor"],
        "hot >= 20x naive rows/s": results["tuneforge hot"]["vs_naive"] >= TARGETS["hot_vs_naive"],
    }

    print(f"{n} rows, max_length {MAX_LENGTH}, {args.repeats} interleaved repeats, median wall time "
          f"(load average at start {load_avg_start[0]:.2f}, at end {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores)")
    print(f"{'arm':<16}{'wall s':>8}{'rows/s':>9}{'x naive':>9}{'x floor':>9}{'cpu s':>8}{'cpu x naive':>13}"
          f"{'cpu x floor':>13}")
    for arm, r in results.items():
        print(f"{arm:<16}{r['wall_s_median']:>8.3f}{r['rows_per_s']:>9.0f}{r['vs_naive']:>9.2f}{r['vs_floor']:>9.2f}"
              f"{r['cpu_s_median']:>8.3f}{r['cpu_vs_naive']:>13.2f}{r['cpu_vs_floor']:>13.2f}")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'MISS'}  {name}")
    print("token ids identical in every arm and repeat: yes (asserted)")

    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git": git_commit(),
        "versions": versions(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_start": load_avg_start, "load_average_end": os.getloadavg()},
        "data": str(path), "rows": n, "max_length": MAX_LENGTH, "repeats": args.repeats,
        "results": results, "targets": TARGETS, "checks": checks, "ids_identical": True,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
