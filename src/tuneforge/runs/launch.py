"""Multi-process training: `tuneforge train launcher=ddp|fsdp|deepspeed_zero2|deepspeed_zero3`.

The Hydra job that the user started (one per multirun job, also under the Slurm launcher) does not train
itself: it writes an Accelerate config into its run directory and re-runs the same command through
`accelerate launch`, with the run directory it already resolved (`hydra.run.dir=...`), so every rank
composes the same overrides into the same config and shares one run directory. Inside the launched
processes (LOCAL_RANK set) the job trains; only the main process writes the run directory.

Accelerate does the process start-up (torch.distributed.run, rendezvous, device placement); this module
only turns `launcher.*` into an Accelerate config and a command line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tuneforge.config.device import cuda_available, resolved_bf16
from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import LauncherConfig, TuneforgeConfig
from tuneforge.config.validation import launcher_file

log = logging.getLogger(__name__)

LAUNCHED_ENV = "TUNEFORGE_LAUNCHED"
ACCELERATE_CONFIG_FILE = "accelerate_config.yaml"
RANKS_FILE = "ranks.json"


def in_launched_process() -> bool:
    """True inside a process started by accelerate/torchrun (or by tuneforge's own launch)."""
    return "LOCAL_RANK" in os.environ or LAUNCHED_ENV in os.environ


def needs_launch(cfg: TuneforgeConfig) -> bool:
    return cfg.launcher.name != "local" and not in_launched_process()


def rank_args(args: list[str]) -> list[str]:
    """Hydra settings for a launched rank: the launching job already wrote `.hydra/`; ranks other than the
    main one log to the terminal (warnings and errors only) instead of the run directory's train.log."""
    if LAUNCHED_ENV not in os.environ:
        return args
    extra = ["hydra.output_subdir=null"]
    if os.environ.get("RANK", "0") != "0":
        extra += ["hydra/job_logging=stdout", "hydra.job_logging.root.level=WARNING"]
    return extra + args


def resolve_machines(la: LauncherConfig) -> LauncherConfig:
    """Multi-node settings for this machine: on a Slurm job (hydra/launcher=slurm, one task per node) this
    node's rank and the first node's address unless set explicitly; elsewhere main_process_ip is required."""
    if la.num_machines <= 1:
        return la
    if "SLURM_JOB_ID" not in os.environ:
        if not la.main_process_ip:
            raise ConfigError(f"launcher.num_machines={la.num_machines} needs launcher.main_process_ip (the address "
                              "of the machine with launcher.machine_rank=0).")
        return la
    from dataclasses import replace

    rank = int(os.environ.get("SLURM_NODEID", la.machine_rank))
    ip = la.main_process_ip
    if not ip:
        try:
            import submitit

            ip = submitit.JobEnvironment().hostnames[0]
        except Exception as exc:  # not started by submitit, or no hostnames
            raise ConfigError("launcher.num_machines > 1 on Slurm: set launcher.main_process_ip (could not read "
                              f"the job's first node: {exc}).") from None
    return replace(la, machine_rank=rank, main_process_ip=ip)


def mixed_precision(cfg: TuneforgeConfig, cuda: bool) -> str:
    """What `train.bf16` resolves to (config/device.resolved_bf16), as Accelerate names it."""
    return "bf16" if resolved_bf16(cfg.train) else "no"


def accelerate_config(cfg: TuneforgeConfig, cuda: bool) -> dict[str, Any]:
    """The Accelerate config file (`accelerate config` keys) for `launcher.*` on this machine."""
    la = cfg.launcher
    # On a CPU, DDP runs gloo processes: Accelerate starts them with torch.distributed.run only in its
    # multi-GPU mode; ACCELERATE_USE_CPU (see launch_env) makes each process pick MULTI_CPU/gloo.
    distributed = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED",
                   "deepspeed_zero3": "DEEPSPEED"}[la.name]
    out: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": distributed,
        "num_processes": la.num_processes,
        "num_machines": la.num_machines,
        "machine_rank": la.machine_rank,
        "main_process_port": la.main_process_port,
        "mixed_precision": mixed_precision(cfg, cuda),
        "gpu_ids": la.gpu_ids,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
        "downcast_bf16": "no",
        "main_training_function": "main",
    }
    if la.main_process_ip:
        out["main_process_ip"] = la.main_process_ip
    if la.name == "fsdp":
        out["fsdp_config"] = {
            "fsdp_version": 1,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_backward_prefetch": "BACKWARD_PRE",
            "fsdp_forward_prefetch": False,
            "fsdp_sharding_strategy": la.fsdp_sharding_strategy,
            "fsdp_offload_params": la.fsdp_offload_params,
            "fsdp_cpu_ram_efficient_loading": la.fsdp_cpu_ram_efficient_loading,
            # cpu_ram_efficient_loading loads on rank 0 only: the others receive the weights from it.
            "fsdp_sync_module_states": True if la.fsdp_cpu_ram_efficient_loading else False,
            "fsdp_use_orig_params": la.fsdp_use_orig_params,
            "fsdp_state_dict_type": la.fsdp_state_dict_type,
            "fsdp_activation_checkpointing": False,  # PEFT/kbit preparation checkpoints (train.gradient_checkpointing)
        }
        if la.fsdp_config:  # the user's FSDP settings win over the generated ones
            out["fsdp_config"].update(launcher_file("fsdp_config", la.fsdp_config))
    elif la.name.startswith("deepspeed"):
        stage = 3 if la.name == "deepspeed_zero3" else 2
        ds = {
            "zero_stage": stage,
            "offload_optimizer_device": la.offload_optimizer_device,
            "offload_param_device": la.offload_param_device if stage == 3 else "none",
            "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
            "gradient_clipping": cfg.train.max_grad_norm,
        }
        if stage == 3:
            ds["zero3_init_flag"] = la.zero3_init_flag
            ds["zero3_save_16bit_model"] = True
        if la.deepspeed_config:  # the user's DeepSpeed JSON replaces the generated ZeRO settings (Accelerate
            # refuses both); zero3_init_flag still says how a ZeRO-3 model is built.
            ds = {"deepspeed_config_file": str(Path(la.deepspeed_config).expanduser().resolve())}
            if stage == 3:
                ds["zero3_init_flag"] = la.zero3_init_flag
        out["deepspeed_config"] = ds
    return out


def config_file_name(machine_rank: int) -> str:
    """Each machine of a multi-node run writes its own Accelerate config into the shared run directory."""
    return ACCELERATE_CONFIG_FILE if machine_rank == 0 else f"accelerate_config.machine{machine_rank}.yaml"


def launch_env(cuda: bool) -> dict[str, str]:
    env = {**os.environ, LAUNCHED_ENV: "1"}
    if not cuda:
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def launch_command(cfg: TuneforgeConfig, overrides: list[str], run_dir: Path, config_file: Path) -> list[str]:
    """`python -m accelerate.commands.launch ... -m tuneforge.cli train OVERRIDES hydra.run.dir=RUN`.

    The machine settings go on the command line too (they override the file), so a user's own
    `launcher.accelerate_config` still gets this node's rank and the process counts."""
    la = cfg.launcher
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
           "--num_processes", str(la.num_processes), "--num_machines", str(la.num_machines),
           "--machine_rank", str(la.machine_rank), "--main_process_port", str(la.main_process_port)]
    if la.main_process_ip:
        cmd += ["--main_process_ip", la.main_process_ip]
    kept = [o for o in overrides if not o.startswith(("hydra.run.dir=", "dry_run="))]
    return cmd + ["-m", "tuneforge.cli", "train", *kept, f"hydra.run.dir={run_dir}"]


def launch(cfg: TuneforgeConfig, run_dir: Path, overrides: list[str]) -> int:
    """Write the Accelerate config into the run directory and run the job through `accelerate launch`
    (dry_run: print the command and the config instead). Returns the launcher's exit status."""
    cuda = cuda_available()
    cfg.launcher = resolve_machines(cfg.launcher)
    config = accelerate_config(cfg, cuda)
    config_file = Path(cfg.launcher.accelerate_config) if cfg.launcher.accelerate_config else (
        run_dir / config_file_name(cfg.launcher.machine_rank))
    cmd = launch_command(cfg, overrides, run_dir, config_file)
    env_note = "" if cuda else "ACCELERATE_USE_CPU=true "
    if cfg.dry_run:
        print(f"{'launch command':>22}: {env_note}{shlex.join(cmd)}")
        if not cfg.launcher.accelerate_config:
            print(f"{'accelerate config':>22}: ({config_file})")
            print("\n".join("    " + line for line in yaml.safe_dump(config, sort_keys=False).splitlines()))
        return 0
    if cfg.launcher.num_machines > 1 and "SLURM_JOB_ID" not in os.environ and not any(
            o.startswith("hydra.run.dir=") for o in _hydra_overrides()):
        log.warning("launcher.num_machines=%d: pass the same hydra.run.dir=DIR (on a shared file system) on every "
                    "machine, or each machine makes its own run directory name.", cfg.launcher.num_machines)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.launcher.accelerate_config:
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    log.info("launching %d processes: %s%s", cfg.launcher.num_processes, env_note, shlex.join(cmd))
    return subprocess.run(cmd, env=launch_env(cuda)).returncode


def slurm_script(launcher: dict[str, Any]) -> str:
    """The sbatch script that Hydra's submitit launcher (`hydra/launcher=slurm`, its settings `launcher`) submits for
    each job, written by submitit's own Slurm executor on any machine: nothing is submitted (a dry run)."""
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf
    from submitit.slurm.slurm import SlurmExecutor

    class DrySlurmExecutor(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:  # submitit refuses a machine without `srun`; a dry run needs none
            return 1

    # The same mapping as hydra_submitit_launcher's launch(): its generic keys (submitit's names: timeout_min,
    # tasks_per_node, ...) through the executor's equivalences, the others as Slurm's own.
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    equivalent = SlurmExecutor._equivalence_dict()  # noqa: SLF001
    params = {equivalent.get(k, k) if k in generic else k: v for k, v in launcher.items()
              if k not in ("_target_", "submitit_folder", "max_num_timeout") and v is not None}
    executor = DrySlurmExecutor(folder=launcher["submitit_folder"])
    executor.update_parameters(**params)
    return executor._make_submission_file_text(executor._submitit_command_str, "DRYRUN")  # noqa: SLF001


def _hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.hydra)


def run_from_hydra(cfg: TuneforgeConfig, run_dir: Path) -> None:
    """The launching Hydra job: start the ranks with this job's own overrides (the main rank writes the run's
    metrics, which lifecycle.job reads back); a failed launch exits with the ranks' status."""
    from hydra.core.hydra_config import HydraConfig

    code = launch(cfg, run_dir, list(HydraConfig.get().overrides.task))
    if code != 0:
        log.error("the launched training failed (exit status %d); see the output above and %s", code, run_dir)
        sys.exit(code)


# ------------------------------------------------------------------------------------------ inside the ranks

def tensor_digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class RankRecorder:
    """Per-rank facts of a multi-process run, gathered by the main process into ranks.json: which data each
    rank saw (digest of its first batch and of every batch), its own micro-batch losses, and a digest of
    its trainable weights after training (data-parallel ranks must end with identical adapters)."""

    def __init__(self):
        from transformers import TrainerCallback

        recorder = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                target = recorder._model if recorder._model is not None else model
                recorder.initial_digest = tensor_digest(p for _, p in sorted(target.named_parameters())
                                                        if p.requires_grad)

            def on_step_end(self, args, state, control, **kwargs):
                recorder.steps.append({"step": state.global_step, "losses": recorder._pending})
                recorder._pending = []

            def on_train_end(self, args, state, control, model=None, **kwargs):
                recorder.finish(args, model)

        self.callback = _Callback()
        self.batch_digests: list[str] = []
        self.steps: list[dict] = []
        self._pending: list[float] = []
        self._model = None
        self.initial_digest: str | None = None

    def wrap_collator(self, collate):
        """Digest of every batch this rank's dataloader builds (input ids)."""

        def wrapped(examples):
            batch = collate(examples)
            self.batch_digests.append(tensor_digest([batch["input_ids"]]))
            return batch

        return wrapped

    def attach(self, model) -> None:
        """This rank's own loss per training micro-batch (the logged loss is the mean over ranks)."""
        self._model = model

        def hook(module, inputs, output):
            loss = getattr(output, "loss", None)
            if module.training and loss is not None:
                self._pending.append(float(loss.detach()))

        model.register_forward_hook(hook)

    def finish(self, args, model) -> None:
        import torch.distributed as dist
        from accelerate.utils import gather_object

        target = self._model if self._model is not None else model
        weights = [p for _, p in sorted(target.named_parameters()) if p.requires_grad]
        record = {
            "rank": args.process_index,
            "local_rank": args.local_process_index,
            "world_size": args.world_size,
            "device": str(args.device),
            "first_batch_digest": self.batch_digests[0] if self.batch_digests else None,
            "batch_digests": self.batch_digests,
            "steps": self.steps,
            "initial_weight_digest": self.initial_digest,
            "trainable_weight_digest": tensor_digest(weights),
            "trainable_parameters": sum(p.numel() for p in weights),
        }
        records = gather_object([record]) if dist.is_available() and dist.is_initialized() else [record]
        if args.should_save:
            from tuneforge.runs.rundir import write_json

            write_json(Path(args.output_dir) / RANKS_FILE, sorted(records, key=lambda r: r["rank"]))


class _SingleProcess:
    is_main_process = True
    num_processes = 1

    def main_process_first(self):
        import contextlib

        return contextlib.nullcontext()


def process_state():
    """Accelerate's PartialState in a multi-process run (initialises the process group: NCCL on GPUs, gloo on
    CPUs), a stand-in with the same three members otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _SingleProcess()
    from accelerate import PartialState

    return PartialState(cpu=not cuda_available())
