"""`task=grpo` and `task=rloo`: online RL with verifiable rewards, TRL's GRPOTrainer / RLOOTrainer on prompt rows
(data/prompts.py) scored by the `rewards` list (eval/rewards.py), the stages top to bottom. The run around them is
lifecycle.py's, as for SFT and DPO.

The policy is the LoRA adapter (on a 4-bit base with QLoRA). With train.beta > 0 the reference is never a second
copy of the weights: for a fresh adapter it is the base with the adapter switched off (exactly the starting policy);
with `model.adapter=SFT_RUN` (the usual cold start) the SFT adapter trains on and the reference is a frozen copy of
it (TRL's "ref" adapter), the SFT policy the run starts from.

Before any weights load the rewards are imported and their signatures bound to what they will be called with (a reward
model, `rewards=[{model: RUN_DIR}]`, is checked there and loaded at its first call: eval/reward_model.py); once
the weights are loaded the reward doctor samples from the starting policy (tasks/reward_doctor.py); every batch's
rewards are checked (eval/rewards.checked); a run whose groups all score alike stops (runs/faults.StopOnNoSignal).
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

from trl import GRPOTrainer, RLOOTrainer

from tuneforge.config import library_args
from tuneforge.config.schemas import TuneforgeConfig
from tuneforge.data.prompts import PROMPT, prepare_prompts, reward_columns
from tuneforge.eval.inference import GenerationSettings, Rendered, generate
from tuneforge.eval.metrics import METRICS, GenerationEval
from tuneforge.eval.reward_model import ModelReward
from tuneforge.eval.rewards import checked, load_rewards, score, weighted_total
from tuneforge.models.adapters import adapter_dtypes_kept
from tuneforge.models.tokenizer import content_hash
from tuneforge.runs import rundir
from tuneforge.runs.manifest import run_identity
from tuneforge.tasks import reward_doctor
from tuneforge.tasks.stages import (
    REFERENCE_ADAPTER,
    build_policy,
    generation_metrics,
    prepare_start,
    report_generations,
    run_doctor,
    starting_policy,
    training_metrics,
)

log = logging.getLogger(__name__)

REWARD_DOCTOR_FILE = "reward_doctor.json"


class OnlineRL:
    """The online-RL stages (tasks/stages.Stages) over one of TRL's trainers: `grpo` and `rloo` below are what
    config/tasks.py names."""

    def __init__(self, cfg: TuneforgeConfig, run_dir: Path, main: bool, trainer: type):
        self.cfg, self.run_dir, self.main = cfg, run_dir, main
        self.trainer_class = trainer
        self.initial_adapter = self.resized_vocab = None
        self.doctor_report = None
        self.gen = GenerationSettings(max_new_tokens=cfg.eval.max_new_tokens,
                                      max_input_tokens=cfg.eval.max_input_tokens, batch_size=cfg.eval.batch_size)

    def prepare(self) -> dict:
        cfg = self.cfg
        self.sft_adapter, self.model_path, self.tokenizer, self.tok_report = prepare_start(cfg)
        self.data = prepare_prompts(cfg.data, cfg.format, cfg.train, self.tokenizer)
        # User code is imported and its signature checked here, before any weights load (exit 2 on a mismatch).
        # The trainer config as the library completes it (train.num_generations=null: its own default), for the
        # reward doctor's sampling; the lifecycle builds the same one for the trainer.
        self.args = library_args.trainer_arguments(cfg, self.run_dir or Path("/nonexistent/tuneforge-doctor"))
        self.rewards = load_rewards(cfg.rewards, reward_columns(self.data),
                                    defaults={"max_tokens": self.args.max_completion_length})
        for reward in self.rewards:  # a reward model: 4-bit where the policy is, and the prompts' conversations
            if isinstance(reward.function, ModelReward):
                reward.function.bind(cfg.quant, self.data.conversations)
        return run_identity(self.data, content_hash(self.tokenizer)) | (
            {"sft_adapter": str(self.sft_adapter)} if self.sft_adapter else {}) | {
            "rewards": [{"name": e.name, "weight": e.weight, **({"model": e.model} if e.model else {})}
                        for e in cfg.rewards]}

    def check(self) -> None:
        cfg = self.cfg
        run_doctor(self)
        n = min(cfg.eval.num_samples, len(self.data.eval)) if cfg.eval.before_after else 0
        self.held_out = self.data.eval.select(range(n)).to_list()

    def build_model(self):
        return build_policy(self)


    def doctor_rows(self) -> list[dict]:
        n = min(self.cfg.doctor.reward_prompts, len(self.data.train))
        return self.data.train.select(range(n)).to_list()

    def baseline(self, model):
        """The reward doctor on the starting policy (it refuses a run without signal), then the 'before' column."""
        cfg = self.cfg
        with starting_policy(model, self.sft_adapter):
            if cfg.doctor.enabled and cfg.doctor.reward_prompts > 0:
                self.doctor_report = reward_doctor.before_training(model, self.tokenizer, self.doctor_rows(),
                                                                   self.rewards, cfg, self.args)
                if self.main:
                    rundir.write_json(self.run_dir / REWARD_DOCTOR_FILE, self.doctor_report.as_dict())
            return self._scores(model)

    def build_trainer(self, model, args, callbacks: list):
        with adapter_dtypes_kept(model):  # TRL casts a quantized model's adapters to bf16 (see there)
            trainer = self.trainer_class(model=model, reward_funcs=[checked(r) for r in self.rewards], args=args,
                                         train_dataset=self.data.train, processing_class=self.tokenizer,
                                         callbacks=callbacks)
        # TRL copies a pretrained adapter into a frozen "ref" adapter. A fresh adapter's copy is the base plus an
        # initial delta; switched off, the adapter gives the base itself (TRL then disables the adapter for the
        # reference pass), and one LoRA pass less per step.
        if not self.sft_adapter and REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
            model.delete_adapter(REFERENCE_ADAPTER)
        return trainer

    def evaluate(self, model, trainer):
        return self._scores(model)

    def _answer_ids(self, predictions: list[str]) -> list[list[int]]:
        """The token ids a reward reads as `completion_ids` (length rewards: overlong), as TRL passes them in
        training: the answer's tokens, ending with EOS where the answer ended before max_new_tokens."""
        ids = self.tokenizer(predictions, add_special_tokens=False)["input_ids"]
        limit, eos = self.gen.max_new_tokens, self.tokenizer.eos_token_id
        return [i[:limit] if len(i) >= limit else i + [eos] for i in ids]

    def _scores(self, model):
        """Greedy answers to the held-out prompts through the shared inference helper: each reward's mean, the
        weighted total, and exact match / ROUGE-L against format.reference_column where rows have it."""
        if not self.held_out:
            return None
        rows = self.held_out
        prompts = [r[PROMPT] for r in rows]
        predictions = generate(model, self.tokenizer, [Rendered(p) for p in prompts], self.gen)
        columns = [{k: v for k, v in r.items() if k != PROMPT} for r in rows]
        values = score(self.rewards, prompts, predictions, columns, self._answer_ids(predictions))
        total = weighted_total(self.rewards, values)
        ref_column = self.cfg.format.reference_column
        has_ref = all(r.get(ref_column) is not None for r in rows)
        out = []
        for i, (row, pred) in enumerate(zip(rows, predictions)):
            entry = {"prompt": row[PROMPT], "prediction": pred, "reward": total[i],
                     **{f"rewards/{n}": v[i] for n, v in values.items()}}
            if has_ref:
                ref = str(row[ref_column])
                entry |= {"reference": ref, **{name: fn(pred, ref) for name, fn in METRICS.items()
                                               if name in ("exact_match", "normalized_exact_match", "rouge_l")}}
            out.append(entry)
        metrics = ["reward", *(f"rewards/{n}" for n in values)]
        if has_ref:
            metrics += ["exact_match", "normalized_exact_match", "rouge_l"]
        scores = {}
        for m in metrics:
            kept = [e[m] for e in out if e[m] is not None]
            scores[m] = statistics.fmean(kept) if kept else float("nan")
        return GenerationEval(scores=scores, predictions=out)

    def metrics(self, result, trainer, before, after) -> dict:
        metrics = training_metrics(result, trainer, self.data, self.tok_report, self.tokenizer)
        metrics["model_load_s"] = self.load_seconds
        logged = [h for h in trainer.state.log_history if "reward" in h]
        metrics["first_logged_reward"] = logged[0]["reward"] if logged else None
        metrics["last_logged_reward"] = logged[-1]["reward"] if logged else None
        metrics["last_no_signal_fraction"] = logged[-1].get("frac_reward_zero_std") if logged else None
        metrics["rewards"] = [{"name": r.name, "weight": r.weight, "kwargs": r.kwargs} for r in self.rewards]
        if self.doctor_report is not None:
            metrics["reward_doctor"] = self.doctor_report.as_dict()
        metrics |= generation_metrics(before, after)
        return metrics

    def report(self, before, after, metrics: dict) -> None:
        if after is not None:
            start = "SFT policy" if self.sft_adapter else "base"
            ref = f", reference = {self.cfg.format.reference_column}" if "exact_match" in after.scores else ""
            report_generations(self.run_dir, before, after,
                               f"Held-out prompts ({len(self.held_out)}, greedy; before = the {start}{ref})")


def grpo(cfg: TuneforgeConfig, run_dir: Path, main: bool) -> OnlineRL:
    """task=grpo: GRPOTrainer (loss_type grpo | dr_grpo | dapo | bnpo | ...; GSPO: importance_sampling_level=sequence)."""
    return OnlineRL(cfg, run_dir, main, GRPOTrainer)


def rloo(cfg: TuneforgeConfig, run_dir: Path, main: bool) -> OnlineRL:
    """task=rloo: RLOOTrainer (each completion's baseline: the mean reward of the other completions of its prompt)."""
    return OnlineRL(cfg, run_dir, main, RLOOTrainer)
