"""Load a model, the one way every task and command does: resolve where it lives, refuse what is unsafe, quantize
to 4-bit, fix embeddings and special-token ids. The head (a causal LM, or sequence classification) is the task's.

DESIGN rules 9 (embedding resize) and 10 (4-bit loading) live here.
"""

from __future__ import annotations

import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tuneforge.config.device import compute_dtype, cuda_available
from tuneforge.config.errors import ConfigError
from tuneforge.config.library_args import quantization_config
from tuneforge.config.schemas import ModelConfig, QuantConfig
from tuneforge.config.tasks import CAUSAL_LM, SEQUENCE_CLASSIFICATION
from tuneforge.models import embedded
from tuneforge.runs.console import without_bars

log = logging.getLogger(__name__)


def resolve_path(cfg: ModelConfig) -> str:
    """A local directory or hub id that `from_pretrained` understands."""
    if embedded.is_embedded(cfg.name_or_path):
        return str(embedded.resolve(cfg.name_or_path, cfg.cache_dir))
    return cfg.name_or_path


# Weight files that are pickles: loading one can run any code it carries.
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_weights_safe(path: str) -> None:
    """A local model directory must hold safetensors weights: one with only pickle checkpoints
    (pytorch_model.bin, ...) is refused before anything reads it (transformers is asked for safetensors only,
    and would fail later, after the data stage, with a traceback)."""
    local = Path(path)
    if not local.is_dir() or any(local.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in local.glob(pattern)
                     if p.name != "training_args.bin")
    if pickles:
        raise ConfigError(
            f"model.name_or_path={path!r} holds its weights only as a pickle ({', '.join(pickles[:3])}), and "
            "tuneforge loads safetensors only (unpickling can run code). Convert it once where you trust it: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR), then use NEW_DIR.")


@contextmanager
def _refusals(path: str):
    """transformers' refusal of a model that needs its own code, as the one-line config error."""
    from tuneforge.models.tokenizer import remote_code_refusal

    try:
        yield
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ConfigError(remote_code_refusal("model.name_or_path", path)) from exc


def load_config(path: str, cfg: ModelConfig):
    """The model's config only (no weights): what the doctor and dry runs need."""
    check_weights_safe(path)
    with _refusals(path):
        return AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)


AUTO_CLASSES = {CAUSAL_LM: AutoModelForCausalLM, SEQUENCE_CLASSIFICATION: AutoModelForSequenceClassification}

# The layer names of a new sequence-classification head (the architectures' `score` / `classifier`).
HEAD_LAYERS = ("score", "classifier")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _NewHeadReport(logging.Filter):
    """transformers' load report when all it says is that the head a task adds (score / classifier) is not in the
    checkpoint: by design (the task trains it, or a run's adapter brings it right after); any other row keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = _ANSI.sub("", record.getMessage())
        if "LOAD REPORT" not in text:
            return True
        rows = [[c.strip() for c in line.split("|")] for line in text.splitlines() if "|" in line][1:]  # no header
        return not (rows and all(r[1] == "MISSING" and r[0].split(".")[0] in HEAD_LAYERS for r in rows))


def load_model(path: str, cfg: ModelConfig, quant: QuantConfig, head: str = CAUSAL_LM, **head_kwargs) -> PreTrainedModel:
    """The weights at `path` with the task's head (`head_kwargs`: e.g. num_labels and label names for a new
    classification head), quantized as `quant` says, on this process's device."""
    bnb = quantization_config(quant)
    dtype = compute_dtype(cfg.dtype) if bnb is None else compute_dtype(quant.bnb_4bit_compute_dtype)
    start = time.perf_counter()
    check_weights_safe(path)
    # transformers' report that a new head is not in the checkpoint says nothing wrong: left out (other rows stay).
    report, new_head = logging.getLogger("transformers.modeling_utils"), _NewHeadReport()
    report.addFilter(new_head)
    try:
        # Weights on disk load in seconds: "Loaded ... in N s" below is the stage's line, not transformers' bar (a
        # download keeps huggingface_hub's own bars).
        with _refusals(path), without_bars(datasets_bars=False):
            model = AUTO_CLASSES[head].from_pretrained(
                path,
                revision=cfg.revision,
                trust_remote_code=cfg.trust_remote_code,
                dtype=dtype,
                quantization_config=bnb,
                attn_implementation=cfg.attn_implementation,
                use_safetensors=True,  # never unpickle weights (a .bin checkpoint can run code)
                device_map=device_map_for(bnb),
                **head_kwargs,
            )
    finally:
        report.removeFilter(new_head)
    kind = f", 4-bit {quant.bnb_4bit_quant_type}" if quant.load_in_4bit else ", 8-bit" if quant.load_in_8bit else ""
    log.info("Loaded %s (%s%s) in %.1f s", path, dtype, kind, time.perf_counter() - start)
    if bnb is not None:
        keep_cpu_4bit_trainable(model)
    return model


def keep_cpu_4bit_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, the first eval-mode forward of a Linear4bit converts its weight, for good,
    to a layout whose matmul (gemv_4bit) has no autograd. Any training after one generation (our
    before-scores) then silently loses the gradient through every frozen base layer: measured here, a
    demo run's loss rose from 0.86 to 0.97 instead of falling to 0.01. Keeping one layout also keeps
    training and inference numerics identical. Returns the number of layers changed.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def sharded_training() -> bool:
    """True in a process started by launcher=fsdp or launcher=deepspeed_zero3 (Accelerate's environment)."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
            or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")


def device_map_for(bnb: BitsAndBytesConfig | None):
    # One process per device: Accelerate's launchers set LOCAL_RANK (the device is not selected yet when the
    # model loads, so current_device() would put every rank on GPU 0).
    if cuda_available():
        if sharded_training():
            return None  # FSDP / ZeRO-3 place (and shard) the weights themselves
        return {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    return {"": "cpu"} if bnb is not None else None


def resize_rows(old_rows: int, needed: int) -> int:
    """DESIGN rule 9: grow only when needed, to a multiple of min(64, the largest power of two
    dividing the old row count) -- capped so 49152 rows do not jump to 65536 for one token."""
    if needed <= old_rows:
        return old_rows
    multiple = min(64, old_rows & -old_rows)
    return -(-needed // multiple) * multiple


def fit_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Resize when the tokenizer outgrew the embeddings (new rows = mean of the old ones), then copy
    the tokenizer's pad/bos/eos ids into model.config and generation_config. Returns new row ids."""
    rows = model.get_input_embeddings().weight.shape[0]
    new_rows = resize_rows(rows, len(tokenizer))
    added = []
    if new_rows != rows:
        # mean_resizing=True initialises new rows to the mean of the old ones (input and output).
        model.resize_token_embeddings(new_rows, pad_to_multiple_of=None, mean_resizing=True)
        added = list(range(rows, len(tokenizer)))
        log.info("Resized embeddings %d -> %d rows", rows, new_rows)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name)
        if value is not None:
            setattr(model.config, name, value)
            if getattr(model, "generation_config", None) is not None:
                setattr(model.generation_config, name, value)
    return added
