"""`auto` settings: the measured fast path on CUDA (bfd packing, Liger kernels), the plain one on CPU."""

from __future__ import annotations

import dataclasses

import pytest

from tuneforge.config import device
from tuneforge.config.compose import compose_config, load_config
from tuneforge.config.errors import ConfigError
from tuneforge.config.library_args import trainer_arguments
from tuneforge.config.schemas import TrainConfig, TuneforgeConfig


def sft_config(train: TrainConfig, run_dir):
    return trainer_arguments(TuneforgeConfig(train=train), run_dir)


def test_shipped_default_is_auto_and_resolves_to_no_packing_on_this_cpu():
    assert compose_config([]).packing.mode == "auto"
    cfg = load_config([])
    assert cfg.packing.mode == "none" and cfg.train.use_liger_kernel is False


def test_cuda_gets_bfd_packing_and_liger_when_installed(monkeypatch):
    monkeypatch.setattr(device, "liger_installed", lambda: True)
    raw = dataclasses.replace(load_config([]), packing=dataclasses.replace(load_config([]).packing, mode="auto"))
    raw = dataclasses.replace(raw, train=dataclasses.replace(raw.train, use_liger_kernel=None))
    cuda = device.resolve(raw, cuda=True)
    assert cuda.packing.mode == "bfd" and cuda.train.use_liger_kernel is True
    cpu = device.resolve(raw, cuda=False)
    assert cpu.packing.mode == "none" and cpu.train.use_liger_kernel is False
    # Without the package, auto stays off even on CUDA (nothing to import).
    monkeypatch.setattr(device, "liger_installed", lambda: False)
    assert device.resolve(raw, cuda=True).train.use_liger_kernel is False


@pytest.mark.parametrize("overrides", [["recipe=classify-demo"], ["collator=padding", "task=classification"]])
def test_auto_never_packs_where_packing_is_not_allowed(overrides):
    cfg = load_config(overrides)
    raw = dataclasses.replace(cfg, packing=dataclasses.replace(cfg.packing, mode="auto"))
    assert device.resolve(raw, cuda=True).packing.mode == "none"


def test_explicit_choices_are_kept_on_any_device():
    cfg = load_config(["packing=bfd", "train.use_liger_kernel=false"])
    assert device.resolve(cfg, cuda=True).packing.mode == "bfd"
    assert device.resolve(cfg, cuda=True).train.use_liger_kernel is False
    assert load_config(["packing=none"]).packing.mode == "none"


def test_liger_asked_for_but_not_installed_is_a_config_error():
    with pytest.raises(ConfigError, match="train.use_liger_kernel=true needs the liger-kernel package"):
        load_config(["train.use_liger_kernel=true"])


def test_sft_config_carries_the_compile_choice(tmp_path):
    """train.torch_compile reaches SFTConfig before its __post_init__, which picks the backend the Trainer
    compiles with (setting the attribute afterwards would compile nothing)."""
    args = sft_config(TrainConfig(torch_compile=True), tmp_path)
    assert args.torch_compile and args.torch_compile_backend == "inductor"
    assert not sft_config(TrainConfig(), tmp_path).torch_compile_backend


def test_sft_config_carries_the_liger_choice(tmp_path):
    assert sft_config(TrainConfig(use_liger_kernel=False), tmp_path).use_liger_kernel is False


def test_fused_lm_head_is_decided_by_the_device():
    """train.fused_lm_head=null: TRL's fused head (no full logits: GPU memory) on CUDA, the model's own head on a
    CPU, where the fused one made the step slower (config/device.py)."""
    cfg = load_config([])
    raw = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fused_lm_head=None))
    assert device.resolve(raw, cuda=True).train.fused_lm_head is True
    assert device.resolve(raw, cuda=False).train.fused_lm_head is False
    assert cfg.train.fused_lm_head is False  # this machine: no CUDA
    explicit = load_config(["train.fused_lm_head=true"])
    assert device.resolve(explicit, cuda=False).train.fused_lm_head is True
    assert device.resolve(load_config(["train.fused_lm_head=false"]), cuda=True).train.fused_lm_head is False


def test_token_metrics_are_off_unless_asked():
    assert load_config([]).train.token_metrics is False
    assert load_config(["train.token_metrics=true"]).train.token_metrics is True
