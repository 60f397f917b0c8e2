"""`task=reward`: a reward model, TRL's RewardTrainer (Bradley-Terry: -log sigmoid(score(chosen) - score(rejected))),
the stages top to bottom. The run around them is lifecycle.py's, as for the other tasks.

The model is the causal LM with a sequence-classification head of one output (a new `score` layer): LoRA on the
base (4-bit with QLoRA), the head trained in full and saved with the adapter (PEFT's SEQ_CLS task: modules_to_save),
or a full fine-tune. The rows are the preference tasks' (data/preference.py: every shape they read, rendered by the
chat template, checked by the same doctor); each side of a pair is the prompt + that answer through its end-of-turn
token, which is where the head reads its score. Before and after training the held-out pairs are scored through the
shared scoring path (eval/reward_model.py): pairwise accuracy and mean margin.
"""

from __future__ import annotations

import logging
from pathlib import Path

from trl import RewardTrainer

from tuneforge.config.schemas import TuneforgeConfig
from tuneforge.config.tasks import task
from tuneforge.data.preference import prepare_preferences
from tuneforge.eval.inference import Rendered
from tuneforge.eval.metrics import generation_pairs, print_comparison
from tuneforge.eval.reward_model import pairwise_scores
from tuneforge.models.adapters import adapter_dtypes_kept, add_lora
from tuneforge.models.tokenizer import content_hash, new_token_ids
from tuneforge.runs import rundir
from tuneforge.runs.console import without_bars
from tuneforge.runs.manifest import run_identity
from tuneforge.tasks.stages import load_base, prepare_tokenizer, run_doctor, training_metrics

log = logging.getLogger(__name__)


def reward_rows(dataset):
    """Prepared (prompt_ids, chosen_ids, rejected_ids) rows as RewardTrainer's processed rows: chosen_ids and
    rejected_ids the whole sequences."""
    def row(r):
        return {"chosen_ids": r["prompt_ids"] + r["chosen_ids"], "rejected_ids": r["prompt_ids"] + r["rejected_ids"]}

    return dataset.map(row, remove_columns=dataset.column_names, desc="Reward rows")


class Reward:
    """The reward-model stages (tasks/stages.Stages)."""

    def __init__(self, cfg: TuneforgeConfig, run_dir: Path, main: bool):
        self.cfg, self.run_dir, self.main = cfg, run_dir, main
        self.initial_adapter = self.resized_vocab = None

    def prepare(self) -> dict:
        cfg = self.cfg
        self.model_path, self.tokenizer, self.tok_report = prepare_tokenizer(cfg)
        self.data = prepare_preferences(cfg.data, cfg.format, cfg.train, self.tokenizer)
        return run_identity(self.data, content_hash(self.tokenizer))

    def check(self) -> None:
        cfg = self.cfg
        run_doctor(self)
        n = min(cfg.eval.num_samples, len(self.data.eval)) if cfg.eval.before_after else 0
        self.scored = self.data.eval.select(range(n))

    def build_model(self):
        cfg = self.cfg
        # The head is new (drawn under the seed the lifecycle set); the fixed PAD id tells it where a row ends.
        base = load_base(cfg, self.model_path, self.tokenizer, num_labels=task(cfg.task).num_labels)
        self.load_seconds, self.resized_vocab = base.load_seconds, base.resized_vocab
        if cfg.peft.method == "none":
            return base.model
        # SEQ_CLS: PEFT trains and saves the new score head in full beside the LoRA matrices (modules_to_save).
        return add_lora(base.model, cfg.peft, new_token_ids(self.tokenizer, self.tok_report), task_type="SEQ_CLS",
                        weights_path=self.model_path)

    def baseline(self, model):
        return self._scores(model)

    def _scores(self, model):
        if not len(self.scored):
            return None
        return pairwise_scores(model, self.scored, self.tokenizer.pad_token_id, self.cfg.eval.batch_size)

    def build_trainer(self, model, args, callbacks: list):
        # TRL casts a quantized model's trainable parameters to bf16 (see adapter_dtypes_kept); its length filter
        # finds nothing to drop (the data stage cut every row to train.max_length).
        with adapter_dtypes_kept(model), without_bars(transformers_bars=False):
            return RewardTrainer(model=model, args=args, train_dataset=reward_rows(self.data.train),
                                 eval_dataset=reward_rows(self.scored) if len(self.scored) else None,
                                 processing_class=self.tokenizer, callbacks=callbacks)

    def evaluate(self, model, trainer):
        """The 'after' scores through the shared scoring path (the held-out Bradley-Terry loss, accuracy and margin
        TRL's evaluate would compute on the same pairs, without a second pass over them; with
        train.eval_strategy=steps|epoch TRL evaluates them during training too)."""
        return self._scores(model)

    def metrics(self, result, trainer, before, after) -> dict:
        metrics = training_metrics(result, trainer, self.data, self.tok_report, self.tokenizer)
        metrics["model_load_s"] = self.load_seconds
        if after is not None:
            metrics |= {"reward_before": before.scores, "reward_after": after.scores, "eval_pairs": len(self.scored)}
        return metrics

    def report(self, before, after, metrics: dict) -> None:
        """predictions_before.jsonl / predictions.jsonl (each held-out pair: prompt, both answers, their scores) and
        the before/after table."""
        if after is None:
            return
        rundir.write_predictions(self.run_dir / "predictions_before.jsonl", self._pairs(before))
        rundir.write_predictions(self.run_dir / "predictions.jsonl", self._pairs(after))
        print_comparison({"before": before.scores, "after": after.scores},
                         f"Held-out pairs ({len(self.scored)}, reward of chosen vs rejected; before = the base with "
                         "its new score head)")

    def _pairs(self, scored) -> list[dict]:
        out = []
        for row, chosen, rejected in zip(self.scored, scored.chosen, scored.rejected):
            prompt, answer = generation_pairs([row], 1)[0]
            out.append({"prompt": prompt.text if isinstance(prompt, Rendered) else prompt, "chosen": answer,
                        "rejected": self.tokenizer.decode(row["rejected_ids"], skip_special_tokens=True),
                        "chosen_score": chosen, "rejected_score": rejected, "margin": chosen - rejected})
        return out
