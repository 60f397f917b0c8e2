"""`task=sft`: supervised fine-tuning with TRL's SFTTrainer, its stages top to bottom (DESIGN.md section 2).
The run around them (run directory, guards, saving, metrics files) is lifecycle.py's."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from trl import SFTTrainer

from tuneforge import doctor, launch, runs
from tuneforge.config import TuneforgeConfig
from tuneforge.data.collators import TokenCounter, build_collator
from tuneforge.data.packing import check_no_contamination, pack, packing_mode, probe_rows
from tuneforge.data.pipeline import PreparedData, prepare
from tuneforge.evaluate import adapter_off, evaluate_generations, generation_pairs, print_comparison
from tuneforge.inference import GenerationSettings
from tuneforge.manifest import run_identity
from tuneforge.models.adapters import (add_lora, adapter_dtypes_kept, enable_checkpointing, keep_initial_adapter,
                                      prepare_base)
from tuneforge.models.loading import fit_embeddings, load_model, resolve_path
from tuneforge.samples import SAMPLES_FILE, SampleGenerations
from tuneforge.tokenizer import content_hash, load_tokenizer, new_token_ids

log = logging.getLogger(__name__)


class SFT:
    """The SFT stages for lifecycle.run (its docstring lists the order they are called in)."""

    def __init__(self, cfg: TuneforgeConfig, run_dir: Path, main: bool):
        self.cfg, self.run_dir, self.main = cfg, run_dir, main
        self.initial_adapter = self.resized_vocab = None
        self.gen = GenerationSettings(max_new_tokens=cfg.eval.max_new_tokens,
                                      max_input_tokens=cfg.eval.max_input_tokens, batch_size=cfg.eval.batch_size)

    @staticmethod
    def sweep_metric(cfg: TuneforgeConfig) -> str:
        return cfg.eval.metric

    def prepare(self) -> dict:
        cfg = self.cfg
        self.model_path = resolve_path(cfg.model)
        self.tokenizer, self.tok_report = load_tokenizer(self.model_path, cfg.tokenizer, cfg.model.revision,
                                                         cfg.model.trust_remote_code)
        self.data = prepare(cfg.data, cfg.format, cfg.train, self.tokenizer, cfg.collator)
        return run_identity(self.data, content_hash(self.tokenizer))

    def check(self) -> None:
        cfg = self.cfg
        if cfg.doctor.enabled:
            doctor.before_training(cfg, self.tokenizer, self.tok_report, self.model_path, self.data,
                                   self.run_dir if self.main else None)
        self.train_rows, self.packing_stats = pack(self.data.train, cfg.packing, cfg.train.max_length)
        self.held_out = generation_pairs(self.data.eval, cfg.eval.num_samples) if cfg.eval.before_after else []

    def build_model(self):
        cfg, tokenizer = self.cfg, self.tokenizer
        start = time.perf_counter()
        model = load_model(self.model_path, cfg.model, cfg.quant)
        self.load_seconds = time.perf_counter() - start
        if fit_embeddings(model, tokenizer):
            self.resized_vocab = model.get_input_embeddings().weight.shape[0]
        model = prepare_base(model, cfg.quant)
        model = enable_checkpointing(model, cfg.train)
        model = add_lora(model, cfg.peft, new_token_ids(tokenizer, self.tok_report), weights_path=self.model_path)
        self.initial_adapter = keep_initial_adapter(model, cfg.peft, self.run_dir) if self.main else None
        return model

    def baseline(self, model):
        """Held-out generations on the same base weights with the adapter off: the 'before' column."""
        if not self.held_out:
            return None
        with adapter_off(model):
            return evaluate_generations(model, self.tokenizer, self.held_out, self.gen)

    def build_trainer(self, model, args, callbacks: list) -> SFTTrainer:
        cfg, data = self.cfg, self.data
        # Labels come from the data stage; the collator only pads or flattens, and counts tokens for metrics.
        self.collate = TokenCounter(build_collator(cfg.collator, cfg.packing, self.tokenizer,
                                                   cfg.tokenizer.padding_side), cfg.train.dataloader_num_workers)
        if packing_mode(cfg.packing.mode).shares_rows:
            check_no_contamination(model, self.collate.collate, probe_rows(data.train))
        data_collator = self.collate
        if cfg.eval.sample_every_steps:
            callbacks.append(SampleGenerations(self.tokenizer, generation_pairs(data.eval, cfg.eval.sample_prompts),
                                               self.gen, cfg.eval.sample_every_steps, self.run_dir / SAMPLES_FILE))
        if cfg.launcher.record_ranks and launch.process_state().num_processes > 1:
            recorder = launch.RankRecorder()  # ranks.json: each rank's shard, losses and final weights
            recorder.attach(model)
            callbacks.append(recorder.callback)
            data_collator = recorder.wrap_collator(self.collate)
        eval_rows = data.eval.select_columns(["input_ids", "labels"]) if cfg.train.eval_strategy != "no" else None
        with adapter_dtypes_kept(model):
            return SFTTrainer(model=model, args=args, train_dataset=self.train_rows, eval_dataset=eval_rows,
                              processing_class=self.tokenizer, data_collator=data_collator, callbacks=callbacks)

    def evaluate(self, model, trainer):
        """The 'after' column; every rank generates (sharded models generate together)."""
        return evaluate_generations(model, self.tokenizer, self.held_out, self.gen) if self.held_out else None

    def metrics(self, result, trainer, before, after) -> dict:
        metrics = _metrics(result, trainer, self.data, self.tok_report, self.tokenizer, before, after)
        metrics["model_load_s"] = self.load_seconds
        # Over every batch the collator built (train, and eval when train.eval_strategy is set).
        metrics["batches"] = self.collate.summary() | {"packing": self.packing_stats.as_dict()}
        metrics["padding_efficiency"] = metrics["batches"]["padding_efficiency"]
        metrics["trained_token_fraction"] = metrics["batches"]["trained_token_fraction"]
        return metrics

    def report(self, before, after, metrics: dict) -> None:
        if after is None:
            return
        runs.write_predictions(self.run_dir / "predictions_before.jsonl", before.predictions)
        runs.write_predictions(self.run_dir / "predictions.jsonl", after.predictions)
        print_comparison({"before": before.scores, "after": after.scores},
                         f"Held-out generation ({len(self.held_out)} prompts, same base weights)")


def _metrics(result, trainer, data: PreparedData, tok_report, tokenizer, before, after) -> dict:
    runtime = result.metrics.get("train_runtime", 0.0)
    tokens = trainer.state.num_input_tokens_seen
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = {
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "train_runtime_s": runtime,
        "train_steps": trainer.state.global_step,
        "tokens_seen": tokens,
        "tokens_per_second": tokens / runtime if runtime else None,
        "data": {split: st.as_dict() for split, st in data.stats.items()},
        "tokenizer": {"fixes": tok_report.fixes, "added_tokens": tok_report.added_tokens,
                      "content_hash": content_hash(tokenizer)},
        "log_history": trainer.state.log_history,
        # Set when train.load_best_model_at_end kept the best evaluation's weights (saved as the adapter).
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
        "best_metric": trainer.state.best_metric,
    }
    if before is not None and after is not None:
        metrics["eval_before"] = before.scores
        metrics["eval_after"] = after.scores
        metrics["eval_samples"] = len(after.predictions)
    return metrics
