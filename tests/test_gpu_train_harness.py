"""The training-speed harness (benchmarks/gpu_train.py) end to end on a CPU, with its few-layer shape: every arm
in a fresh process, the loss gate, the record written after each arm, and the deadline for lent GPUs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = str(REPO / "benchmarks" / "gpu_train.py")


def _run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, "--shapes", "tiny", "--profiles", "short", "--steps", "2",
                           "--warmup", "1", "--max-length", "256", "--num-sequences", "64",
                           "--model-dir", str(tmp_path / "models"), *args],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_arms_pass_the_gate_and_are_recorded(tmp_path):
    out = tmp_path / "bench.json"
    result = _run(tmp_path, "--arms", "a,b,b_lean", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["device"].startswith("CPU") and record["command"].startswith("python")
    arms = {r["arm_name"]: r for r in record["results"]}
    assert list(arms) == ["a", "b", "b_lean"] and not any("error" in r for r in arms.values())
    for name, r in arms.items():
        assert r["timed_steps"] == 2 and r["tokens_per_s"] > 0 and r["median_step_s"] > 0
        # The same fixed sequences give the same loss in every layout (fp32 on a CPU: 1e-3 is generous).
        assert r["gate"]["pass_vs_plain"] and r["gate"]["rel_diff_vs_plain"] <= 1e-3, name
        if name != "a":
            assert r["gate"]["pass_vs_a"], name
    # Two bfd-packed rows of 256 tokens per step, nearly full; arm (a) pads 8 sequences.
    assert arms["b"]["micro_batch"] == 2 and arms["a"]["micro_batch"] == 8
    assert 0.8 * 2 * 256 < arms["b"]["tokens_per_step"] <= 2 * 256
    assert "| b_lean |" in result.stdout


def test_deadline_starts_no_arm_late(tmp_path):
    out = tmp_path / "late.json"
    result = _run(tmp_path, "--arms", "a", "--deadline-s", "0.001", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[tiny/short/a] not started: past --deadline-s" in result.stdout
    assert not out.exists()
