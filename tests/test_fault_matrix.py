"""Bad input and faults, through the real CLI: each is refused with one line that names what to fix and its
documented exit code, and nothing of what was there is lost or overwritten.

Covered elsewhere (not repeated here): SIGKILL after a checkpoint + `train.resume_from_checkpoint=auto` equals
an uninterrupted run, losses and adapter (tests/test_runs_e2e.py, which also SIGTERMs the resumed run: checkpoint,
resume hint, exit 143); no secret in any file of a run directory (tests/test_runs_e2e.py); NaN stop (exit 3).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import TrainerCallback

from tests.conftest import REPO, cli_in_process, run_cli

ESCAPE = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
SANDBOX_LINE = "the template tried to reach outside the Jinja sandbox"


def _one_line(proc: subprocess.CompletedProcess, needle: str) -> str:
    """The failure is exactly one line holding `needle`, with no traceback and no Hydra job banner."""
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if needle in line]
    assert len(lines) == 1, out[-3000:]
    for noise in ("Traceback", "Error executing job", "HYDRA_FULL_ERROR"):
        assert noise not in out, out[-3000:]
    return lines[0]


def _snapshot(d: Path) -> dict[str, str]:
    """Every file under `d` (hidden ones too) -> a hash of its bytes."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


# --- models -----------------------------------------------------------------------------------------------

def _copy_model(tiny_model: str, dest: Path) -> Path:
    import shutil

    shutil.copytree(tiny_model, dest)
    return dest


def test_pickle_only_model_dir_is_refused(tiny_model, tmp_path):
    """A model directory whose weights are only pytorch_model.bin (a pickle: loading it can run code)."""
    import torch
    from safetensors.torch import load_file

    model = _copy_model(tiny_model, tmp_path / "pickled")
    weights = model / "model.safetensors"
    torch.save(load_file(str(weights)), model / "pytorch_model.bin")
    weights.unlink()
    before = _snapshot(model)
    run_dir = tmp_path / "run"
    proc = cli_in_process("doctor", f"model.name_or_path={model}", "data.max_samples=8")
    line = _one_line(proc, "loads safetensors only")
    assert proc.returncode == 2 and "pytorch_model.bin" in line and str(model) in line
    proc = cli_in_process("train", f"model.name_or_path={model}", "data.max_samples=8", "quant=none",
                          "eval.before_after=false", f"hydra.run.dir={run_dir}")
    _one_line(proc, "loads safetensors only")
    assert proc.returncode == 2 and not (run_dir / "adapter").exists()
    assert _snapshot(model) == before


def test_model_needing_remote_code_is_refused_and_its_code_never_runs(tiny_model, tmp_path):
    """trust_remote_code is off unless asked for: a config whose auto_map points at the model's own Python file
    is refused with one line, and that file is never imported (it would leave a marker)."""
    model = _copy_model(tiny_model, tmp_path / "custom")
    marker = tmp_path / "code-ran"
    (model / "modeling_custom.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n\n\nclass CustomConfig(PretrainedConfig):\n"
        "    model_type = 'tuneforge-custom'\n")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="tuneforge-custom", auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                                                           "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (model / "config.json").write_text(json.dumps(config))
    proc = cli_in_process("doctor", f"model.name_or_path={model}", "data.max_samples=8")
    line = _one_line(proc, "needs its own Python code")
    assert proc.returncode == 2 and "model.trust_remote_code=true" in line and str(model) in line
    assert not marker.exists()


# --- templates --------------------------------------------------------------------------------------------

@pytest.fixture
def escaping_template(tmp_path) -> Path:
    path = tmp_path / "escape.jinja"
    path.write_text(ESCAPE + "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                             "{% endfor %}")
    return path


def test_sandbox_escaping_template_is_one_line_in_doctor(escaping_template):
    """The real console script: Hydra's job wrapper used to print "Error executing job" and a traceback."""
    proc = run_cli("doctor", f"tokenizer.chat_template={escaping_template}", "data.max_samples=8")
    line = _one_line(proc, SANDBOX_LINE)
    assert proc.returncode == 2 and str(escaping_template) in line
    assert "Traceback" not in proc.stderr


def test_sandbox_escaping_template_in_preview_and_train(escaping_template, tiny_model, tmp_path):
    proc = cli_in_process("preview", f"tokenizer.chat_template={escaping_template}", "n=2", cwd=tmp_path)
    assert proc.returncode == 2 and str(escaping_template) in _one_line(proc, SANDBOX_LINE)
    assert not (tmp_path / "outputs").exists()  # no preview.html written
    run_dir = tmp_path / "run"
    proc = cli_in_process("train", f"model.name_or_path={tiny_model}", f"tokenizer.chat_template={escaping_template}",
                          "quant=none", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2 and str(escaping_template) in _one_line(proc, SANDBOX_LINE)
    assert not (run_dir / "adapter").exists() and not list(run_dir.glob("checkpoint-*"))


def test_debug_flag_adds_the_traceback_and_keeps_the_exit_code(escaping_template, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # restored after the test: --debug sets it in this process
    proc = cli_in_process("doctor", "--debug", f"tokenizer.chat_template={escaping_template}", "data.max_samples=8")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" in out and "SecurityError" in out and SANDBOX_LINE in out


def test_a_template_escaping_on_some_rows_only_is_refused_while_rendering(tmp_path):
    """The load-time probe renders two sample conversations; a template that escapes only on other content is
    refused by the row renders, naming the template file all the same."""
    from tuneforge.config.errors import ConfigError
    from tuneforge.config.schemas import TokenizerConfig
    from tuneforge.data.render import render_conversations
    from tuneforge.models.tokenizer import load_tokenizer

    path = tmp_path / "sometimes.jinja"
    path.write_text("{% for m in messages %}{% if m['content'] == 'boom' %}" + ESCAPE + "{% endif %}"
                    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    from tuneforge.models.embedded import resolve

    tokenizer, _ = load_tokenizer(str(resolve("embedded:smollm2-135m-instruct")),
                                  TokenizerConfig(chat_template=str(path)))
    fine = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert not isinstance(render_conversations(tokenizer, [fine], ["<|im_end|>"])[0], Exception)
    with pytest.raises(ConfigError, match=f"{path}.*{SANDBOX_LINE}"):
        render_conversations(tokenizer, [fine, [{"role": "user", "content": "boom"}, fine[1]]], ["<|im_end|>"])


# --- runs -------------------------------------------------------------------------------------------------

BARRIER_ENV = "TUNEFORGE_TEST_BARRIER"


class HoldAtStep1(TrainerCallback):
    """Holds a real run after step 1 (its run directory claimed, its config written) until the test creates
    BARRIER/release: the second command starts at a known point, not after a sleep."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            barrier = Path(os.environ[BARRIER_ENV])
            (barrier / "held").touch()
            deadline = time.monotonic() + 600
            while not (barrier / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return control


def _train_args(model: str, run_dir: Path, *extra: str) -> list[str]:
    return ["train", f"model.name_or_path={model}", "train.max_steps=2", "train.logging_steps=1",
            "train.per_device_train_batch_size=4", "data.max_samples=16", "eval.before_after=false", "quant=none",
            f"hydra.run.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def held_run(tmp_path_factory, tiny_model):
    """A train run held at step 1 while a second `train` into the same hydra.run.dir is started, then let go.
    Returns (run dir, the second command's result, the run dir's files while held, after the second)."""
    base = tmp_path_factory.mktemp("held")
    run_dir, barrier = base / "run", base / "barrier"
    barrier.mkdir()
    first = subprocess.Popen(
        [str(Path(sys.executable).with_name("tuneforge")),
         *_train_args(tiny_model, run_dir, "callbacks=[tests.test_fault_matrix:HoldAtStep1]")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), BARRIER_ENV: str(barrier)})
    try:
        deadline = time.monotonic() + 600
        while not (barrier / "held").exists():
            assert first.poll() is None, first.communicate()[0][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        held = _snapshot(run_dir)
        second = cli_in_process(*_train_args(tiny_model, run_dir, "train.seed=7"))
        after_second = _snapshot(run_dir)
    finally:
        (barrier / "release").touch()
        output = first.communicate(timeout=600)[0]
    assert first.returncode == 0, output[-3000:]
    return run_dir, second, held, after_second


@pytest.mark.slow
def test_second_train_into_a_run_dir_in_use_is_refused_and_changes_nothing(held_run):
    run_dir, second, held, after_second = held_run
    assert second.returncode == 2
    assert "resume_from_checkpoint=auto" in _one_line(second, "already holds a run")
    assert after_second == held  # not one byte of the running run changed: config, .hydra/, log
    config = (run_dir / "config.yaml").read_text()
    assert "seed: 42" in config and "seed: 7" not in config
    assert "train.seed=7" not in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "finished"


# One of several processes racing to claim one run directory: all wait for BARRIER/go, claim, print the outcome,
# then keep their claim until BARRIER/done (so every racer tries while the winner holds it).
_RACER = """
import sys, time
from pathlib import Path
from tuneforge.runs import rundir
from tuneforge.config.errors import ConfigError
barrier = Path(sys.argv[2])
(barrier / f"ready-{sys.argv[3]}").touch()
while not (barrier / "go").exists():
    time.sleep(0.001)
try:
    rundir.claim_run_dir(Path(sys.argv[1]))
    print("claimed", flush=True)
except ConfigError as exc:
    print(exc, flush=True)
while not (barrier / "done").exists():
    time.sleep(0.01)
"""


def test_claiming_a_run_dir_is_atomic_across_processes(tmp_path):
    """Four processes released at once by a barrier claim one directory: exactly one gets it, the others are
    told it is in use. A check-then-create would let several through."""
    barrier, run_dir = tmp_path / "barrier", tmp_path / "run"
    barrier.mkdir()
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(run_dir), str(barrier), str(i)],
                               stdout=subprocess.PIPE, text=True) for i in range(4)]
    try:
        deadline = time.monotonic() + 120
        while len(list(barrier.glob("ready-*"))) < len(racers):
            assert time.monotonic() < deadline and all(r.poll() is None for r in racers)
            time.sleep(0.01)
        (barrier / "go").touch()
        outcomes = [r.stdout.readline().strip() for r in racers]
    finally:
        (barrier / "done").touch()
        for r in racers:
            r.wait(timeout=120)
    assert outcomes.count("claimed") == 1, outcomes
    assert all("in use by another tuneforge command" in o for o in outcomes if o != "claimed"), outcomes


def test_a_killed_claim_leaves_no_stale_lock(tmp_path):
    """The lock goes with its process, however it ends: after kill -9 the directory can be claimed (resume)."""
    from tuneforge.config.errors import ConfigError
    from tuneforge.runs import rundir

    run_dir = tmp_path / "run"
    hold = ("import sys; from pathlib import Path; from tuneforge.runs import rundir; "
            f"rundir.claim_run_dir(Path({str(run_dir)!r})); print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"in use by another tuneforge command \\(process {holder.pid}\\)"):
            rundir.claim_run_dir(run_dir)
    finally:
        holder.kill()
        holder.wait()
    rundir.claim_run_dir(run_dir)
    rundir.release_run_dir(run_dir)


@pytest.mark.slow
def test_merge_into_a_non_empty_dir_is_refused_and_leaves_it_untouched(held_run, tmp_path):
    run_dir = held_run[0]
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    proc = cli_in_process("merge", f"run_dir={run_dir}", f"out={out}")
    assert proc.returncode == 2 and "out=DIR" in _one_line(proc, "is not empty")
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no half-written merge beside it either
