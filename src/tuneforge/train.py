"""`tuneforge train`: the SFT pipeline, stage by stage, top to bottom (DESIGN.md section 2)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from transformers import set_seed
from trl import SFTTrainer

from tuneforge import console, faults, launch, library_args, model_card, runs
from tuneforge.callbacks import load as user_callbacks
from tuneforge.config import ConfigError, TuneforgeConfig
from tuneforge.data.collators import TokenCounter, build_collator
from tuneforge.data.packing import check_no_contamination, pack, probe_rows
from tuneforge.data.pipeline import PreparedData, prepare
from tuneforge.estimate import preflight, print_estimate
from tuneforge.evaluate import evaluate_generations, generation_pairs, print_comparison
from tuneforge.inference import GenerationSettings
from tuneforge.models.adapters import (add_lora, adapter_dtypes_kept, enable_checkpointing, keep_initial_adapter,
                                      prepare_base)
from tuneforge.models.loading import fit_embeddings, load_model, resolve_path
from tuneforge.samples import SAMPLES_FILE, SampleGenerations
from tuneforge.tokenizer import content_hash, load_tokenizer, new_token_ids

log = logging.getLogger(__name__)


def plan(cfg: TuneforgeConfig) -> dict:
    """What a run would do, computed without loading any weights (`dry_run=true`)."""
    t = cfg.train
    world = cfg.launcher.num_processes if cfg.launcher.name != "local" else int(os.environ.get("WORLD_SIZE", "1"))
    return {
        "model": cfg.model.name_or_path,
        "quantization": (f"4-bit {cfg.quant.bnb_4bit_quant_type}" if cfg.quant.load_in_4bit else
                         "8-bit" if cfg.quant.load_in_8bit else cfg.model.dtype),
        "adapter": f"LoRA r={cfg.peft.r} alpha={cfg.peft.lora_alpha} on {cfg.peft.target_modules}"
        if cfg.peft.method == "lora" else "none (full fine-tune)",
        "data": cfg.data.path,
        "format": cfg.format.strategy,
        "collator": cfg.collator.name,
        "packing": cfg.packing.mode,
        "max_length": t.max_length,
        "launcher": f"{cfg.launcher.name} ({world} process{'es' if world > 1 else ''})",
        "effective_batch_size": t.per_device_train_batch_size * t.gradient_accumulation_steps * world,
        "max_steps": t.max_steps if t.max_steps > 0 else f"{t.num_train_epochs} epoch(s)",
        "learning_rate": t.learning_rate,
    }


def print_dry_run(cfg: TuneforgeConfig) -> None:
    """The plan, then the GPU memory estimate (tuneforge/estimate.py)."""
    for key, value in plan(cfg).items():
        print(f"{key:>22}: {value}")
    print_estimate(cfg)


def run(cfg: TuneforgeConfig, run_dir: Path, resolved_config: Any, callbacks: list | None = None) -> dict:
    """Train, save and score; returns the metrics written to metrics.json. `callbacks`: extra TrainerCallbacks."""
    if cfg.dry_run:
        print_dry_run(cfg)
        return {}
    # Several processes (launcher=ddp/...): one run directory, written by the main process only.
    state = launch.process_state()
    main = state.is_main_process
    if main:
        runs.claim_run_dir(run_dir, cfg.train.resume_from_checkpoint)
        runs.write_config(run_dir, resolved_config)
    runs.use_token(cfg.model)

    with state.main_process_first():  # the model conversion and the data cache are built once
        model_path = resolve_path(cfg.model)
        tokenizer, tok_report = load_tokenizer(model_path, cfg.tokenizer, cfg.model.revision,
                                               cfg.model.trust_remote_code)
        data = prepare(cfg.data, cfg.format, cfg.train, tokenizer, cfg.collator)
    if cfg.doctor.enabled:
        _doctor(cfg, tokenizer, tok_report, model_path, data, run_dir if main else None)
    train_rows, packing_stats = pack(data.train, cfg.packing, cfg.train.max_length)
    if main:
        runs.write_manifest(run_dir, **runs.run_identity(cfg, data, content_hash(tokenizer)))

    if main and (warning := preflight(cfg)):
        log.warning("GPU memory: %s", warning)
    start = time.perf_counter()
    model = load_model(model_path, cfg.model, cfg.quant)
    load_seconds = time.perf_counter() - start
    new_rows = fit_embeddings(model, tokenizer)
    # LoRA's A matrices are drawn here, before the Trainer seeds: seed now, or no two runs start alike.
    set_seed(cfg.train.seed)
    model = prepare_base(model, cfg.quant)
    model = enable_checkpointing(model, cfg.train)
    model = add_lora(model, cfg.peft, new_token_ids(tokenizer, tok_report), weights_path=model_path)
    initial_adapter = keep_initial_adapter(model, cfg.peft, run_dir) if main else None

    gen = GenerationSettings(max_new_tokens=cfg.eval.max_new_tokens, max_input_tokens=cfg.eval.max_input_tokens,
                             batch_size=cfg.eval.batch_size)
    held_out = generation_pairs(data.eval, cfg.eval.num_samples) if cfg.eval.before_after else []
    before = _score(model, tokenizer, held_out, gen, adapter_off=True) if held_out else None

    # Labels come from the data stage; the collator only pads or flattens, and counts tokens for metrics.
    collate = TokenCounter(build_collator(cfg.collator, cfg.packing, tokenizer, cfg.tokenizer.padding_side),
                           cfg.train.dataloader_num_workers)
    if cfg.packing.mode != "none":
        check_no_contamination(model, collate.collate, probe_rows(data.train))
    callbacks, data_collator = [*user_callbacks(cfg.callbacks), *(callbacks or [])], collate
    if cfg.eval.sample_every_steps:
        callbacks.append(SampleGenerations(tokenizer, generation_pairs(data.eval, cfg.eval.sample_prompts), gen,
                                           cfg.eval.sample_every_steps, run_dir / SAMPLES_FILE))
    if state.num_processes > 1 and cfg.launcher.record_ranks:  # ranks.json: each rank's shard, losses, weights
        recorder = launch.RankRecorder()
        recorder.attach(model)
        callbacks.append(recorder.callback)
        data_collator = recorder.wrap_collator(collate)
    if main:
        runs.check_free_space(run_dir, runs.estimate_for(model, cfg.train))
    args = library_args.trainer_arguments(cfg, run_dir)
    with adapter_dtypes_kept(model):
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_rows,
            eval_dataset=data.eval.select_columns(["input_ids", "labels"]) if cfg.train.eval_strategy != "no" else None,
            processing_class=tokenizer,
            data_collator=data_collator,
            callbacks=callbacks,
        )
    console.attach(trainer)
    # TRL writes its generic model card at every checkpoint; the run's own card is written once it has scores.
    trainer.create_model_card = lambda *args, **kwargs: None
    result = faults.train_guarded(trainer, cfg.train, run_dir, args.bf16)
    if not runs.save_adapter(trainer, tokenizer, run_dir, initial_adapter):
        # Every rank scores too (sharded models generate together); only the main process writes.
        if held_out:
            _score(model, tokenizer, held_out, gen)
        return {}

    after = _score(model, tokenizer, held_out, gen) if held_out else None
    metrics = _metrics(result, trainer, data, tok_report, load_seconds, tokenizer, before, after)
    # Over every batch the collator built (train, and eval when train.eval_strategy is set).
    metrics["batches"] = collate.summary() | {"packing": packing_stats.as_dict()}
    metrics["padding_efficiency"] = metrics["batches"]["padding_efficiency"]
    metrics["trained_token_fraction"] = metrics["batches"]["trained_token_fraction"]
    metrics["world_size"] = trainer.args.world_size
    runs.write_json(run_dir / runs.METRICS_FILE, metrics)
    if after is not None:
        runs.write_predictions(run_dir / "predictions_before.jsonl", before.predictions)
        runs.write_predictions(run_dir / "predictions.jsonl", after.predictions)
        print_comparison({"before": before.scores, "after": after.scores},
                         f"Held-out generation ({len(held_out)} prompts, same base weights)")
    runs.plot_losses(trainer.state.log_history, run_dir / "loss.png")
    model_card.write(cfg, metrics, runs.read_manifest(run_dir).get("command", runs.command_line()), run_dir,
                     model.get_input_embeddings().weight.shape[0] if new_rows else None)
    runs.write_manifest(run_dir, status="finished", finished_at=runs._now())
    log.info("Run saved in %s", run_dir)
    return metrics


def _doctor(cfg, tokenizer, tok_report, model_path, data, run_dir) -> None:
    """The doctor's checks on what training will use; errors stop the run before weights load."""
    from tuneforge import doctor
    from tuneforge.models.loading import load_config

    checks = doctor.run_checks(doctor.Context(cfg, tokenizer, tok_report, load_config(model_path, cfg.model), data))
    if run_dir is not None:  # None: not the main process
        doctor.write_json(checks, run_dir / "doctor.json")
    if doctor.has_errors(checks):
        doctor.print_table(checks)
        raise ConfigError("the doctor found errors (table above); fix them or set doctor.enabled=false to override.")
    for c in checks:
        if c.status in (doctor.WARNING, doctor.FIXED):
            log.info("doctor: %s %s: %s", c.name, c.status, c.action)


def _score(model, tokenizer, conversations, settings, adapter_off: bool = False):
    if adapter_off and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            return evaluate_generations(model, tokenizer, conversations, settings)
    return evaluate_generations(model, tokenizer, conversations, settings)


def _metrics(result, trainer, data: PreparedData, tok_report, load_seconds, tokenizer, before, after) -> dict:
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
        "model_load_s": load_seconds,
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
