"""Every shipped recipe composes and validates (nothing is downloaded), and the dry run of a hub recipe
prints the plan and a memory estimate offline."""

from __future__ import annotations

import re

import pytest

from tests.conftest import run_cli
from tuneforge.config.compose import group_options, load_config
from tuneforge.config.paths import recipes_dir

RECIPES = group_options("recipe")


def test_the_recipes_are_shipped():
    assert {"demo", "classify-demo", "llama31-8b-alpaca", "mistral-7b-bfd", "phi3-mini-chat", "qwen25-05b-full",
            "opt350m-chatml", "bert-imdb"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_and_validates(name):
    text = (recipes_dir() / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_")
    # The header gives the exact command (a sweep recipe's runs with -m).
    assert re.search(rf"tuneforge train (-m )?recipe={name}\b", text) or name == "demo"
    cfg = load_config([f"recipe={name}"])
    assert cfg.train.max_length > 0
    # Every recipe also composes with a multi-process launcher.
    load_config([f"recipe={name}", "launcher=ddp", "launcher.num_processes=8"])


def test_recipe_specifics():
    llama = load_config(["recipe=llama31-8b-alpaca"])
    assert llama.model.name_or_path == "meta-llama/Llama-3.1-8B" and llama.format.strategy == "alpaca"
    assert llama.quant.load_in_4bit and llama.peft.method == "lora" and llama.data.path == "yahma/alpaca-cleaned"
    assert load_config(["recipe=mistral-7b-bfd"]).packing.mode == "bfd"
    phi = load_config(["recipe=phi3-mini-chat"])
    assert phi.format.strategy == "instruction" and phi.data.columns == {"sentence": "prompt",
                                                                         "translation_extra": "completion"}
    qwen = load_config(["recipe=qwen25-05b-full"])
    assert qwen.peft.method == "none" and not qwen.quant.load_in_4bit
    opt = load_config(["recipe=opt350m-chatml"])
    assert opt.tokenizer.chat_template == "chatml" and opt.model.name_or_path == "facebook/opt-350m"
    bert = load_config(["recipe=bert-imdb"])
    assert bert.task == "classification" and bert.collator.name == "padding"


def test_hub_recipe_dry_run_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run_cli("train", "recipe=llama31-8b-alpaca", "dry_run=true", f"hydra.run.dir={tmp_path / 'dry'}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "meta-llama/Llama-3.1-8B" in out and "effective_batch_size: 16" in out
    assert "shape from tuneforge's table" in out and "could not fetch" in out
    assert "GPU memory estimate: 12.4 GiB per process" in out  # the recipe's 4 x 1024 tokens, fp32 copies
    assert "with quant.upcast_non_quantized=false (no fp32 copies of the unquantized weights): 9.1 GiB (-3.35)" in out
    # 12.4 GiB + 1 GiB context at 4 rows: 24 GiB holds more rows, 80 GiB many more (bisected on the estimate).
    line = next(s for s in out.splitlines() if "largest micro-batch:" in s)
    fits = [int(rows) for rows, _ in re.findall(r"(\d+) on (\d+)", line)]
    assert len(fits) == 4 and 4 < fits[0] < fits[1] < fits[2] < fits[3], line
