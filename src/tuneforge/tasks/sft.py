"""`task=sft`: supervised fine-tuning with TRL's SFTTrainer, its stages top to bottom (DESIGN.md section 2).
The run around them (run directory, guards, saving, metrics files) is lifecycle.py's."""

from __future__ import annotations

import logging
from pathlib import Path

from tuneforge.config.packing_modes import packing_mode
from tuneforge.config.schemas import TuneforgeConfig
from tuneforge.data.collators import TokenCounter, build_collator
from tuneforge.data.packing import check_no_contamination, pack, probe_rows
from tuneforge.data.pipeline import prepare
from tuneforge.eval.inference import GenerationSettings
from tuneforge.eval.metrics import adapter_off, evaluate_generations, generation_pairs
from tuneforge.eval.samples import SAMPLES_FILE, SampleGenerations
from tuneforge.models.adapters import adapter_dtypes_kept, add_lora, keep_initial_adapter
from tuneforge.models.tokenizer import content_hash, new_token_ids
from tuneforge.runs import launch
from tuneforge.runs.manifest import run_identity
from tuneforge.tasks.sft_trainer import TuneforgeSFTTrainer
from tuneforge.tasks.stages import (
    generation_metrics,
    load_base,
    prepare_tokenizer,
    report_generations,
    run_doctor,
    training_metrics,
)

log = logging.getLogger(__name__)


class SFT:
    """The SFT stages (tasks/stages.Stages)."""

    def __init__(self, cfg: TuneforgeConfig, run_dir: Path, main: bool):
        self.cfg, self.run_dir, self.main = cfg, run_dir, main
        self.initial_adapter = self.resized_vocab = None
        self.gen = GenerationSettings(max_new_tokens=cfg.eval.max_new_tokens,
                                      max_input_tokens=cfg.eval.max_input_tokens, batch_size=cfg.eval.batch_size)

    def prepare(self) -> dict:
        cfg = self.cfg
        self.model_path, self.tokenizer, self.tok_report = prepare_tokenizer(cfg)
        self.data = prepare(cfg.data, cfg.format, cfg.train, self.tokenizer, cfg.collator)
        return run_identity(self.data, content_hash(self.tokenizer))

    def check(self) -> None:
        cfg = self.cfg
        run_doctor(self)
        self.train_rows, self.packing_stats = pack(self.data.train, cfg.packing, cfg.train.max_length)
        self.held_out = generation_pairs(self.data.eval, cfg.eval.num_samples) if cfg.eval.before_after else []

    def build_model(self):
        cfg = self.cfg
        base = load_base(cfg, self.model_path, self.tokenizer)
        self.load_seconds, self.resized_vocab = base.load_seconds, base.resized_vocab
        model = add_lora(base.model, cfg.peft, new_token_ids(self.tokenizer, self.tok_report),
                         weights_path=self.model_path)
        self.initial_adapter = keep_initial_adapter(model, cfg.peft, self.run_dir) if self.main else None
        return model

    def baseline(self, model):
        """Held-out generations on the same base weights with the adapter off: the 'before' column."""
        if not self.held_out:
            return None
        with adapter_off(model):
            return evaluate_generations(model, self.tokenizer, self.held_out, self.gen)

    def build_trainer(self, model, args, callbacks: list) -> TuneforgeSFTTrainer:
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
            return TuneforgeSFTTrainer(model=model, args=args, train_dataset=self.train_rows, eval_dataset=eval_rows,
                                       processing_class=self.tokenizer, data_collator=data_collator,
                                       callbacks=callbacks, fused_lm_head=bool(cfg.train.fused_lm_head),
                                       token_metrics=cfg.train.token_metrics)

    def evaluate(self, model, trainer):
        """The 'after' column; every rank generates (sharded models generate together)."""
        return evaluate_generations(model, self.tokenizer, self.held_out, self.gen) if self.held_out else None

    def metrics(self, result, trainer, before, after) -> dict:
        metrics = training_metrics(result, trainer, self.data, self.tok_report, self.tokenizer)
        metrics |= generation_metrics(before, after)
        metrics["model_load_s"] = self.load_seconds
        # Over every batch the collator built (train, and eval when train.eval_strategy is set).
        metrics["batches"] = self.collate.summary() | {"packing": self.packing_stats.as_dict()}
        metrics["padding_efficiency"] = metrics["batches"]["padding_efficiency"]
        metrics["trained_token_fraction"] = metrics["batches"]["trained_token_fraction"]
        return metrics

    def report(self, before, after, metrics: dict) -> None:
        if after is not None:
            report_generations(self.run_dir, before, after,
                               f"Held-out generation ({len(self.held_out)} prompts, same base weights)")
