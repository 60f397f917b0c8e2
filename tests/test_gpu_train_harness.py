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


def test_ratios_stay_within_one_device():
    """--table judges the records of several machines together: arm (a) of another GPU is no baseline."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_train

    def row(device, arm, tokens_per_s, loss=2.0):
        return {"device": device, "shape": "1b", "profile": "chat", "arm_name": arm,
                "arm": {"quant": "bf16" if arm.endswith("_bf16") else "nf4"}, "tokens_per_s": tokens_per_s,
                "peak_allocated_gib": 10.0, "gate": {"loss": loss, "rel_diff_vs_plain": 0.0}}

    rows = [row("NVIDIA H100", "a", 100.0), row("NVIDIA H200", "b", 300.0), row("NVIDIA H200", "a", 150.0),
            row("NVIDIA H100", "b", 200.0), row("NVIDIA H100", "b_bf16", 250.0)]
    gpu_train.judge(rows)
    h100_b, h200_b = rows[3], rows[1]
    assert h100_b["speedup_vs_a"] == pytest.approx(2.0) and h200_b["speedup_vs_a"] == pytest.approx(2.0)
    assert h100_b["qlora_slowdown_vs_bf16"] == pytest.approx(1.25)  # bf16 250 vs QLoRA 200 tok/s and "qlora_slowdown_vs_bf16" not in h200_b
