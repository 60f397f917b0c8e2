"""The training-speed harness (benchmarks/gpu_train.py) end to end on a CPU, with its few-layer shape: every arm
in a fresh process, the loss gate, the record written after each arm, and the deadline for lent GPUs."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict

import pytest

from tests.conftest import REPO

SCRIPT = str(REPO / "benchmarks" / "gpu_train.py")


TINY = ("--shapes", "tiny", "--profiles", "short", "--steps", "2", "--warmup", "1", "--max-length", "256",
        "--num-sequences", "64")


sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_train  # noqa: E402


def _row(device: str, arm: str, tokens_per_s: float) -> dict:
    """A finished arm as the driver records it, enough for judge()."""
    return {"device": device, "shape": "1b", "profile": "chat", "arm_name": arm, "arm": asdict(gpu_train.ARMS[arm]),
            "tokens_per_s": tokens_per_s, "peak_allocated_gib": 10.0, "gate": {"loss": 2.0, "rel_diff_vs_plain": 0.0}}


@pytest.mark.slow
def test_arms_pass_the_gate_and_are_recorded(tmp_path):
    """Through the one-command GPU session script, its 8B defaults overridden by the tiny CPU shape."""
    out = tmp_path / "bench.json"
    (tmp_path / "no-wheels").mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels"), "DEADLINE_S": "1200"}
    # Plain TRL against tuneforge's bfd layout (b_lean: arm b without the fp32 upcast, one fresh process less).
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_session.sh"), str(tmp_path), *TINY,
                             "--model-dir", str(tmp_path / "models"), "--arms", "a,b_lean", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["device"].startswith("CPU") and record["command"].startswith("python")
    arms = {r["arm_name"]: r for r in record["results"]}
    assert list(arms) == ["a", "b_lean"] and not any("error" in r for r in arms.values())
    for name, r in arms.items():
        assert r["timed_steps"] == 2 and r["tokens_per_s"] > 0 and r["median_step_s"] > 0
        # The same fixed sequences give the same loss in every layout (fp32 on a CPU: 1e-3 is generous).
        assert r["gate"]["pass_vs_plain"] and r["gate"]["rel_diff_vs_plain"] <= 1e-3, name
        if name != "a":
            assert r["gate"]["pass_vs_a"], name
    # Two bfd-packed rows of 256 tokens per step, nearly full; arm (a) pads 8 sequences.
    assert arms["b_lean"]["micro_batch"] == 2 and arms["a"]["micro_batch"] == 8
    assert 0.8 * 2 * 256 < arms["b_lean"]["tokens_per_step"] <= 2 * 256
    assert "| b_lean |" in result.stdout


def test_deadline_starts_no_arm_late(tmp_path, monkeypatch, capsys):
    """In this process: the driver starts nothing here, so a fresh one would only pay the imports. A clock that
    moves one second per reading puts the deadline behind, whatever the machine's speed."""
    out = tmp_path / "late.json"
    clock = itertools.count()
    monkeypatch.setattr(gpu_train.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(sys, "argv", [SCRIPT, *TINY, "--model-dir", str(tmp_path / "models"), "--arms", "a",
                                      "--deadline-s", "0.001", "--out", str(out)])
    assert gpu_train.main() == 0
    assert "[tiny] not started: past --deadline-s 0.001" in capsys.readouterr().out
    # Past the deadline before the shape's weights were even written: the record says what never ran.
    record = json.loads(out.read_text())
    assert record["results"] == [] and record["not_started"] == ["tiny/short/a"]
    assert not (tmp_path / "models").exists()


def test_missing_package_fails_before_any_weights_are_written(tmp_path):
    """On a bare GPU image the first missing import is reported in seconds, not once per arm."""
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "shadow")}
    # A module named like a worker dependency that fails on import stands in for a package that is absent.
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / "trl.py").write_text("raise ImportError('trl is not installed here')\n")
    result = subprocess.run([sys.executable, SCRIPT, "--shapes", "tiny", "--arms", "a,c_gc,nope",
                             "--model-dir", str(tmp_path / "models"), "--out", str(tmp_path / "x.json")],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2
    assert "unknown arm 'nope'" in result.stderr
    assert "trl: ImportError: trl is not installed here" in result.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "x.json").exists()


def test_arm_prediction_from_finished_arms():
    def done(shape, quant, wall):
        return {"shape": shape, "arm": {"quant": quant}, "wall_s": wall}

    finished = [done("8b", "nf4", 150.0), done("8b", "nf4", 120.0),
                {"shape": "8b", "arm": {"quant": "nf4"}, "error": "stopped after 30 s"}, done("1b", "nf4", 40.0)]
    # The quickest of the same shape and quantization; a failed arm has no wall time and does not count.
    assert gpu_train.predicted_wall_s(finished, "8b", "nf4") == 120.0
    # No arm of this quantization yet: the quickest of the shape.
    assert gpu_train.predicted_wall_s(finished, "8b", "bf16") == 120.0
    assert gpu_train.predicted_wall_s(finished + [done("8b", "bf16", 60.0)], "8b", "bf16") == 60.0
    assert gpu_train.predicted_wall_s(finished, "3b", "nf4") is None


def test_ratios_stay_within_one_device():
    """--table judges the records of several machines together: arm (a) of another GPU is no baseline."""
    rows = [_row("NVIDIA H100", "a", 100.0), _row("NVIDIA H200", "b", 300.0), _row("NVIDIA H200", "a", 150.0),
            _row("NVIDIA H100", "b", 200.0), _row("NVIDIA H100", "b_bf16", 250.0)]
    gpu_train.judge(rows)
    h100_b, h200_b = rows[3], rows[1]
    assert h100_b["speedup_vs_a"] == pytest.approx(2.0) and h200_b["speedup_vs_a"] == pytest.approx(2.0)
    # bf16 250 vs QLoRA 200 tok/s on the H100; the H200 has no bf16 arm, so no slowdown for its b.
    assert h100_b["qlora_slowdown_vs_bf16"] == pytest.approx(1.25)
    assert "qlora_slowdown_vs_bf16" not in h200_b and "qlora_slowdown_vs_bf16" not in rows[0]


def test_qlora_twin_is_the_arm_of_the_same_settings():
    """c1_bf16 is the bf16 twin of c1_lean (the fp32-upcast switch means nothing on a bf16 base), never of an
    arm with other settings."""
    rows = [_row("NVIDIA H200", arm, speed) for arm, speed in
            [("a", 100.0), ("c_gc3_lean", 210.0), ("c1_lean", 300.0), ("c1_bf16", 360.0)]]
    gpu_train.judge(rows)
    assert rows[2]["qlora_slowdown_vs_bf16"] == pytest.approx(1.2)
    assert "qlora_slowdown_vs_bf16" not in rows[0] and "qlora_slowdown_vs_bf16" not in rows[1]
    assert gpu_train.same_settings(asdict(gpu_train.ARMS["c1"]), asdict(gpu_train.ARMS["c1_lean_bf16"]))
    assert not gpu_train.same_settings(asdict(gpu_train.ARMS["c1"]), asdict(gpu_train.ARMS["c1_nd_bf16"]))


def test_session_script_runs_only_known_arms():
    """A lent GPU is gone after one call: an arm name in gpu_session.sh that the harness does not know would
    cost that call, so the default list is checked here, on the CPU."""
    script = (REPO / "benchmarks" / "gpu_session.sh").read_text()
    arms = re.search(r"^arms=(\S+)$", script, re.M).group(1).split(",")
    assert arms[0] == "a" and len(set(arms)) == len(arms)
    assert [name for name in arms if name not in gpu_train.ARMS] == []
