"""Packing throughput on CPU: none vs bfd vs padding_free, embedded SmolLM2-135M + LoRA, alpaca_5000.

Every arm trains on the same prepared rows (alpaca format, chat template, completion-only masks,
train.max_length) with the same batch size, model, LoRA adapters and optimizer; what differs is only
the packing mode, i.e. the rows (`data/packing.py`) and the collator (`data/collators.py`) tuneforge
would use. A step = collate a batch, forward + backward (no KV cache, as SFTTrainer runs it), AdamW step.
Arms run interleaved, one step each in turn, so that drift in machine load hits all arms alike; the
first step of each arm is a warm-up and not counted. Reported per arm, as medians over the steps:
non-pad tokens per second, padding efficiency (real tokens / tokens processed), and for packed rows
the fill (real tokens / rows x max_length: what padding efficiency would be if packed rows were padded
to max_length instead of flattened).

    python benchmarks/packing.py [--data PATH] [--rows 800] [--steps 6] [--batch-size 8] [--max-length 512]
                                 [--quant none|nf4] [--out benchmarks/results/packing.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "alpaca_5000.json"
MODES = ("none", "bfd", "padding_free")


def prepared_rows(path: Path, rows: int, max_length: int, tokenizer):
    from tuneforge.config.schemas import CollatorConfig, DataConfig, FormatConfig, TrainConfig
    from tuneforge.data.pipeline import prepare

    data_cfg = DataConfig(path=str(path), eval_fraction=0.0, max_samples=rows, seed=0)
    data = prepare(data_cfg, FormatConfig(strategy="alpaca"), TrainConfig(max_length=max_length), tokenizer,
                   CollatorConfig())
    return data.train


def batches(ds, batch_size: int, seed: int):
    """Batches of a seeded random order of the rows, cycling (what the Trainer's random sampler does)."""
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    while True:
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [ds[j] for j in order[i:i + batch_size]]


def step(model, optimizer, batch) -> float:
    start = time.perf_counter()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def git_commit() -> str:
    """HEAD, marked when the code this benchmark runs differs from it."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
        dirty = run("status", "--porcelain", "--", "src", "benchmarks/packing.py")
        return run("rev-parse", "HEAD") + (" (+ uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rows", type=int, default=800, help="alpaca rows used by every arm")
    parser.add_argument("--steps", type=int, default=6, help="steps per arm, the first one a warm-up")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--quant", choices=("none", "nf4"), default="none")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "packing.json")
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f"{args.data} is absent (shared benchmark data lives beside the checkout)")

    import peft
    import transformers
    import trl

    from tuneforge.config.schemas import (
        CollatorConfig,
        ModelConfig,
        PackingConfig,
        PeftConfig,
        QuantConfig,
        TokenizerConfig,
    )
    from tuneforge.data.collators import TokenCounter, build_collator
    from tuneforge.data.packing import check_no_contamination, pack, probe_rows
    from tuneforge.models.adapters import add_lora, prepare_base
    from tuneforge.models.loading import fit_embeddings, load_model, resolve_path
    from tuneforge.models.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model_cfg = ModelConfig(dtype="float32")
    quant = QuantConfig(load_in_4bit=args.quant == "nf4")
    path = resolve_path(model_cfg)
    tokenizer, _ = load_tokenizer(path, TokenizerConfig())
    rows = prepared_rows(args.data, args.rows, args.max_length, tokenizer)
    model = load_model(path, model_cfg, quant)
    fit_embeddings(model, tokenizer)
    model = add_lora(prepare_base(model, quant), PeftConfig(lora_dropout=0.0))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    arms = {}
    for mode in MODES:
        packing = PackingConfig(mode=mode)
        data, stats = pack(rows, packing, args.max_length)
        counter = TokenCounter(build_collator(CollatorConfig(), packing, tokenizer))
        if mode != "none":
            check_no_contamination(model, counter.collate, probe_rows(rows))
        arms[mode] = {"stats": stats, "counter": counter, "batches": batches(data, args.batch_size, seed=0),
                      "seconds": [], "real": [], "processed": []}

    load_start = os.getloadavg()
    for i in range(args.steps):
        for mode, arm in arms.items():
            before = arm["counter"].counts.sum(dim=0).clone()
            batch = arm["counter"](next(arm["batches"]))
            real, processed, _ = (int(x) for x in arm["counter"].counts.sum(dim=0) - before)
            seconds = step(model, optimizer, batch)
            if i > 0:  # the first step of each arm is a warm-up
                arm["seconds"].append(seconds)
                arm["real"].append(real)
                arm["processed"].append(processed)
            print(f"step {i} {mode:>12}: {real:5d} real / {processed:5d} processed tokens, {seconds:6.2f} s", flush=True)

    table = []
    for mode, arm in arms.items():
        tps = [r / s for r, s in zip(arm["real"], arm["seconds"])]
        table.append({
            "mode": mode,
            "rows": arm["stats"].rows_out,
            "real_tokens_per_step": statistics.median(arm["real"]),
            "step_s": statistics.median(arm["seconds"]),
            "tokens_per_s": statistics.median(tps),
            "padding_efficiency": statistics.median(r / p for r, p in zip(arm["real"], arm["processed"])),
            "fill": arm["stats"].fill,
        })
    base = next(r["tokens_per_s"] for r in table if r["mode"] == "none")
    for r in table:
        r["tokens_per_s_vs_none"] = r["tokens_per_s"] / base

    header = f"{'mode':>12} {'rows':>5} {'tokens/step':>11} {'step s':>7} {'tokens/s':>9} {'vs none':>7} {'pad eff':>7} {'fill':>5}"
    print("\n" + header)
    for r in table:
        fill = f"{r['fill']:.3f}" if r["fill"] is not None else "-"
        print(f"{r['mode']:>12} {r['rows']:>5} {r['real_tokens_per_step']:>11.0f} {r['step_s']:>7.2f} "
              f"{r['tokens_per_s']:>9.1f} {r['tokens_per_s_vs_none']:>7.2f} {r['padding_efficiency']:>7.3f} {fill:>5}")

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": git_commit(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "trl": trl.__version__, "peft": peft.__version__},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "settings": {"data": str(args.data.name), "rows": args.rows, "steps": args.steps, "warmup_steps": 1,
                     "batch_size": args.batch_size, "max_length": args.max_length, "quant": args.quant,
                     "model": "embedded SmolLM2-135M-Instruct + LoRA r=16 (all-linear)", "dtype": "float32"},
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
