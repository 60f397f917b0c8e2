"""`task=dpo`, `task=kto` and `task=orpo`: preference tuning with TRL's DPOTrainer / KTOTrainer / ORPOTrainer (the
last from trl.experimental), the stages top to bottom. The run around them is lifecycle.py's, as for SFT; the rows
come from data/preference.py.

ORPO has no reference model: its loss is the chosen sequence's NLL minus beta x log sigmoid(log odds ratio of chosen
vs rejected). For DPO and KTO the reference model is never a second copy of the weights. A fresh adapter: the
reference is the base with the adapter switched off (what the policy starts from). `model.adapter=SFT_RUN`: the SFT
run's adapter trains on, and the reference is a frozen copy of it (TRL's "ref" adapter): the SFT policy DPO starts
from, which the common SFT -> DPO recipe compares against. The SFT run's tokenizer and chat template are used, so its
prompts render as they trained.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from trl import DPOTrainer, KTOTrainer

from tuneforge.config.schemas import TuneforgeConfig
from tuneforge.data.preference import PAIRED, UNPAIRED, prepare_preferences
from tuneforge.data.tokenize import IGNORE
from tuneforge.eval.inference import GenerationSettings
from tuneforge.eval.metrics import evaluate_generations, generation_pairs, preference_scores, print_comparison
from tuneforge.models.adapters import adapter_dtypes_kept
from tuneforge.models.tokenizer import content_hash
from tuneforge.runs.console import without_bars
from tuneforge.runs.manifest import run_identity
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



class _Prepared:
    """TRL's preference trainers render and tokenize rows again in `_prepare_dataset`; tuneforge's data stage
    already did (chat template, end-of-turn token, prompt cut by token position, truncation counted), so the
    prepared ids pass through unchanged. The KTO trainer's own steps after tokenization (KL pairs, balance)
    run in `_after_tokenization`."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


class PreparedDPOTrainer(_Prepared, DPOTrainer):
    pass


class PreparedKTOTrainer(KTOTrainer):
    """KTO's KL term pairs each prompt with another row's completion, within each batch; TRL builds those pairs
    after tokenizing, so its `_prepare_dataset` runs on rows that already carry `prompt`-free ids by giving it a
    tokenization that returns them as they are."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if self.calculate_KL:
            size = args.per_device_train_batch_size

            def add_kl(batch):  # TRL 1.16's rotation: (x_i, y_{i-1}) within each batch
                batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
                return batch

            dataset = dataset.map(add_kl, batched=True, batch_size=size, desc=f"KL pairs of the {dataset_name} set")
        return dataset


class Preference:
    """The preference stages (tasks/stages.Stages) over one of TRL's preference trainers: `dpo` and `kto` below
    are the classes config/tasks.py names."""

    def __init__(self, cfg: TuneforgeConfig, run_dir: Path, main: bool, trainer: type, paired: bool):
        self.cfg, self.run_dir, self.main = cfg, run_dir, main
        self.trainer_class = trainer
        self.initial_adapter = self.resized_vocab = None
        # Paired rows (prompt, chosen, rejected) are scored for held-out preference accuracy; unpaired ones are not.
        self.paired = paired
        self.gen = GenerationSettings(max_new_tokens=cfg.eval.max_new_tokens,
                                      max_input_tokens=cfg.eval.max_input_tokens, batch_size=cfg.eval.batch_size)

    def prepare(self) -> dict:
        cfg = self.cfg
        self.sft_adapter, self.model_path, self.tokenizer, self.tok_report = prepare_start(cfg)
        self.data = prepare_preferences(cfg.data, cfg.format, cfg.train, self.tokenizer)
        return run_identity(self.data, content_hash(self.tokenizer)) | (
            {"sft_adapter": str(self.sft_adapter)} if self.sft_adapter else {})

    def check(self) -> None:
        cfg = self.cfg
        run_doctor(self)
        self.held_out = generation_pairs(self.data.eval, cfg.eval.num_samples) if cfg.eval.before_after else []
        self.scored = (self.data.eval.select(range(min(cfg.eval.num_samples, len(self.data.eval))))
                       if self.paired else None)

    def build_model(self):
        return build_policy(self)


    def baseline(self, model):
        with starting_policy(model, self.sft_adapter):
            return self._scores(model)

    def _scores(self, model) -> dict:
        out = {}
        if self.scored is not None and len(self.scored):
            out["preference"] = preference_scores(model, self.tokenizer, self.scored, self.cfg.eval.batch_size)
        if self.held_out:
            out["generation"] = evaluate_generations(model, self.tokenizer, self.held_out, self.gen)
        return out

    def build_trainer(self, model, args, callbacks: list):
        cfg, data = self.cfg, self.data
        columns = PAIRED if self.paired else UNPAIRED
        # TRL's reward accuracy and margins on the rows the before/after table scores (eval.num_samples).
        held_out = data.eval.select(range(min(cfg.eval.num_samples, len(data.eval))))
        eval_rows = held_out.select_columns(columns) if len(held_out) else None
        with adapter_dtypes_kept(model):
            trainer = self.trainer_class(model=model, args=args, train_dataset=data.train.select_columns(columns),
                                              eval_dataset=eval_rows, processing_class=self.tokenizer,
                                              callbacks=callbacks)
        # TRL copies a pretrained adapter into a frozen "ref" adapter. A fresh adapter's copy is the base plus
        # an initial delta; switched off, the adapter gives the base itself, and one LoRA pass less per step.
        if not self.sft_adapter and REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
            model.delete_adapter(REFERENCE_ADAPTER)
        self.trainer = trainer
        return trainer

    def evaluate(self, model, trainer):
        """TRL's held-out reward accuracy and margins (policy vs reference), then the 'after' scores."""
        rewards = trainer.evaluate() if trainer.eval_dataset is not None else {}
        return {"rewards": rewards, **self._scores(model)}

    def metrics(self, result, trainer, before, after) -> dict:
        metrics = training_metrics(result, trainer, self.data, self.tok_report, self.tokenizer)
        metrics["model_load_s"] = self.load_seconds
        metrics |= {k: v for k, v in after["rewards"].items() if k.startswith("eval_")}
        if "preference" in after:
            metrics["preference_before"] = before["preference"]
            metrics["preference_after"] = after["preference"]
        if "generation" in after:
            metrics |= generation_metrics(before["generation"], after["generation"])
        return metrics

    def report(self, before, after, metrics: dict) -> None:
        start = "SFT policy" if self.sft_adapter else "base"
        if "preference" in after:
            print_comparison({"before": before["preference"], "after": after["preference"]},
                             f"Held-out preference pairs ({len(self.scored)}, log-probability of chosen vs rejected; "
                             f"before = the {start})")
        if "generation" in after:
            report_generations(self.run_dir, before["generation"], after["generation"],
                               f"Held-out generation ({len(self.held_out)} prompts, reference = the chosen answer)")


def dpo(cfg: TuneforgeConfig, run_dir: Path, main: bool) -> Preference:
    """task=dpo: DPOTrainer on (prompt, chosen, rejected) rows."""
    return Preference(cfg, run_dir, main, PreparedDPOTrainer, paired=True)


def kto(cfg: TuneforgeConfig, run_dir: Path, main: bool) -> Preference:
    """task=kto: KTOTrainer on (prompt, completion, label) rows."""
    return Preference(cfg, run_dir, main, PreparedKTOTrainer, paired=False)


def orpo_rows(dataset):
    """Prepared (prompt_ids, chosen_ids, rejected_ids) rows as the rows ORPOTrainer's own tokenization would give
    (its `tokenize_row`): prompt ids, and each answer's whole sequence with its attention mask and labels (-100 over
    the prompt)."""
    def row(r):
        out = {"prompt_input_ids": r["prompt_ids"], "prompt_attention_mask": [1] * len(r["prompt_ids"])}
        for side in ("chosen", "rejected"):
            ids = r["prompt_ids"] + r[f"{side}_ids"]
            out |= {f"{side}_input_ids": ids, f"{side}_attention_mask": [1] * len(ids),
                    f"{side}_labels": [IGNORE] * len(r["prompt_ids"]) + r[f"{side}_ids"]}
        return out

    return dataset.map(row, remove_columns=dataset.column_names, desc="ORPO rows")


def orpo(cfg: TuneforgeConfig, run_dir: Path, main: bool) -> Preference:
    """task=orpo: TRL's experimental ORPOTrainer (trl.experimental.orpo) on (prompt, chosen, rejected) rows."""
    from trl.experimental.orpo import ORPOTrainer  # its import warning is filtered (runs/console.py): said below

    class PreparedORPOTrainer(ORPOTrainer):
        """ORPOTrainer on tuneforge's prepared ids: its __init__ maps rows through prompt extraction, the chat
        template and `tokenize_row`; given ORPO's own columns (orpo_rows), the first two find nothing to do and
        `tokenize_row` passes them through."""

        def __init__(self, *args, train_dataset, eval_dataset=None, **kwargs):
            with without_bars(transformers_bars=False):  # four passes over prepared rows that change nothing
                super().__init__(*args, train_dataset=orpo_rows(train_dataset),
                                 eval_dataset=orpo_rows(eval_dataset) if eval_dataset is not None else None, **kwargs)

        def tokenize_row(self, feature, model=None):
            return feature

        def _track_num_input_tokens(self, inputs):
            # ORPO's batches hold chosen_* and rejected_* sequences, no input_ids: the Trainer would count none.
            sides = ("chosen", "rejected")
            super()._track_num_input_tokens({
                "input_ids": torch.cat([inputs[f"{s}_input_ids"].flatten() for s in sides]),
                "attention_mask": torch.cat([inputs[f"{s}_attention_mask"].flatten() for s in sides])})

    log.info("task=orpo: TRL's ORPOTrainer from trl.experimental (TRL marks it experimental: its API may change "
             "between TRL releases)")
    return Preference(cfg, run_dir, main, PreparedORPOTrainer, paired=True)
