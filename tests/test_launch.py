"""Launchers: the Accelerate config and command for every launcher, the launcher rules, the dry run, and a
real 2-process data-parallel run on the CPU (gloo)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import cli_in_process
from tuneforge.config.compose import compose_config, load_config
from tuneforge.config.errors import ConfigError
from tuneforge.runs.launch import accelerate_config, launch_command

LAUNCHERS = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launch_command_and_accelerate_config(name, tmp_path):
    cfg = load_config([f"launcher={name}", "launcher.num_processes=8", "dry_run=true"])
    config = accelerate_config(cfg, cuda=True)
    assert config["num_processes"] == 8 and config["num_machines"] == 1
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}
    assert config["distributed_type"] == expected[name]
    if name == "fsdp":
        fsdp = config["fsdp_config"]
        assert fsdp["fsdp_cpu_ram_efficient_loading"] and fsdp["fsdp_sync_module_states"]
        assert fsdp["fsdp_use_orig_params"]
        assert cfg.quant.bnb_4bit_quant_storage == "bfloat16"  # matches the (auto = bf16) compute dtype
    if name.startswith("deepspeed"):
        ds = config["deepspeed_config"]
        assert ds["zero_stage"] == (3 if name.endswith("3") else 2)
        assert ds["gradient_accumulation_steps"] == cfg.train.gradient_accumulation_steps
        if name.endswith("3"):
            assert ds["zero3_init_flag"] is True and cfg.quant.bnb_4bit_quant_storage == "bfloat16"
    yaml.safe_dump(config)  # a valid accelerate config file

    run_dir = tmp_path / "run"
    overrides = [f"launcher={name}", "launcher.num_processes=8", "train.max_steps=3", "dry_run=true",
                 "hydra.run.dir=elsewhere"]
    cmd = launch_command(cfg, overrides, run_dir, run_dir / "accelerate_config.yaml")
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(run_dir / "accelerate_config.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "8"
    tail = cmd[cmd.index("-m", 3):]
    # The same overrides, one run directory for every rank, and no dry_run / earlier run dir.
    assert tail == ["-m", "tuneforge.cli", "train", f"launcher={name}", "launcher.num_processes=8",
                    "train.max_steps=3", f"hydra.run.dir={run_dir}"]


def test_multi_node_settings_pass_through(tmp_path):
    cfg = load_config(["launcher=ddp", "launcher.num_processes=16", "launcher.num_machines=2",
                       "launcher.machine_rank=1", "launcher.main_process_ip=10.0.0.1",
                       "launcher.main_process_port=29555"])
    config = accelerate_config(cfg, cuda=True)
    assert (config["num_machines"], config["machine_rank"], config["main_process_ip"],
            config["main_process_port"]) == (2, 1, "10.0.0.1", 29555)
    cmd = launch_command(cfg, [], tmp_path, tmp_path / "a.yaml")
    for flag, value in (("--num_machines", "2"), ("--machine_rank", "1"), ("--main_process_ip", "10.0.0.1"),
                        ("--main_process_port", "29555"), ("--num_processes", "16")):
        assert cmd[cmd.index(flag) + 1] == value


def test_multi_node_needs_the_main_address_except_on_slurm(monkeypatch):
    from tuneforge.runs.launch import resolve_machines

    cfg = load_config(["launcher=ddp", "launcher.num_processes=4", "launcher.num_machines=2"])  # composes
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(ConfigError, match="needs launcher.main_process_ip"):
        resolve_machines(cfg.launcher)
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_NODEID", "1")
    la = resolve_machines(load_config(["launcher=ddp", "launcher.num_processes=4", "launcher.num_machines=2",
                                       "launcher.main_process_ip=node-a"]).launcher)
    assert (la.machine_rank, la.main_process_ip) == (1, "node-a")


def test_cpu_ddp_config_uses_gloo_processes():
    cfg = load_config(["launcher=ddp"])
    config = accelerate_config(cfg, cuda=False)
    # torch.distributed.run starts the processes; ACCELERATE_USE_CPU makes them MULTI_CPU/gloo.
    assert config["distributed_type"] == "MULTI_GPU" and config["mixed_precision"] == "no"


@pytest.mark.parametrize("overrides, message", [
    (["launcher.num_processes=2"], "launcher=local runs one process"),
    (["launcher=ddp", "launcher.num_processes=0"], "launcher.num_processes=0 must be >= 1"),
    (["launcher=ddp", "launcher.num_processes=3", "launcher.num_machines=2", "launcher.main_process_ip=h"],
     "multiple of launcher.num_machines"),
    (["launcher=ddp", "launcher.num_processes=4", "launcher.num_machines=2", "launcher.main_process_ip=h",
      "launcher.machine_rank=2"], "launcher.machine_rank=2 must be in"),
    (["launcher=fsdp", "quant.bnb_4bit_quant_storage=null", "dry_run=true"], "quant.bnb_4bit_quant_storage=bfloat16"),
    (["launcher=deepspeed_zero3", "launcher.zero3_init_flag=false", "dry_run=true"], "zero3_init_flag=true"),
    (["launcher=ddpp"], "Did you mean 'ddp'"),
])
def test_launcher_rules(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(overrides)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only error")
@pytest.mark.parametrize("name", ["fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_sharding_launchers_need_cuda_except_dry_run(name):
    """One line each: DeepSpeed not installed (it is not, on the CI machines), else no accelerator; the dry run
    composes and prints everything either way."""
    import importlib.util

    missing_ds = name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None
    with pytest.raises(ConfigError, match=(r"needs DeepSpeed, which is not installed: pip install 'tuneforge\[deepspeed\]'"
                                           if missing_ds else "has none .Accelerate runs FSDP and DeepSpeed only on")):
        load_config([f"launcher={name}"])
    load_config([f"launcher={name}", "dry_run=true"])


FSDP_PROBE = """
import json, os
import torch
from accelerate import Accelerator

acc = Accelerator()  # as transformers' Trainer builds it in a launched rank
model = acc.prepare(torch.nn.Linear(4, 4))
# One file per rank: two ranks printing to one pipe can interleave their lines.
with open(f"rank{acc.process_index}.json", "w") as f:
    json.dump({"rank": acc.process_index, "distributed_type": str(acc.distributed_type).split(".")[-1],
               "wrapped_as": type(model).__name__, "fsdp_env": os.environ.get("ACCELERATE_USE_FSDP"),
               "sharding": os.environ.get("FSDP_SHARDING_STRATEGY")}, f)
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="shows what a CPU-only machine does")
def test_fsdp_on_cpus_is_refused_because_accelerate_would_run_ddp(tmp_path):
    """Why launcher=fsdp is refused on a CPU: Accelerate's launcher takes tuneforge's FSDP config (every rank gets
    the FSDP settings), but Accelerate enables FSDP only for accelerator processes: on CPUs each rank is plain gloo
    DDP (MULTI_CPU) and the sharding settings are ignored. (torch's own FSDP2 does run on gloo; Accelerate, and so
    the Trainer, does not use it there. With the preset's fsdp_cpu_ram_efficient_loading=true, Accelerate stops
    instead: "FSDP parameter initialization with `sync_module_states=True` is not supported on cpu".)"""
    from tuneforge.runs.launch import launch_env

    cfg = load_config(["launcher=fsdp", "quant=none", "launcher.fsdp_cpu_ram_efficient_loading=false", "dry_run=true"])
    config_file = tmp_path / "accelerate_config.yaml"
    config_file.write_text(yaml.safe_dump(accelerate_config(cfg, cuda=False)))
    (tmp_path / "probe.py").write_text(FSDP_PROBE)
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
                             "--num_processes", "2", "--main_process_port", str(free_port()), str(tmp_path / "probe.py")],
                            env=launch_env(cuda=False), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["fsdp_env"] == "true" and r["sharding"] in ("FULL_SHARD", "1")  # the config reached the rank ...
        assert (r["distributed_type"], r["wrapped_as"]) == ("MULTI_CPU", "DistributedDataParallel")  # ... unused
    with pytest.raises(ConfigError, match="on CPUs its processes would silently be plain DDP"):
        load_config(["launcher=fsdp", "quant=none"])


def test_full_fine_tune_on_a_4bit_free_fsdp_needs_no_storage_rule():
    cfg = load_config(["launcher=fsdp", "quant=none", "peft=none", "dry_run=true"])
    assert cfg.launcher.name == "fsdp"


def test_slurm_preset_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_config(["hydra/launcher=slurm", "launcher=ddp"], return_hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 1 and launcher.gpus_per_node == 8


def test_dry_run_prints_launch_command_and_plan(tmp_path):
    run_dir = tmp_path / "dry"
    result = cli_in_process("train", "launcher=ddp", "launcher.num_processes=4", "dry_run=true", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "launch command:" in out and "accelerate.commands.launch" in out and "--num_processes 4" in out
    assert f"hydra.run.dir={run_dir}" in out and "distributed_type: MULTI_GPU" in out
    assert "effective_batch_size: 32" in out  # 8 per device x 4 processes
    assert "GPU memory estimate:" in out
    assert not (run_dir / "accelerate_config.yaml").exists() and not (run_dir / "config.yaml").exists()


DDP_ARGS = ("launcher=ddp", "launcher.num_processes=2", "launcher.record_ranks=true", "train.max_steps=3",
            "train.learning_rate=3e-3", "train.per_device_train_batch_size=4", "train.logging_steps=1",
            "data.max_samples=48", "eval.before_after=false", "eval.sample_every_steps=0")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model) -> tuple[Path, float]:
    """launcher=ddp with 2 gloo processes (a small random model: the launch is under test, not learning)."""
    outputs = tmp_path_factory.mktemp("ddp") / "outputs"
    start = time.perf_counter()
    # The launching command in this process; the ranks are the fresh processes that `accelerate launch` starts.
    result = cli_in_process("train", *DDP_ARGS, f"launcher.main_process_port={free_port()}",
                            f"model.name_or_path={tiny_model}", f"hydra.run.dir={outputs}/run")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return outputs, time.perf_counter() - start


@pytest.mark.slow
def test_two_process_cpu_ddp_run(ddp_run):
    """Different data shards, identical LoRA weights, one run directory."""
    outputs, wall = ddp_run
    assert [p.name for p in outputs.iterdir()] == ["run"]  # exactly one run directory
    run_dir = outputs / "run"
    ranks = json.loads((run_dir / "ranks.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    r0, r1 = ranks
    assert r0["first_batch_digest"] != r1["first_batch_digest"]  # different shards
    assert not set(r0["batch_digests"][:3]) & set(r1["batch_digests"][:3])
    assert r0["trainable_weight_digest"] == r1["trainable_weight_digest"]  # same weights after training
    assert r0["trainable_weight_digest"] != r0["initial_weight_digest"]  # ... and they were trained
    assert len(r0["steps"]) == len(r1["steps"]) == 3
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train_steps"] == 3
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["status"] == "finished"
    for name in ("config.yaml", "accelerate_config.yaml", "adapter/adapter_model.safetensors", "train.log"):
        assert (run_dir / name).is_file(), name
    print(json.dumps({"wall_s": round(wall, 1), "losses": {r["rank"]: [s["losses"] for s in r["steps"]]
                                                           for r in ranks},
                      "weights": [r["trainable_weight_digest"] for r in ranks]}))


@pytest.mark.slow
def test_two_nodes_on_localhost_equal_the_ddp_run(ddp_run, tiny_model, tmp_path):
    """Multi-node, simulated: the command a user runs on each of two machines (machine rank, main address and port,
    one shared run directory), started as two one-process "nodes" on localhost. Both join (global ranks 0 and 1,
    each local rank 0), and the run equals the 2-process DDP run: the same shards, per-rank losses and weights."""
    run_dir = tmp_path / "run"
    node = [*DDP_ARGS, "launcher.num_machines=2", "launcher.main_process_ip=127.0.0.1",
            f"launcher.main_process_port={free_port()}", f"model.name_or_path={tiny_model}", f"hydra.run.dir={run_dir}"]
    # Machine 1 in a fresh process; machine 0 in this one (a tuneforge start costs seconds of imports).
    other = subprocess.Popen([str(Path(sys.executable).with_name("tuneforge")), "train", *node,
                              "launcher.machine_rank=1"], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    main = cli_in_process("train", *node, "launcher.machine_rank=0", cwd=tmp_path)
    other_out = other.communicate(timeout=600)[0]
    assert (main.returncode, other.returncode) == (0, 0), (main.stdout + main.stderr)[-3000:] + other_out[-3000:]
    ranks = json.loads((run_dir / "ranks.json").read_text())
    assert [(r["rank"], r["local_rank"], r["world_size"]) for r in ranks] == [(0, 0, 2), (1, 0, 2)]
    assert (run_dir / "accelerate_config.yaml").is_file() and (run_dir / "accelerate_config.machine1.yaml").is_file()
    ddp = json.loads((ddp_run[0] / "run" / "ranks.json").read_text())
    for key in ("first_batch_digest", "batch_digests", "trainable_weight_digest"):
        assert [r[key] for r in ranks] == [r[key] for r in ddp], key
    # Per-rank micro-batch losses: equal to 1e-6 relative (identical on the CPUs measured).
    for nodes_rank, ddp_rank in zip(ranks, ddp):
        got = [x for s in nodes_rank["steps"] for x in s["losses"]]
        want = [x for s in ddp_rank["steps"] for x in s["losses"]]
        assert got == pytest.approx(want, rel=1e-6)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train_steps"] == 3


def test_sharded_qlora_skips_the_fp32_upcast(monkeypatch):
    """Under FSDP / ZeRO-3 the base keeps its (bf16) storage dtype: no prepare_model_for_kbit_training."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.config.schemas import PeftConfig, QuantConfig, TrainConfig
    from tuneforge.models import adapters, loading

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert loading.sharded_training()
    if torch.cuda.is_available():
        assert loading.device_map_for(None) is None
    monkeypatch.setattr(adapters, "prepare_model_for_kbit_training",
                        lambda *a, **k: pytest.fail("upcast under sharding"))
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    model = adapters.prepare_base(model.to(torch.bfloat16), QuantConfig())
    model = adapters.add_lora(adapters.enable_checkpointing(model, TrainConfig()), PeftConfig(r=4, lora_alpha=8))
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not loading.sharded_training()
    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        assert loading.device_map_for(None) == {"": 1}


def test_slurm_multi_node_sbatch_script_in_a_dry_run(tmp_path):
    """`-m hydra/launcher=slurm ... dry_run=true` prints the sbatch script submitit would submit for each job (one task
    per node, the nodes and GPUs asked for) and submits nothing; a node count that disagrees is one line."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    args = ["train", "-m", "hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.partition=gpu",
            "launcher=ddp", "launcher.num_machines=2", "launcher.num_processes=16", "train.learning_rate=1e-4,2e-4",
            f"hydra.sweep.dir={sweep}"]
    result = cli_in_process(*args, "dry_run=true")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=720", "#SBATCH --cpus-per-task=32"):
        assert line in out, line
    assert "srun --unbuffered" in out and "-m submitit.core._submit" in out and f"{sweep}/.submitit/" in out
    assert "launcher.machine_rank = $SLURM_NODEID" in out and "launcher.num_processes=16" in out
    assert not sweep.exists()  # nothing submitted, nothing written
    bad = cli_in_process(*[a.replace("launcher.num_machines=2", "launcher.num_machines=4") for a in args],
                         "dry_run=true")
    assert bad.returncode == 2 and "hydra.launcher.nodes=2 but launcher.num_machines=4" in bad.stderr


@pytest.mark.slow
def test_submitit_jobs_run_and_a_failed_one_is_reported(tiny_model, tmp_path):
    """Hydra's submitit launcher with submitit's local executor (what runs on Slurm, on this machine): each job is
    a submitit job in its own process; results come back to the sweep, and `report` lists the failed job."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from tuneforge.commands import report

    sweep = tmp_path / "sweep"
    result = cli_in_process("train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                            f"model.name_or_path={tiny_model},{tmp_path / 'no-such-model'}", "quant=none",
                            "train.max_steps=2", "train.per_device_train_batch_size=2", "train.logging_steps=1",
                            "data.max_samples=16", "eval.before_after=false", "eval.sample_every_steps=0",
                            f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert len(list((sweep / ".submitit").iterdir())) >= 2  # submitit's own job folders: they ran through it
    rows = {row[1]: row for row in report.report(sweep)["rows"]}
    assert rows["0"][2] == "ok" and json.loads((sweep / "0" / "metrics.json").read_text())["train_steps"] == 2
    assert rows["1"][2] == "failed" and "no-such-model" in rows["1"][-1]


def test_deepspeed_presets_and_a_users_json_in_a_dry_run(tmp_path):
    """ZeRO-2/3 presets and the user's own DeepSpeed JSON compose and print their Accelerate config without DeepSpeed
    or a GPU; a JSON whose ZeRO stage is not the launcher's is one line."""
    ds = tmp_path / "ds_zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
                              "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}))
    for stage in (2, 3):
        config = accelerate_config(load_config([f"launcher=deepspeed_zero{stage}", "dry_run=true"]), cuda=False)
        assert config["distributed_type"] == "DEEPSPEED" and config["deepspeed_config"]["zero_stage"] == stage
    result = cli_in_process("train", "launcher=deepspeed_zero3", f"launcher.deepspeed_config={ds}", "dry_run=true",
                            f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "distributed_type: DEEPSPEED" in result.stdout and f"deepspeed_config_file: {ds}" in result.stdout
    assert "zero_stage" not in result.stdout  # the user's JSON replaces the generated ZeRO settings
    wrong = cli_in_process("train", "launcher=deepspeed_zero2", f"launcher.deepspeed_config={ds}", "dry_run=true")
    assert wrong.returncode == 2 and "has zero_optimization.stage=3; launcher=deepspeed_zero2 is stage 2" in wrong.stderr
