"""The task table: one description per task (`task=NAME`), the only place that says what a task is.

Every module that needs to know something about a task reads its `Task` here (validation, the library keys of
`train.*`, the device defaults, the doctor, preview, the model card, the memory estimate, `tuneforge keys`), so
that adding a task is its stages module (tasks/), one entry below and, if it trains on a new row form, that
format. Nothing here imports a library: the config layer reads it before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

CAUSAL_LM, SEQUENCE_CLASSIFICATION = "causal_lm", "sequence_classification"


@dataclass(frozen=True)
class Task:
    name: str
    # What builds its stages (module:name of a class or function taking (cfg, run_dir, main), tasks/stages.Stages).
    stages: str
    # The trainer config (module:Class) whose fields are the `train.*` keys of this task.
    trainer_config: str
    # The model head it trains: causal_lm (AutoModelForCausalLM) or sequence_classification.
    head: str
    # format.strategy values its rows come in; empty: the task reads its columns itself (format.* strategies unused).
    formats: tuple[str, ...]
    # collator.name values that build its batches.
    collators: tuple[str, ...]
    # The doctor's check list for its prepared rows (tasks/doctor.CHECK_LISTS); "" for none.
    doctor: str
    # The metric a sweep optimizes and `report` ranks by; "" for `eval.metric`.
    sweep_metric: str = ""
    # Its rows may share a packed row (packing modes that share rows; packing=auto packs on CUDA).
    packs: bool = False
    # Liger's kernels apply (train.use_liger_kernel=null: on where CUDA and liger-kernel are).
    liger: bool = False
    # Its trainer computes the loss through its own fused LM head (TRL's SFTTrainer), which Liger's fused linear
    # cross-entropy would replace: train.liger_kernel_config.fused_linear_cross_entropy is refused before weights
    # load (TRL refuses it only when the trainer is built, after them).
    fused_lm_head: bool = False
    # `tuneforge preview` shows its rows (input_ids + labels).
    preview: bool = False
    # The reference model is the base with the adapter off: the task needs an adapter (peft=lora).
    needs_adapter: bool = False
    # model.adapter (an SFT run to start from) applies.
    starts_from_run: bool = False
    # train.* keys the task's trainer supports with one value only: {key: (value, why)}.
    fixed_train: dict[str, tuple[Any, str]] = field(default_factory=dict)
    # What tuneforge sets in the trainer config for this task (over the user's keys), from the config.
    trainer_settings: Callable[[Any], dict[str, Any]] = lambda cfg: {}
    # It learns online from the `rewards` list (reward functions score sampled completions): the list must be set,
    # and the reward doctor samples from the starting policy before training (tasks/reward_doctor.py).
    rewards: bool = False
    # A sequence-classification head with this many outputs whatever the data says (a reward model's one score);
    # None: the task decides (classification: one per label).
    num_labels: Optional[int] = None

    @property
    def generates(self) -> bool:
        """Its model answers prompts (`infer`, held-out generations)."""
        return self.head == CAUSAL_LM

    @property
    def scores(self) -> bool:
        """Its model scores a prompt + answer with one number (a reward model: `infer` prints the score, and it can
        be an online-RL reward)."""
        return self.head == SEQUENCE_CLASSIFICATION and self.num_labels == 1


def _sft_settings(cfg) -> dict[str, Any]:
    return {
        "include_num_input_tokens_seen": "non_padding",
        # Tokens and labels were built (and counted) by tuneforge's data stage.
        "dataset_kwargs": {"skip_prepare_dataset": True},
        "remove_unused_columns": False,
    }


def _preference_settings(cfg) -> dict[str, Any]:
    return {
        "include_num_input_tokens_seen": "non_padding",
        # The data stage built exactly the id columns the trainer reads (data/preference.py).
        "remove_unused_columns": False,
        "pad_to_multiple_of": cfg.collator.pad_to_multiple_of,
    }


def _reward_settings(cfg) -> dict[str, Any]:
    return {
        "include_num_input_tokens_seen": "non_padding",
        # The data stage built exactly the id columns the trainer reads (tasks/reward.reward_rows).
        "remove_unused_columns": False,
        "pad_to_multiple_of": cfg.collator.pad_to_multiple_of,
    }


def _classification_settings(cfg) -> dict[str, Any]:
    # Accuracy and macro-F1 every epoch: the point of the task.
    return {"eval_strategy": "epoch"} if cfg.train.eval_strategy == "no" else {}


def _online_rl_settings(cfg) -> dict[str, Any]:
    return {
        # Every column of a prompt row besides the prompt reaches the reward functions (a reference answer, tests).
        "remove_unused_columns": False,
        # One weight per entry of `rewards` (its `weight`), in the list's order.
        "reward_weights": [float(r.weight) for r in cfg.rewards],
        "shuffle_dataset": cfg.data.shuffle,
        **({"pad_to_multiple_of": cfg.collator.pad_to_multiple_of} if cfg.collator.pad_to_multiple_of else {}),
    }


# Online RL with verifiable rewards: the policy samples completions of prompt rows, `rewards` scores them.
# TRL 1.16 keeps ORPO in trl.experimental (TRL marks it experimental: its API may change in any release).
ORPO_CONFIG = "trl.experimental.orpo:ORPOConfig"

_ONLINE_RL = dict(
    head=CAUSAL_LM, formats=("prompt",), collators=("completion_only",), doctor="prompts", needs_adapter=True,
    starts_from_run=True, rewards=True, sweep_metric="", trainer_settings=_online_rl_settings,
)

_PREFERENCE = dict(
    head=CAUSAL_LM, collators=("completion_only",), doctor="preference", needs_adapter=True, starts_from_run=True,
    fixed_train={"truncation_mode": ("keep_start", "the preference data keeps the prompt and cuts the answers' ends "
                                                   "(keep_start, TRL's only mode)")},
    trainer_settings=_preference_settings,
)
# ORPO (TRL's experimental ORPOTrainer): the same rows, no reference model (an odds-ratio term beside the chosen
# answer's NLL), so a full fine-tune works too; its config has no truncation_mode (the data stage keeps the start).
_ORPO = dict(
    _PREFERENCE, needs_adapter=False,
    fixed_train={"generate_during_eval": (False, "ORPOTrainer samples from the prompt text, which tuneforge's "
                                                 "prepared rows do not carry, and logs to W&B/Comet only; tuneforge "
                                                 "scores held-out generations itself (eval.num_samples)")},
)

TASKS: dict[str, Task] = {t.name: t for t in (
    Task("sft", "tuneforge.tasks.sft:SFT", "trl:SFTConfig", head=CAUSAL_LM,
         formats=("instruction", "conversational", "alpaca", "text", "template"),
         collators=("completion_only", "assistant_only", "lm"), doctor="sft", packs=True, liger=True, preview=True,
         fused_lm_head=True,
         trainer_settings=_sft_settings),
    Task("classification", "tuneforge.tasks.classification:Classification", "transformers:TrainingArguments",
         head=SEQUENCE_CLASSIFICATION, formats=(), collators=("padding",), doctor="", sweep_metric="eval_accuracy",
         trainer_settings=_classification_settings),
    Task("dpo", "tuneforge.tasks.preference:dpo", "trl:DPOConfig", formats=("preference",), **_PREFERENCE),
    Task("kto", "tuneforge.tasks.preference:kto", "trl:KTOConfig", formats=("unpaired",), **_PREFERENCE),
    Task("orpo", "tuneforge.tasks.preference:orpo", ORPO_CONFIG, formats=("preference",), **_ORPO),
    # A reward model: a one-output score head on the causal LM, trained on the preference rows (Bradley-Terry).
    Task("reward", "tuneforge.tasks.reward:Reward", "trl:RewardConfig", head=SEQUENCE_CLASSIFICATION, num_labels=1,
         formats=("preference",), collators=("padding",), doctor="preference", sweep_metric="pairwise_accuracy",
         trainer_settings=_reward_settings),
    Task("grpo", "tuneforge.tasks.online_rl:grpo", "trl:GRPOConfig", **_ONLINE_RL),
    Task("rloo", "tuneforge.tasks.online_rl:rloo", "trl:RLOOConfig", **_ONLINE_RL),
)}

# Tasks people ask for that tuneforge does not run, and why (with what to use instead): none at present.
REFUSED: dict[str, str] = {}


def task(name: str) -> Task:
    """The description of `task=NAME` (validation has refused unknown names by then)."""
    return TASKS[name]


def format_owner(strategy: str) -> str | None:
    """The tasks whose rows come in `strategy`, as `task=` would list them (format=preference -> dpo|orpo|reward), or
    None when no task reads them."""
    owners = [t.name for t in TASKS.values() if strategy in t.formats]
    return "|".join(owners) or None
