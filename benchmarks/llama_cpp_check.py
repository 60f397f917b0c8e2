"""llama.cpp as a real consumer of a tuneforge GGUF export (issue 36, item 5).

    python benchmarks/llama_cpp_check.py RUN/export-gguf-q8_0            # writes benchmarks/results/llama_cpp_check.json
    python benchmarks/llama_cpp_check.py EXPORT_DIR --out other.json

Loads the export's GGUF with llama.cpp's Python bindings (`pip install llama-cpp-python`, which compiles llama.cpp
from source with this machine's compiler; not a tuneforge dependency), then on every held-out prompt the export
recorded in export.json:

- tokenizes the prompt text as training rendered it (special tokens parsed) and compares the ids with training's;
- answers greedily (temperature 0, stopping at the file's end-of-generation tokens, at most the run's
  max_new_tokens) and compares the answer with the adapter's (the adapter on its training base) and with the
  answer transformers' GGUF reader gave for the same file; scores it against the reference (exact match).

Prints a table and writes JSON: the command, versions, the machine's load, every prompt's answers, the rates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", type=Path, help="a `tuneforge export format=gguf|ollama` folder")
    parser.add_argument("--out", type=Path, default=RESULTS / "llama_cpp_check.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--extra-buffers", action="store_true",
                        help="let llama.cpp use its extra CPU buffer types (AMX, repacked weights); off by default: "
                             "on the shared Xeon VM (AMX advertised) every quantized GGUF, llama.cpp's own Q4_1 of "
                             "SmolLM2 included, segfaulted in decode with them (llama-cpp-python 0.3.36)")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed (pip install llama-cpp-python: it compiles llama.cpp)", file=sys.stderr)
        return 2

    report = json.loads((args.export_dir / "export.json").read_text())
    gguf_file = args.export_dir / report["gguf"]["file"]
    (check,) = report["checks"]
    if not args.extra_buffers:
        import llama_cpp.llama_cpp as low_level

        # Llama() takes its model parameters from llama_model_default_params(); the binding has no argument for
        # this field, so the defaults are wrapped (plain CPU kernels: what is checked is the file, not a kernel).
        defaults = low_level.llama_model_default_params

        def without_extra_buffers():
            params = defaults()
            params.use_extra_bufts = False
            return params

        low_level.llama_model_default_params = without_extra_buffers
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=2048, n_threads=args.threads, n_batch=512,
                          verbose=False, seed=0)
    load_s = time.perf_counter() - start
    # End of generation as llama.cpp decides it from the file (EOS, EOT, ...).
    # (`Llama.model` segfaults in llama_model_get_vocab with 0.3.36; the internal model object holds the vocab.)
    vocab = llm._model.vocab
    is_eog = lambda token: llama_cpp.llama_vocab_is_eog(vocab, token)  # noqa: E731
    rows = []
    start = time.perf_counter()
    for prompt, transformers_answer in zip(report["prompts"], check["answers"]):
        ids = llm.tokenize(prompt["text"].encode(), add_bos=False, special=True)
        llm.reset()
        out = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if is_eog(token) or len(out) >= report["max_new_tokens"]:
                break
            out.append(token)
        # Special tokens are not text (the helper decodes with skip_special_tokens); strip as tuneforge does.
        answer = llm.detokenize(out, special=False).decode("utf-8", errors="replace").strip()
        rows.append({"text": prompt["text"], "same_ids": ids == prompt["ids"], "reference": prompt["reference"],
                     "adapter": prompt["adapter"], "transformers_gguf": transformers_answer, "llama_cpp": answer})
    gen_s = time.perf_counter() - start
    n = len(rows)

    def rate(key, other):
        return sum(r[key] == r[other] for r in rows) / n

    summary = {
        "prompts": n,
        "prompt_ids_equal_training": sum(r["same_ids"] for r in rows) / n,
        "llama_cpp_equals_adapter": rate("llama_cpp", "adapter"),
        "llama_cpp_equals_transformers_gguf": rate("llama_cpp", "transformers_gguf"),
        "transformers_gguf_equals_adapter": rate("transformers_gguf", "adapter"),
        "exact_match": {"adapter": rate("adapter", "reference"), "transformers_gguf": rate("transformers_gguf", "reference"),
                        "llama_cpp": rate("llama_cpp", "reference")},
    }
    print(f"llama.cpp check of {gguf_file} ({report['quant']}), {n} held-out prompts, greedy, "
          f"max {report['max_new_tokens']} new tokens")
    print(f"{'':34} {'rate':>6}")
    for key in ("prompt_ids_equal_training", "llama_cpp_equals_adapter", "llama_cpp_equals_transformers_gguf",
                "transformers_gguf_equals_adapter"):
        print(f"{key:34} {summary[key]:6.3f}")
    for who, value in summary["exact_match"].items():
        print(f"{'exact_match ' + who:34} {value:6.3f}")
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "export": str(args.export_dir), "run_dir": report["run_dir"], "quant": report["quant"],
        "versions": {"llama_cpp_python": llama_cpp.__version__, "python": platform.python_version()},
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg()},
        "seconds": {"load": round(load_s, 1), "generate": round(gen_s, 1)},
        "llama_cpp_extra_buffers": args.extra_buffers,
        "summary": summary, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
