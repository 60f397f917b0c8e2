"""The training step: tuneforge's against a lean reference built from the same libraries, broken down.

    python benchmarks/step_time.py                                  # demo job, CPU: lean, tuneforge, tuneforge_fused
    python benchmarks/step_time.py --repeats 5 --steps 10 --arms lean,tuneforge
    python benchmarks/step_time.py --batch 16 --max-length 512 --model DIR    # a GPU: the same script, other sizes

Arms (--mode interleaved, the default: each repeat is one fresh process training every arm in threads that
take turns, one optimizer step each, so load changes hit all alike; --mode separate: one process per arm):

  lean             transformers `Trainer` + PEFT, no tuneforge code: the model loaded with BitsAndBytesConfig,
                   `prepare_model_for_kbit_training`, `get_peft_model`, `DataCollatorForSeq2Seq` (pads to the
                   longest row, labels with -100), TrainingArguments with the same settings; what LLaMA-Factory
                   runs, without its own layers.
  tuneforge        tuneforge's SFT stages and trainer exactly as `tuneforge train` builds them (the demo recipe,
                   its callbacks: console, samples, NaN/signal guards, TensorBoard), device defaults applied.
  tuneforge_fused  tuneforge with TRL 1.16's fused, chunked LM head + per-step token metrics (train.fused_lm_head=
                   true, train.token_metrics=true): what tuneforge ran before issue 40.
  tuneforge_metrics  tuneforge with train.token_metrics=true (entropy, token accuracy on logged steps only).
  tuneforge_model_head  tuneforge with the model's own LM head and loss (train.fused_lm_head=false): the CPU
                   default; on CUDA, where the fused head is the default, this arm measures what it costs or saves.

Both sides train the same rows (tuneforge's prepared demo rows, written to a file the lean arm reads), in the
same order (same seed and data seed), on the same weights (tuneforge's converted SmolLM2 directory, or --model),
with the same LoRA (the recipe's r, alpha, dropout, all linear layers), optimizer, schedule and precision.

A step is the time between two consecutive `on_step_begin` events (after --warmup steps), split into exclusive
parts: collate (the data collator), backbone (the decoder stack's forward), head_loss (the rest of the model
call: LM head and loss), loss_extras (compute_loss outside the model call: metrics, token counts), backward,
optimizer (gradient clipping + optimizer step), callbacks (every callback event, sample generation included),
log (the Trainer's log/save/evaluate outside its callbacks), other (the rest: data loading machinery,
scheduler, zero_grad). With CUDA every boundary synchronises the device (--no-sync to skip).

Results: a table on stdout and JSON (`benchmarks/results/step_time-<device>.json` unless --out): versions,
machine, load averages, commit, every run's per-step figures, and medians per arm.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PARTS = ("collate", "backbone", "head_loss", "loss_extras", "backward", "optimizer", "callbacks", "log", "other")

# arm -> tuneforge overrides (None: the lean reference).
ARMS = {
    "lean": None,
    "tuneforge": [],
    "tuneforge_fused": ["train.fused_lm_head=true", "train.token_metrics=true"],
    "tuneforge_metrics": ["train.token_metrics=true"],
    "tuneforge_model_head": ["train.fused_lm_head=false"],
}


# --- timing (no tuneforge code: the lean arm uses it too) ---------------------------------------------------

class StepTimer:
    """Exclusive wall time per part, per step interval; parts nest (a child's time is not its parent's)."""

    def __init__(self, sync: bool):
        import torch

        self.sync = sync and torch.cuda.is_available()
        self.stack: list[list] = []  # [name, start, child time]
        self.steps: list[dict] = []  # one dict per interval between on_step_begin events
        self.current: dict | None = None
        self.step_start = None
        self.tokens = 0
        self.baton, self.name = None, ""

    def now(self) -> float:
        if self.sync:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def push(self, name: str) -> None:
        self.stack.append([name, self.now(), 0.0])

    def pop(self) -> None:
        name, start, child = self.stack.pop()
        elapsed = self.now() - start
        if self.stack:
            self.stack[-1][2] += elapsed
        if self.current is not None:
            self.current[name] = self.current.get(name, 0.0) + elapsed - child

    def step_begin(self) -> None:
        t = self.now()
        if self.current is not None:
            self.current["wall"] = t - self.step_start
            self.current["tokens"] = self.current.pop("_tokens", 0)
            self.current["other"] = self.current["wall"] - sum(self.current.get(p, 0.0) for p in PARTS if p != "other")
            self.steps.append(self.current)
        if self.baton is not None:  # interleaved: the next arm runs its step now; the wait is nobody's time
            self.baton.pass_on(self.name)
            self.baton.wait(self.name)
            t = self.now()
        self.current, self.step_start = {"_tokens": self.tokens}, t
        self.tokens = 0

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            self.push(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.pop()
        return timed


class Baton:
    """Arms training in threads of one process take turns, one optimizer step each: every arm's steps see the
    same machine load (other users' jobs come and go), which separate processes one after another do not."""

    def __init__(self, names: list[str]):
        self.order, self.turn, self.done = list(names), 0, set()
        self.cond = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.order[self.turn] == name)

    def pass_on(self, name: str) -> None:
        with self.cond:
            i = self.order.index(name)
            for k in range(1, len(self.order) + 1):
                j = (i + k) % len(self.order)
                if self.order[j] not in self.done or k == len(self.order):
                    self.turn = j
                    break
            self.cond.notify_all()

    def finish(self, name: str) -> None:
        with self.cond:
            self.done.add(name)
            if self.order[self.turn] == name:
                self.pass_on(name)


def instrument(trainer, sync: bool) -> StepTimer:
    """Wrap the trainer's collator, loss, model call, backbone, backward, optimizer, callbacks and logging."""
    timer = StepTimer(sync)
    collate = trainer.data_collator

    def collate_counted(examples):
        batch = collate(examples)
        mask = batch.get("attention_mask")
        timer.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch

    trainer.data_collator = timer.wrap("collate", collate_counted)
    trainer.compute_loss = timer.wrap("loss_extras", trainer.compute_loss)
    trainer.accelerator.backward = timer.wrap("backward", trainer.accelerator.backward)
    trainer.accelerator.clip_grad_norm_ = timer.wrap("optimizer", trainer.accelerator.clip_grad_norm_)
    trainer._maybe_log_save_evaluate = timer.wrap("log", trainer._maybe_log_save_evaluate)

    handler = trainer.callback_handler
    call_event = handler.call_event

    def timed_event(event, *args, **kwargs):
        if event == "on_step_begin":
            timer.step_begin()
        if event == "on_train_begin":
            result = call_event(event, *args, **kwargs)
            optimizer = trainer.optimizer  # prepared by accelerate before on_train_begin
            optimizer.step = timer.wrap("optimizer", optimizer.step)
            return result
        timer.push("callbacks")
        try:
            return call_event(event, *args, **kwargs)
        finally:
            timer.pop()

    handler.call_event = timed_event

    # The model call and the decoder stack, timed inside compute_loss only (sample generation calls them too,
    # and belongs to the callbacks).
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, base.base_model_prefix)

    def pre(module, args, kwargs=None):
        if timer.stack and timer.stack[0][0] == "loss_extras":
            timer.push(module._step_time_part)

    def post(module, args, output):
        if timer.stack and timer.stack[-1][0] == module._step_time_part:
            timer.pop()

    for module, part in ((model, "head_loss"), (backbone, "backbone")):
        module._step_time_part = part
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)
    return timer


def peak_memory_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def losses(trainer) -> dict:
    return {str(e["step"]): e["loss"] for e in trainer.state.log_history if "loss" in e}


# --- workers -----------------------------------------------------------------------------------------------

def lean_arm(spec: dict):
    """transformers Trainer + PEFT on the prepared rows: no tuneforge import."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorForSeq2Seq,
                              PreTrainedTokenizerFast, Trainer, TrainingArguments, set_seed)

    s = spec["settings"]
    rows = json.loads(Path(spec["rows"]).read_text())
    dataset = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]})
    cuda = torch.cuda.is_available()
    bf16 = s["bf16"]
    dtype = torch.bfloat16 if bf16 else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype) if s["quant"] == "nf4" else None
    set_seed(s["seed"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], quantization_config=quant, dtype=dtype,
                                                 device_map={"": 0} if cuda else None)
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s["gradient_checkpointing"])
    elif s["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=s["r"], lora_alpha=s["lora_alpha"], lora_dropout=s["lora_dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    # DataCollatorForSeq2Seq needs a tokenizer only for its pad id and padding side.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(spec["tokenizer_path"])
    tokenizer.pad_token_id, tokenizer.padding_side = s["pad_token_id"], "right"
    args = TrainingArguments(
        output_dir=spec["out_dir"], max_steps=s["max_steps"], per_device_train_batch_size=s["batch"],
        learning_rate=s["learning_rate"], warmup_steps=s["warmup_steps"], lr_scheduler_type=s["lr_scheduler_type"],
        weight_decay=s["weight_decay"], max_grad_norm=s["max_grad_norm"], optim=s["optim"],
        logging_steps=s["logging_steps"], seed=s["seed"], data_seed=s["seed"], bf16=bf16, use_cpu=not cuda,
        report_to=[], save_strategy="no", dataloader_pin_memory=cuda, remove_unused_columns=False,
        disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True))
    timer = instrument(trainer, spec["sync"])
    return timer, trainer.train, lambda: {"steps": timer.steps, "losses": losses(trainer), "peak_gib": peak_memory_gib()}


def tuneforge_arm(spec: dict):
    """tuneforge's SFT stages and trainer, as tasks/lifecycle.run builds them (saving and scoring left out)."""
    from transformers import set_seed

    from tuneforge.config import library_args
    from tuneforge.config.compose import load_config
    from tuneforge.runs import console, faults
    from tuneforge.tasks.sft import SFT

    console.silence_library_noise()
    cfg = load_config(spec["overrides"])
    run_dir = Path(spec["out_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    task = SFT(cfg, run_dir, True)
    task.prepare()
    task.check()
    set_seed(cfg.train.seed)
    model = task.build_model()
    args = library_args.trainer_arguments(cfg, run_dir)
    trainer = task.build_trainer(model, args, [])
    console.attach(trainer)
    trainer.create_model_card = lambda *a, **k: None
    timer = instrument(trainer, spec["sync"])
    return (timer, lambda: faults.train_guarded(trainer, cfg.train, run_dir, args.bf16),
            lambda: {"steps": timer.steps, "losses": losses(trainer), "peak_gib": peak_memory_gib(),
                     "fused_lm_head": cfg.train.fused_lm_head, "token_metrics": cfg.train.token_metrics})


def worker(spec_path: str) -> int:
    """One process: one arm, or (interleaved) every arm of the spec, each in its own thread, one step per turn."""
    spec = json.loads(Path(spec_path).read_text())
    specs = spec["arms"]
    built = {s["arm"]: (lean_arm(s) if s["arm"] == "lean" else tuneforge_arm(s)) for s in specs}
    baton = Baton(list(built)) if len(built) > 1 else None
    errors = {}

    def train(name, timer, run):
        try:
            if baton is not None:
                baton.wait(name)
            run()
        except BaseException as exc:  # noqa: BLE001 -- reported below; the other arms must not wait forever
            errors[name] = repr(exc)
            raise
        finally:
            if baton is not None:
                baton.finish(name)

    threads = []
    for name, (timer, run, _) in built.items():
        timer.baton, timer.name = baton, name
        threads.append(threading.Thread(target=train, args=(name, timer, run), name=name))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"arms failed: {errors}")
    Path(spec["result"]).write_text(json.dumps({name: result() for name, (_, _, result) in built.items()}))
    return 0


# --- the driver --------------------------------------------------------------------------------------------

def overrides_for(args) -> list[str]:
    """The tuneforge config of the job, for every tuneforge arm (and, resolved, the lean arm's settings)."""
    model = [] if args.model == "embedded" else [f"model.name_or_path={args.model}"]
    quant = ["quant=none"] if args.quant == "none" else []
    return ["recipe=demo", *model, *quant, f"train.max_steps={args.warmup + args.steps + 1}",
            f"train.per_device_train_batch_size={args.batch}", f"train.max_length={args.max_length}",
            *args.set]


def prepare(args, work: Path) -> dict:
    """Prepare the rows once with tuneforge, write them for the lean arm, and read the job's settings."""
    from tuneforge.config.compose import load_config
    from tuneforge.config.library_args import trainer_arguments
    from tuneforge.tasks.sft import SFT

    cfg = load_config(overrides_for(args))
    (work / "prep").mkdir(parents=True, exist_ok=True)
    task = SFT(cfg, work / "prep", True)
    task.prepare()
    task.check()
    rows = task.train_rows
    (work / "rows.json").write_text(json.dumps([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]))
    tok_dir = work / "tokenizer"
    task.tokenizer.save_pretrained(tok_dir)
    t = trainer_arguments(cfg, work / "prep")
    return {
        "model_path": str(task.model_path), "tokenizer_path": str(tok_dir), "rows": str(work / "rows.json"),
        "settings": {
            "quant": args.quant, "bf16": bool(t.bf16), "seed": t.seed, "batch": t.per_device_train_batch_size,
            "max_steps": t.max_steps, "learning_rate": t.learning_rate, "warmup_steps": t.warmup_steps,
            "lr_scheduler_type": str(getattr(t.lr_scheduler_type, "value", t.lr_scheduler_type)),
            "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm,
            "optim": str(getattr(t.optim, "value", t.optim)), "logging_steps": t.logging_steps,
            "gradient_checkpointing": bool(cfg.train.gradient_checkpointing), "r": cfg.peft.r,
            "lora_alpha": cfg.peft.lora_alpha, "lora_dropout": cfg.peft.lora_dropout,
            "pad_token_id": task.tokenizer.pad_token_id, "rows": len(rows), "max_length": cfg.train.max_length},
    }


def run_process(arms: list[str], common: dict, args, work: Path, index: int) -> dict:
    """One fresh process training `arms` (interleaved when several); {arm: its result}."""
    tag = f"{'+'.join(arms)}-{index}"
    specs = [{**common, "arm": arm, "out_dir": str(work / f"{arm}-{index}"), "sync": not args.no_sync,
              "overrides": overrides_for(args) + ARMS[arm] if ARMS[arm] is not None else []} for arm in arms]
    spec = {"arms": specs, "result": str(work / f"{tag}.json")}
    spec_path = work / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], capture_output=True, text=True,
                          timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{tag} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    results = json.loads(Path(spec["result"]).read_text())
    for result in results.values():
        result["process_s"] = time.perf_counter() - started
        result["timed"] = result["steps"][args.warmup:]
    return results


def summarise(runs: list[dict]) -> dict:
    """Medians over runs of each run's median step (and of each part); tokens/s over all timed steps."""
    per_run = []
    for r in runs:
        timed = r["timed"]
        per_run.append({
            "wall": statistics.median(s["wall"] for s in timed),
            **{p: statistics.median(s.get(p, 0.0) for s in timed) for p in PARTS},
            "mean_wall": statistics.mean(s["wall"] for s in timed),
            "tokens_per_s": sum(s["tokens"] for s in timed) / sum(s["wall"] for s in timed),
            "peak_gib": r["peak_gib"]})
    return {k: statistics.median(run[k] for run in per_run) for k in per_run[0]} | {"runs": len(runs)}


def paired_ratio(arm_runs: list[dict], ref_runs: list[dict]) -> float:
    """Median over steps of arm step / reference step, step k of one process against step k of the same
    process (interleaved: adjacent in time, so under the same load)."""
    return statistics.median(a["wall"] / r["wall"] for ar, rr in zip(arm_runs, ref_runs)
                             for a, r in zip(ar["timed"], rr["timed"]))


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "cpu": cpu,
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def git_commit() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--", "src", "benchmarks/step_time.py"))}


def table(summary: dict, reference: str) -> str:
    ref = summary.get(reference)
    head = ("| arm | runs | median step s | vs " + reference + " | paired | tokens/s | "
            + " | ".join(PARTS) + " | peak GiB |")
    lines = [head, "|" + "---|" * (7 + len(PARTS))]
    for arm, s in summary.items():
        ratio = f"{s['wall'] / ref['wall']:.3f}" if ref else "-"
        lines.append(f"| {arm} | {s['runs']} | {s['wall']:.3f} | {ratio} | {s['paired_ratio']:.3f} | {s['tokens_per_s']:.0f} | "
                     + " | ".join(f"{s[p]:.3f}" for p in PARTS) + f" | {s['peak_gib']:.2f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", default="lean,tuneforge,tuneforge_fused", help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--repeats", type=int, default=3, help="runs per arm, alternated")
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--model", default="embedded", help="embedded (SmolLM2-135M-Instruct) or a model directory")
    p.add_argument("--quant", choices=("nf4", "none"), default="nf4", help="nf4: QLoRA NF4 + double quant")
    p.add_argument("--set", action="append", default=[], help="an extra tuneforge override for every arm's job")
    p.add_argument("--mode", choices=("interleaved", "separate"), default="interleaved",
                   help="interleaved: every repeat is one process training all arms in turns, one step each "
                        "(the same load for all; peak memory is the process's); separate: one process per arm")
    p.add_argument("--no-sync", action="store_true", help="on CUDA, do not synchronise at part boundaries")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--work", default=None, help="working directory (default: a fresh temporary one)")
    p.add_argument("--out", default=None)
    p.add_argument("--from-work", action="store_true",
                   help="write the table and record from the results already in --work (an interrupted run)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="step_time-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    runs: dict[str, list] = {a: [] for a in arms}
    loads = []
    if args.from_work:
        common = {"settings": None}
        for path in sorted(work.glob("*-[0-9]*.json")):
            if path.name.endswith(".spec.json"):
                continue
            common["settings"] = json.loads(path.with_name(path.name[:-5] + ".spec.json").read_text())["arms"][0]["settings"]
            for arm, r in json.loads(path.read_text()).items():
                r["timed"] = r["steps"][args.warmup:]
                runs[arm].append(r)
        runs = {a: rs for a, rs in runs.items() if rs}
    for i in range(0 if args.from_work else args.repeats):
        if i == 0:
            common = prepare(args, work)
        order = arms[i % len(arms):] + arms[:i % len(arms)]  # rotate which arm goes first
        groups = [order] if args.mode == "interleaved" else [[arm] for arm in order]
        for group in groups:
            for arm, r in run_process(group, common, args, work, i).items():
                runs[arm].append(r)
                loads.append(os.getloadavg()[0])
                print(f"repeat {i} {arm}: median step {statistics.median(s['wall'] for s in r['timed']):.3f} s, "
                      f"load {loads[-1]:.2f}", flush=True)
    summary = {arm: summarise(rs) for arm, rs in runs.items()}
    reference = "lean" if "lean" in summary else arms[0]
    for arm in summary:
        summary[arm]["paired_ratio"] = paired_ratio(runs[arm], runs[reference])
    print(table(summary, reference))
    record = {
        "command": "python " + " ".join(sys.argv), "versions": versions(), "machine": machine(), **git_commit(),
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "loadavg_after_each_run": loads,
        "mode": args.mode, "job": common["settings"], "reference": reference,
        "ratios": {arm: s["wall"] / summary[reference]["wall"] for arm, s in summary.items()},
        "paired_ratios": {arm: s["paired_ratio"] for arm, s in summary.items()},
        "summary": summary, "runs": runs,
    }
    import torch

    tag = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out) if args.out else RESULTS / f"step_time-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
