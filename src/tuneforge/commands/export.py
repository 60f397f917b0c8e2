"""`tuneforge export run_dir=RUN format=hf|gguf|ollama [quant=TYPE] [out=DIR]`: a run's adapter folded into its
base (the one merging path, models/merging.py) and written for serving, then proven by an independent reader
(eval/verify_export.py) before it appears under its name.

- hf: safetensors + tokenizer + the training chat template + a generation config whose EOS ids include the
  end-of-turn token (vLLM, SGLang, TGI, transformers); read back in a fresh process.
- gguf: one GGUF file written with ggml's `gguf` package (models/gguf_writer.py), the template inside it; read back
  with transformers' own GGUF loader.
- ollama: the GGUF plus a Modelfile (the template converted to Ollama's, stop tokens, the run's system prompt).

Bad input (a run without an adapter, an architecture or quant type that cannot be written, an out directory that
is not empty) is one line and exit 2 before anything loads; an unquantized export that does not answer every
held-out prompt as the adapter does is not published (exit 1).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from tuneforge.commands.base import as_object, hydra_command, output_path
from tuneforge.config.errors import ConfigError
from tuneforge.runs import rundir, scratch

log = logging.getLogger(__name__)

FORMATS = ("hf", "gguf", "ollama")
EXPORT_FILE = "export.json"


@dataclass
class ExportConfig:
    # hf | gguf | ollama (`format=` on the command line is short for export.format=).
    format: str = "gguf"
    # The GGUF type (`quant=`): f32, f16, bf16, q8_0, q4_0, ... (what the gguf package can write); None: f16.
    quant: Optional[str] = None
    # The base the adapter is folded into, as `tuneforge merge` does: dequantized (faithful) | original.
    base: str = "dequantized"
    # Held-out prompts answered by both models (None: the run's eval.num_samples).
    samples: Optional[int] = None
    # Prompts whose logits are compared (every token of each).
    logit_prompts: int = 4


@dataclass
class ExportCommandConfig:
    """The `export` command's config (conf/export.yaml)."""

    run_dir: str = MISSING
    # The export folder (created; must be missing or empty). None: RUN/export-FORMAT[-QUANT].
    out: Optional[str] = None
    export: ExportConfig = field(default_factory=ExportConfig)


def cli_args(args: list[str]) -> list[str]:
    """`format=` and `quant=` are short for export.format= / export.quant= (both names are also config groups of
    `train`, which Hydra would try to select)."""
    return [f"export.{a}" if a.startswith(("format=", "quant=")) else a for a in args]


def out_dir(cfg: ExportCommandConfig) -> Path:
    e = cfg.export
    suffix = "" if e.format == "hf" else f"-{e.quant or 'f16'}"
    return output_path("out", cfg.out) if cfg.out else Path(cfg.run_dir) / f"export-{e.format}{suffix}"


def check(cfg: ExportCommandConfig) -> None:
    """Everything that can be refused before a weight loads: format, quant type, the run and its adapter, the base
    model's architecture (its config only), the out directory."""
    from tuneforge.models import gguf_writer
    from tuneforge.models.merging import run_model_config

    e = cfg.export
    if e.format not in FORMATS:
        raise ConfigError(f"format={e.format}: choose one of {', '.join(FORMATS)}.")
    if e.base not in ("dequantized", "original"):
        raise ConfigError(f"export.base={e.base!r}: use dequantized (default) or original.")
    if e.format == "hf" and e.quant is not None:
        raise ConfigError(f"quant={e.quant}: format=hf writes full-precision safetensors; quant= is for gguf/ollama.")
    if e.format != "hf":
        gguf_writer.check_quant(e.quant or "f16")
    run_dir = Path(cfg.run_dir)
    model_cfg, _ = run_model_config(run_dir)  # a full fine-tune (no adapter) is refused here
    adapter = run_dir / rundir.ADAPTER_DIR / "adapter_model.safetensors"
    if not adapter.is_file():
        raise ConfigError(f"{run_dir} has no {rundir.ADAPTER_DIR}/adapter_model.safetensors: there is no adapter to "
                          "export (did training finish?).")
    rundir.refuse_non_empty(out_dir(cfg), "choose another out=DIR")
    if e.format == "ollama":  # a template Ollama cannot be given is refused before minutes of loading
        from transformers import AutoTokenizer

        from tuneforge.models import modelfile

        modelfile.convert(AutoTokenizer.from_pretrained(run_dir / rundir.ADAPTER_DIR),
                          rundir.run_config(run_dir).format.system_prompt)
    if e.format != "hf":
        from transformers import AutoConfig

        from tuneforge.models.loading import resolve_path

        gguf_writer.family(AutoConfig.from_pretrained(resolve_path(model_cfg)))


def precheck(cfg: ExportCommandConfig, overrides: list[str], multirun: bool) -> None:
    check(cfg)


def run(cfg: ExportCommandConfig) -> dict:
    # Imported when the command runs: `tuneforge --help` reads every command module, and must not load torch.
    from tuneforge.data.pipeline import prepare
    from tuneforge.eval import verify_export as verify
    from tuneforge.eval.inference import GenerationSettings
    from tuneforge.eval.metrics import generation_pairs
    from tuneforge.models.merging import merged_model
    from tuneforge.models.tokenizer import end_of_turn_id
    from tuneforge.models.trained import load_trained

    check(cfg)  # again: the command can be called in-process without Hydra's precheck
    e = cfg.export
    quant = None if e.format == "hf" else (e.quant or "f16")
    out = out_dir(cfg)
    start = time.perf_counter()

    model, tokenizer, run_cfg = load_trained(cfg.run_dir)  # the adapter on its training base, as trained
    data = prepare(run_cfg.data, run_cfg.format, run_cfg.train, tokenizer, run_cfg.collator)
    pairs = generation_pairs(data.eval, e.samples or run_cfg.eval.num_samples)
    if not pairs:
        raise ConfigError(f"{cfg.run_dir}: the run has no held-out prompts (data.eval_fraction=0 and no "
                          "data.eval_split), so the export could not be verified; nothing was written.")
    settings = GenerationSettings(max_new_tokens=run_cfg.eval.max_new_tokens,
                                  max_input_tokens=run_cfg.eval.max_input_tokens, batch_size=run_cfg.eval.batch_size)
    ref = verify.reference(model, tokenizer, pairs, settings, e.logit_prompts)
    del model
    eot = end_of_turn_id(tokenizer)
    merged = merged_model(Path(cfg.run_dir), e.base, tokenizer)
    report: dict = {"run_dir": str(cfg.run_dir), "format": e.format, "quant": quant, "base": e.base,
                    "held_out_prompts": len(pairs), "max_new_tokens": settings.max_new_tokens,
                    "metric": run_cfg.eval.metric, "adapter": ref.scores}
    with rundir.atomic_dir(out) as tmp:
        if e.format == "hf":
            from tuneforge.models.export_hf import write_hf

            report["generation_config"] = write_hf(merged, tokenizer, tmp)
            del merged
            work = scratch.make_scratch_dir(out.with_name(out.name + "-check"))  # the reader's request and answers
            try:
                reading = verify.read_hf_fresh(tmp, ref, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            checks = [verify.check("hf", "transformers in a fresh process", True, reading, ref, eot)]
        else:
            checks = _write_gguf(cfg, run_cfg, merged, tokenizer, tmp, quant, eot, ref, report)
        report["checks"] = [asdict(c) for c in checks]
        report["prompts"] = verify.prompts_record(ref)
        report["seconds"] = round(time.perf_counter() - start, 1)
        verify.table(ref, checks, run_cfg.eval.metric,
                     f"export vs the adapter: {len(pairs)} held-out prompts")
        problems = [p for c in checks for p in c.problems]
        if problems:
            raise verify.ExportMismatch("export refused, nothing written: " + "; ".join(problems))
        rundir.write_json(tmp / EXPORT_FILE, report)
    print(f"Exported {e.format}{f' ({quant})' if quant else ''} to {out} (verified: {out / EXPORT_FILE})")
    return report


def _write_gguf(cfg, run_cfg, merged, tokenizer, tmp: Path, quant: str, eot: int, ref, report: dict) -> list:
    """The GGUF (and for ollama the Modelfile) into `tmp`, read back by transformers' GGUF loader."""
    from tuneforge.eval import verify_export as verify
    from tuneforge.models import gguf_writer, modelfile

    name = f"model-{quant}.gguf"
    if cfg.export.format == "ollama":
        fam, system = modelfile.convert(tokenizer, run_cfg.format.system_prompt)
    tok_dir = scratch.make_scratch_dir(tmp.with_name("tokenizer"))  # the package's vocab helpers read files
    try:
        tokenizer.save_pretrained(tok_dir)
        written = gguf_writer.write_gguf(merged, tokenizer, tok_dir, tmp / name, quant, eot,
                                         Path(run_cfg.model.name_or_path).name,
                                         gguf_writer.source_pre_tokenizer(run_cfg.model.name_or_path))
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)
    del merged
    report["gguf"] = {"file": name, "tensors": written.tensors, "fallbacks": written.fallbacks,
                      "pre_tokenizer": written.pre_tokenizer, "notes": written.notes, "end_of_turn_id": eot,
                      "bytes": (tmp / name).stat().st_size}
    reading = verify.read_gguf(tmp, name, ref)
    checks = [verify.check(f"gguf {quant}", "transformers' GGUF loader", gguf_writer.is_unquantized(quant),
                           reading, ref, eot)]
    if cfg.export.format == "ollama":
        from tuneforge.models.tokenizer import stop_token_ids

        stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
        (tmp / "Modelfile").write_text(modelfile.modelfile(name, fam, system, stops))
        conversations = [p for p, _ in ref.pairs if isinstance(p, list)]
        same = modelfile.rendered_like_training(tokenizer, fam, system, conversations)
        report["modelfile"] = {"family": fam.name, "system": system, "stops": stops,
                               "template_renders_like_training": f"{same}/{len(conversations)}"}
        if same < len(conversations):
            raise verify.ExportMismatch(f"export refused, nothing written: the Modelfile's template renders "
                                        f"{len(conversations) - same} of {len(conversations)} held-out prompts "
                                        "unlike training")
    return checks


def app(dcfg) -> None:
    run(as_object(dcfg))


COMMAND = hydra_command(
    "export", "write the merged model for serving (hf | gguf | ollama), verified by an independent reader",
    "tuneforge export run_dir=PATH format=hf|gguf|ollama [quant=f16|q8_0|q4_0|...] [out=DIR]",
    config_name="export", schema=ExportCommandConfig, app=app, rewrite_args=cli_args, precheck=precheck)
