"""Bytes that dtype casts move in one LoRA training step under bf16 autocast, with and without tuneforge's
`keep_input_dtype_under_autocast` (src/tuneforge/models/adapters.py).

    python benchmarks/lora_casts.py                 # -> results/lora_casts.json
    python benchmarks/lora_casts.py --shapes 135m,8b --tokens 128

PEFT keeps LoRA adapters in fp32 and casts each adapted layer's input to fp32, which autocast casts straight
back to bf16 for lora_A's matmul. Counted per decoder layer (a model of 4 layers minus one of 2, so embeddings,
LM head and loss cancel), forward and backward, on random bf16 Llama layers of the gpu_train.py shapes with
LoRA r=16 on every linear layer, dropout 0: every aten._to_copy's bytes read plus written. The CPU runs the
same casts as a GPU would (the plain nn.Linear LoRA path casts on every device), so the counts carry over;
the time column only projects them at a device's copy bandwidth, it measures no GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

H200_COPY_BYTES_PER_S = 4.3e12  # device-to-device copy, bytes read + written, measured on an H200


class CastBytes(TorchDispatchMode):
    """Bytes read and written by dtype casts (aten._to_copy) while active."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default:
            self.bytes += args[0].numel() * (args[0].element_size() + out.element_size())
        return out


def step_cast_bytes(shape: dict, layers: int, tokens: int, keep_dtype: bool) -> int:
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.config.schemas import PeftConfig
    from tuneforge.models.adapters import add_lora, lora_config

    torch.manual_seed(0)
    config = LlamaConfig(**{**shape, "num_hidden_layers": layers, "vocab_size": 1024})
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    lora = PeftConfig(r=16, lora_alpha=32, lora_dropout=0.0)
    model = add_lora(model, lora) if keep_dtype else get_peft_model(model, lora_config(lora))
    model.train()
    ids = torch.randint(0, 1024, (1, tokens))
    with CastBytes() as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    return counter.bytes


def main() -> int:
    from gpu_train import SHAPES, git_commit, save, versions

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="135m,1b,8b")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--out", default=str(HERE / "results" / "lora_casts.json"))
    a = p.parse_args()

    rows = []
    for name in a.shapes.split(","):
        shape, start = SHAPES[name], time.perf_counter()
        per_layer = {}
        for keep in (False, True):
            two, four = (step_cast_bytes(shape, n, a.tokens, keep) for n in (2, 4))
            per_layer[keep] = (four - two) / 2 / a.tokens
        h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
        saved_per_step = (per_layer[False] - per_layer[True]) * layers * 4096
        rows.append({"shape": name, "adapted_elements_per_token_layer": 6 * h + i,
                     "peft_bytes_per_token_layer": per_layer[False], "tuneforge_bytes_per_token_layer": per_layer[True],
                     "saved_bytes_per_adapted_element": (per_layer[False] - per_layer[True]) / (6 * h + i),
                     "saved_gb_per_4096_token_step": saved_per_step / 1e9,
                     "h200_ms_per_4096_token_step": 1e3 * saved_per_step / H200_COPY_BYTES_PER_S,
                     "seconds": time.perf_counter() - start})

    print("| shape | cast bytes / token / layer: PEFT | tuneforge | saved per adapted element | "
          "saved per 4096-token step (all layers) | at an H200's copy rate |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['peft_bytes_per_token_layer']:,.0f} | {r['tuneforge_bytes_per_token_layer']:,.0f} | "
              f"{r['saved_bytes_per_adapted_element']:.1f} B | {r['saved_gb_per_4096_token_step']:.1f} GB | "
              f"{r['h200_ms_per_4096_token_step']:.1f} ms |")
    record = {"command": " ".join(["python", *sys.argv]), "git_commit": git_commit(), "versions": versions(),
              "tokens": a.tokens, "results": rows}
    save(record, Path(a.out))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
