"""Shared fixtures. The embedded model is converted once per machine into the user cache (the same
cache `make demo` uses), so only the first run on a fresh machine pays the ~40 s conversion."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuneforge.runs.console import LIBRARY_WARNINGS, silence_library_noise

REPO = Path(__file__).resolve().parent.parent

# `make test` runs two pytest-xdist workers on the 2-core machines: one compute thread each (set before torch is
# imported; the processes tests start inherit it). Two workers with two OpenMP threads each oversubscribe the
# cores, and OpenMP's spin-waiting then costs more than the second thread gives. Set OMP_NUM_THREADS to override.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    """The same narrow library-noise filters as every command, so test reports show only what matters: the
    warning filters as pytest's own (it resets Python's around every test and fixture)."""
    for category, message in LIBRARY_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")
    silence_library_noise()


# torch's compile loggers (dynamo/inductor, and the `torch.__trace` structured log) emit thousands of DEBUG
# records per compiled graph; pytest would capture them all into a failing test's report.
for _name in ("torch", "torch.__trace", "torch._dynamo", "torch._inductor"):
    logging.getLogger(_name).setLevel(logging.WARNING)

SHARED_DATA = REPO.parent / "shared" / "data"


def shared(path: str) -> Path:
    """A file under ../shared/data, or skip: a user's clone has no shared/ directory."""
    p = SHARED_DATA / path
    if not p.exists():
        pytest.skip(f"{p} is absent (shared test data lives beside the checkout)")
    return p


@pytest.fixture(scope="session")
def smollm_dir() -> str:
    from tuneforge.models.embedded import resolve

    return str(resolve("embedded:smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_dir):
    from tuneforge.config.schemas import TokenizerConfig
    from tuneforge.models.tokenizer import load_tokenizer

    tokenizer, _ = load_tokenizer(smollm_dir, TokenizerConfig())
    return tokenizer


@pytest.fixture(scope="session")
def smollm_fp32(smollm_dir):
    """The embedded model unquantized in fp32, in eval mode (shared: tests must not train it)."""
    from tuneforge.config.schemas import ModelConfig, QuantConfig
    from tuneforge.models.loading import load_model

    model = load_model(smollm_dir, ModelConfig(dtype="float32"), QuantConfig(load_in_4bit=False))
    return model.eval()


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 900, input: str | None = None,
            env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `tuneforge` console script in a fresh process (`input`: its standard input)."""
    exe = Path(sys.executable).with_name("tuneforge")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run([str(exe), *args], cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=env,
                          input=input)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, smollm_dir) -> str:
    """A random 2-layer, width-64 model with the embedded model's config and real tokenizer: for tests of the
    run machinery, where each step costs milliseconds instead of seconds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny") / "model"
    config = AutoConfig.from_pretrained(smollm_dir)
    config.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 16})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(smollm_dir).save_pretrained(out)
    return str(out)


def logged_losses(run_dir: Path) -> dict[int, float]:
    """{step: training loss} of every logged step in a finished run's metrics.json."""
    import json

    history = json.loads((Path(run_dir) / "metrics.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def cli_in_process(*args: str, cwd: Path | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """`tuneforge ARGS` through the same entry point as the console script (tuneforge.cli.main), in this process:
    a fresh process costs about 6 s of imports, and the fresh-process start, a reload in a new process and the
    kill/signal paths have their own run_cli tests. `input`: its standard input. Returns what run_cli returns."""
    import contextlib
    import io

    from tuneforge.cli import main

    out, err = io.StringIO(), io.StringIO()
    previous, stdin = Path.cwd(), sys.stdin
    # absl's log handler (rouge-score imports absl) keeps the sys.stderr of its import, and closes it when Hydra
    # reconfigures logging unless it is the sys.stderr of that moment: under pytest that is pytest's own capture
    # file, closed here by the redirect below. The real stderr is never closed.
    if "absl.logging" in sys.modules:
        sys.modules["absl.logging"].get_absl_handler().python_handler.stream = sys.__stderr__
    os.chdir(cwd or REPO)
    sys.stdin = io.StringIO(input or "")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # Hydra and the commands' own error paths exit
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(previous)
        sys.stdin = stdin
    return subprocess.CompletedProcess(["tuneforge", *args], code, out.getvalue(), err.getvalue())
