"""A reward model's scores: one number per prompt + answer, from a sequence-classification head with one output
(a `task=reward` run, or any such model).

THE scoring path, shared by the reward task's before/after table (pairwise accuracy and mean margin on held-out
pairs), `tuneforge infer` on a reward run, and a reward model as an online-RL reward (`rewards=[{model: RUN_DIR}]`,
task=grpo|rloo): sequences are rendered as the reward task's data stage renders a training pair's side
(data/preference.scored_sequences), right-padded as TRL's collator batched them in training (the head reads the
last token before the padding), scored in eval mode without gradients, a batch at a time.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import FormatConfig
from tuneforge.eval.inference import eval_mode

log = logging.getLogger(__name__)


@torch.inference_mode()
def sequence_scores(model, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int) -> list[float]:
    """The head's output for each token sequence, `batch_size` sequences at a time, right-padded with `pad_id`."""
    device = next(model.parameters()).device
    out: list[float] = []
    with eval_mode(model):
        for start in range(0, len(sequences), batch_size):
            batch = [list(s) for s in sequences[start:start + batch_size]]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):
                ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[row, :len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            out.extend(float(v) for v in logits[:, 0].float().cpu())
    return out


@dataclass
class PairScores:
    """Held-out pairs scored: the summary (pairwise accuracy, mean margin, mean scores) and each pair's two scores."""

    scores: dict[str, float]
    chosen: list[float]
    rejected: list[float]


def pairwise_scores(model, rows, pad_id: int, batch_size: int) -> PairScores:
    """Held-out pairwise accuracy (the share of (prompt, chosen, rejected) rows whose chosen answer scores higher; a
    NaN counts as wrong), the mean margin (chosen - rejected) and the Bradley-Terry loss RewardTrainer minimises
    (mean -log sigmoid(margin)), on the data stage's prepared ids."""
    chosen = sequence_scores(model, [p + c for p, c in zip(rows["prompt_ids"], rows["chosen_ids"])], pad_id, batch_size)
    rejected = sequence_scores(model, [p + r for p, r in zip(rows["prompt_ids"], rows["rejected_ids"])], pad_id,
                               batch_size)
    margins = torch.tensor([c - r for c, r in zip(chosen, rejected)], dtype=torch.float64)
    nan = float("nan")
    summary = {"pairwise_accuracy": (margins > 0).double().mean().item() if len(margins) else nan,
               "mean_margin": margins.mean().item() if len(margins) else nan,
               "pairwise_loss": -torch.nn.functional.logsigmoid(margins).mean().item() if len(margins) else nan,
               "mean_chosen": sum(chosen) / len(chosen) if chosen else nan,
               "mean_rejected": sum(rejected) / len(rejected) if rejected else nan}
    return PairScores(summary, chosen, rejected)


@dataclass
class RewardModel:
    """A loaded reward model with its own tokenizer, chat template and format rules (system prompt, EOS)."""

    model: Any
    tokenizer: Any
    format: FormatConfig = field(default_factory=FormatConfig)
    max_length: int = 1024
    batch_size: int = 8

    def score(self, prompts: Sequence[Any], answers: Sequence[str]) -> list[float]:
        """One score per (prompt, answer): a prompt is text (one user turn) or {role, content} messages."""
        from tuneforge.data.preference import scored_sequences

        sequences = scored_sequences(list(zip(prompts, answers)), self.format, self.tokenizer, self.max_length)
        return sequence_scores(self.model, sequences, self.tokenizer.pad_token_id, self.batch_size)


# --- loading: a reward run, or a sequence-classification model (a local directory or a hub id) --------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_reward_model(path: str, key: str) -> str:
    """What `path` is, checked before any weights load: "run" (a finished task=reward run) or "model" (a
    sequence-classification model with one output: a local directory or a hub id); anything else is a ConfigError
    naming `key` (exit 2)."""
    from tuneforge.runs import rundir

    where = f"{key}={path}"
    local = Path(path).expanduser()
    if local.is_dir():
        if (local / rundir.CONFIG_FILE).is_file():
            saved = rundir.read_config(local)
            if saved.get("task") != "reward":
                raise ConfigError(f"{where} is a task={saved.get('task')} run, not a reward model: give a task=reward "
                                  "run directory (or a sequence-classification model with one output).")
            if not (local / rundir.ADAPTER_DIR).is_dir():
                raise ConfigError(f"{where}: the reward run has no {rundir.ADAPTER_DIR}/ (did its training finish?).")
            return "run"
        if not (local / "config.json").is_file():
            raise ConfigError(f"{where}: neither a tuneforge run ({rundir.CONFIG_FILE}) nor a model directory "
                              "(config.json).")
    elif not _HUB_ID.match(path):
        raise ConfigError(f"{where}: no such directory (relative paths start at {Path.cwd()}).")
    _check_head(path, where)
    return "model"


def _check_head(path: str, where: str) -> None:
    """A model directory or hub id: its config (no weights) must be a sequence classifier with one output."""
    from tuneforge.config.schemas import ModelConfig
    from tuneforge.models.loading import load_config

    try:
        config = load_config(path, ModelConfig(name_or_path=path))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the hub's and transformers' own errors, as one line
        raise ConfigError(f"{where}: no such directory, and not a model the Hugging Face Hub gives "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or config.num_labels != 1:
        named = ", ".join(architectures) or "no architecture"
        raise ConfigError(f"{where} is not a reward model: its config says {named} with {config.num_labels} "
                          "output(s); a reward model is a *ForSequenceClassification with num_labels=1 (a task=reward "
                          "run is one).")


def load_reward_model(path: str, quant=None, batch_size: int = 8, max_length: Optional[int] = None) -> RewardModel:
    """A reward run (its base as trained, or under `quant`; its adapter, tokenizer, chat template, system prompt and
    max_length) or a sequence-classification model directory / hub id (its own tokenizer and template; unquantized
    unless `quant` says), in eval mode."""
    from tuneforge.runs import rundir

    if (Path(path).expanduser() / rundir.CONFIG_FILE).is_file():
        from tuneforge.models.trained import load_trained

        model, tokenizer, cfg = load_trained(Path(path).expanduser(), quant=quant)
        fmt, length = cfg.format, cfg.train.max_length
    else:
        from transformers import AutoTokenizer

        from tuneforge.config.schemas import ModelConfig, QuantConfig
        from tuneforge.config.tasks import SEQUENCE_CLASSIFICATION
        from tuneforge.models.loading import load_model

        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token is None:  # right padding needs one; the head reads the last token before it
            tokenizer.pad_token = tokenizer.eos_token
        model = load_model(path, ModelConfig(name_or_path=path), quant or QuantConfig(load_in_4bit=False),
                           head=SEQUENCE_CLASSIFICATION)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        fmt, length = FormatConfig(), min(tokenizer.model_max_length or 4096, 4096)
    model.eval()
    return RewardModel(model, tokenizer, fmt, max_length or length, batch_size)


# --- a reward model as an online-RL reward -------------------------------------------------------------------

class ModelReward:
    """`rewards=[{model: PATH}]` (task=grpo|rloo): the reward model's score of each prompt + completion. Checked when
    the rewards load (before any weights: check_reward_model); loaded once, at its first call, with its own tokenizer
    and chat template, in 4-bit where the policy is (`bind`). Called as TRL calls reward functions."""

    # The keyword arguments an entry may set, with their defaults (max_length None: the reward run's train.max_length).
    OPTIONS = {"batch_size": 8, "max_length": None}

    def __init__(self, path: str, key: str, kwargs: dict):
        unknown = [k for k in kwargs if k not in self.OPTIONS]
        if unknown:
            raise ConfigError(f"{key}.kwargs.{unknown[0]}: a reward model takes {', '.join(self.OPTIONS)} only.")
        for name, value in kwargs.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{key}.kwargs.{name}={value!r} must be a positive integer.")
        self.path, self.key = path, key
        self.kind = check_reward_model(path, f"{key}.model")
        self.options = {k: kwargs.get(k, default) for k, default in self.OPTIONS.items()}
        self.quant = None
        self.conversations: dict[str, Any] = {}
        self.loaded: Optional[RewardModel] = None

    def bind(self, quant=None, conversations: Optional[dict[str, Any]] = None) -> None:
        """The policy's quantization (the reward model loads in 4-bit where the policy does), and the conversation
        each rendered prompt came from (the reward model renders it with its own chat template)."""
        self.quant, self.conversations = quant, dict(conversations or {})

    def load(self) -> RewardModel:
        if self.loaded is None:
            quantized = self.quant is not None and (self.quant.load_in_4bit or self.quant.load_in_8bit)
            quant = self.quant if quantized else None
            if quant is None and self.kind == "run":  # an unquantized policy: the reward model unquantized too
                from tuneforge.config.schemas import QuantConfig

                quant = QuantConfig(load_in_4bit=False)
            self.loaded = load_reward_model(self.path, quant, self.options["batch_size"], self.options["max_length"])
            log.info("Reward model %s loaded (%s)", self.path, "4-bit" if quant is not None and quant.load_in_4bit
                     else "unquantized")
        return self.loaded

    def __call__(self, prompts, completions, **columns) -> list[float]:
        rm = self.load()
        # TRL passes text prompts as the policy's template rendered them: the reward model renders the conversation.
        convs = [self.conversations.get(p, p) if isinstance(p, str) else p for p in prompts]
        texts = [c if isinstance(c, str) else str(c[-1].get("content", "")) if c else "" for c in completions]
        return rm.score(convs, texts)  # a NaN stops the run naming this reward (eval/rewards.check_output)
