"""tuneforge's GPU memory estimate (src/tuneforge/models/estimate.py) against peaks measured by gpu_train.py.

    python benchmarks/estimate_memory.py        # prints the table, writes results/estimate_memory.json

The measured figures are peak allocated CUDA memory on an H100 (NF4, LoRA r=16 alpha=32 dropout 0.05 on all
linear layers, max_length 4096), from gpu_train.py runs on random-initialised Llama shapes (SHAPES there).
Packed arms train rows of 4096 tokens, so a micro-batch of 2 is 8192 tokens; the plain-TRL padded arm (a)
pads 8 sequences to the longest of the batch, at most 8 x 4096 (the estimate takes that bound). Arm (a) is
TRL's own QLoRA path, which does not call prepare_model_for_kbit_training: its embeddings and residual stream
stay bf16 (upcast_non_quantized=False).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

# (label, shape, micro-batch, gradient checkpointing, Liger kernels, tuneforge's QLoRA path, measured GiB, source)
MEASURED = [
    ("1B, arm b (tuneforge), 2x4096, GC", "1b", 2, True, False, True, 4.80, "results/gpu_train-h100-1b-chat.json"),
    ("1B, arm c_gc (Liger + GC), 2x4096", "1b", 2, True, True, True, 4.55, "results/gpu_train-h100-1b-chat.json"),
    ("1B, arm c (Liger, no GC), 2x4096", "1b", 2, False, True, True, 22.73, "results/gpu_train-h100-1b-chat.json"),
    ("8B, arm b (tuneforge), 2x4096, GC", "8b", 2, True, False, True, 15.6, "H100 run (issue 8 brief)"),
    ("8B, arm c_gc (Liger + GC), 2x4096", "8b", 2, True, True, True, 15.1, "H100 run (issue 8 brief)"),
    ("8B, arm a (plain TRL, padded 8), GC", "8b", 8, True, False, False, 24.3, "H100 run (issue 8 brief)"),
]


def rows() -> list[dict]:
    from gpu_train import SHAPES
    from transformers import LlamaConfig

    from tuneforge.config.compose import load_config
    from tuneforge.models.estimate import estimate_memory

    out = []
    for label, shape, micro, gc, liger, upcast, measured, source in MEASURED:
        cfg = load_config([f"train.per_device_train_batch_size={micro}", "train.max_length=4096",
                           f"train.gradient_checkpointing={str(gc).lower()}", "peft.r=16", "peft.lora_alpha=32",
                           "peft.lora_dropout=0.05", "model=hub", "model.name_or_path=random-llama"])
        config = LlamaConfig(**SHAPES[shape])
        est = estimate_memory(config, cfg, liger=liger, upcast_non_quantized=upcast)
        out.append({"case": label, "measured_gib": measured, "estimate_gib": round(est["total"], 2),
                    "error_pct": round(100 * (est["total"] - measured) / measured, 1),
                    "parts_gib": {k: round(v, 2) for k, v in est.items() if k != "total"}, "source": source})
    return out


def main() -> int:
    results = rows()
    print("| case | measured GiB | estimate GiB | error |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['measured_gib']:.2f} | {r['estimate_gib']:.2f} | {r['error_pct']:+.1f}% |")
    (HERE / "results" / "estimate_memory.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
