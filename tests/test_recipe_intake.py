"""Bring your own recipe: recipe files anywhere (a path, a user folder, --config-dir), `tuneforge recipes`, and a
run from a user recipe reproduced from its run directory alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import cli_in_process
from tuneforge.config import recipes
from tuneforge.config.compose import compose_config, load_config, to_validated

MY_RECIPE = """# @package _global_
# My own recipe: the demo with a longer context and rank 8.
#   tuneforge train recipe=my-recipe.yaml
train:
  max_length: 256
peft:
  r: 8
"""


@pytest.fixture
def my_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "my-recipe.yaml"
    path.write_text(MY_RECIPE)
    return path


def test_a_recipe_file_by_path_relative_to_the_working_directory(my_recipe, monkeypatch):
    monkeypatch.chdir(my_recipe.parent)
    cfg = load_config(["recipe=my-recipe.yaml"])
    assert cfg.train.max_length == 256 and cfg.peft.r == 8
    # It replaces the default recipe (demo) and composes with overrides like a shipped one.
    assert load_config([f"recipe={my_recipe}", "peft.r=4"]).peft.r == 4


def test_two_files_with_one_stem_stay_apart(tmp_path):
    for sub, r in (("a", 4), ("b", 12)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "x.yaml").write_text(f"peft:\n  r: {r}\n")
    assert load_config([f"recipe={tmp_path / 'a' / 'x.yaml'}"]).peft.r == 4
    assert load_config([f"recipe={tmp_path / 'b' / 'x.yaml'}"]).peft.r == 12


def test_a_user_recipe_folder_from_the_environment(my_recipe, monkeypatch):
    monkeypatch.setenv(recipes.RECIPES_ENV, str(my_recipe.parent))
    assert load_config(["recipe=my-recipe"]).peft.r == 8


@pytest.mark.parametrize("body,why", [(None, "no such file"), ("- a\n- b\n", "a recipe is a YAML mapping"),
                                      ("a: [\n", "not valid YAML")])
def test_a_bad_recipe_file_is_one_line_and_exit_2(tmp_path, body, why):
    path = tmp_path / "bad.yaml"
    if body is not None:
        path.write_text(body)
    result = cli_in_process("train", f"recipe={path}", "dry_run=true", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and why in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_user_recipe_with_a_shipped_recipes_name_shadows_it(tmp_path, monkeypatch):
    (tmp_path / "demo.yaml").write_text("# Mine.\npeft:\n  r: 2\n")
    monkeypatch.setenv(recipes.RECIPES_ENV, str(tmp_path))
    assert recipes.available()["demo"] == (tmp_path / "demo.yaml", "user")
    assert load_config(["recipe=demo"]).peft.r == 2


def test_recipes_lists_shipped_and_user_recipes_with_their_header(my_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv(recipes.RECIPES_ENV, str(my_recipe.parent))
    conf = tmp_path / "conf" / "recipe"
    conf.mkdir(parents=True)
    (conf / "from-config-dir.yaml").write_text("# From a Hydra config dir.\ntrain:\n  max_steps: 3\n")
    result = cli_in_process("recipes", "--config-dir", str(tmp_path / "conf"))
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "shipped" in lines["demo"] and "The demo: QLoRA on the embedded SmolLM2-135M-Instruct" in lines["demo"]
    assert "user" in lines["my-recipe"] and "My own recipe: the demo with a longer context" in lines["my-recipe"]
    assert "From a Hydra config dir." in lines["from-config-dir"]


def test_train_takes_a_recipe_from_config_dir(tmp_path):
    conf = tmp_path / "recipe"
    conf.mkdir()
    (conf / "cd-recipe.yaml").write_text("train:\n  max_steps: 3\n")
    result = cli_in_process("train", "--config-dir", str(tmp_path), "recipe=cd-recipe", "dry_run=true",
                            f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    assert "max_steps: 3" in result.stdout


def test_a_run_from_a_user_recipe_reproduces_from_its_run_directory_alone(my_recipe, tmp_path):
    """The run directory's config.yaml is what `tuneforge reproduce` composes: the recipe file is gone."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tuneforge.commands.reproduce import primary_config
    from tuneforge.runs import rundir

    composed = compose_config([f"recipe={my_recipe}"])
    original = to_validated(composed)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rundir.write_config(run_dir, composed)
    my_recipe.unlink()
    (tmp_path / "reproduce.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(primary_config(run_dir))))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3", job_name="train"):
            again = to_validated(compose(config_name="reproduce"))
    finally:
        GlobalHydra.instance().clear()
    assert again == original and again.peft.r == 8 and again.train.max_length == 256


# --- the peers' key names: one alias table (config/peer_keys.py), read by the unknown-key message and by import ---

@pytest.mark.parametrize("override,expected", [
    ("sequence_len=2048", "Axolotl's sequence_len is train.max_length in tuneforge"),
    ("base_model=meta-llama/Llama-3.1-8B", "Axolotl's base_model is model.name_or_path in tuneforge"),
    ("val_set_size=0.05", "Axolotl's val_set_size is data.eval_fraction in tuneforge"),
    ("lora_r=8", "Axolotl's lora_r is peft.r in tuneforge"),
    ("cutoff_len=1024", "LLaMA-Factory's cutoff_len is train.max_length in tuneforge"),
    ("stage=dpo", "LLaMA-Factory's stage is task in tuneforge"),
    ("rl=dpo", "Axolotl's rl is task in tuneforge"),
    ("deepspeed=ds.json", "Axolotl's and LLaMA-Factory's deepspeed is not a tuneforge key (refused by design): "
                          "launcher=deepspeed_zero2"),
    ("train.lora_r=8", "Did you mean peft.r?"),
    ("peft.lora_rank=8", "Did you mean peft.r? (LLaMA-Factory's lora_rank"),
])
def test_a_pasted_peer_key_says_what_it_is_in_tuneforge(override, expected):
    from tuneforge.config.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        load_config([override])
    assert expected in str(exc.value)
    assert "train.sync_ref_model" not in str(exc.value)  # the spelling guess base_model used to get


@pytest.mark.parametrize("key", ["train.deepspeed=ds.json", "train.fsdp=full_shard", "train.fsdp_config={a: 1}"])
def test_deepspeed_and_fsdp_trainer_keys_are_refused_naming_the_launcher(key):
    from tuneforge.config.errors import ConfigError

    with pytest.raises(ConfigError, match="launcher=(deepspeed_zero2|fsdp)"):
        load_config([key])


def test_every_alias_target_is_a_tuneforge_key():
    """The table cannot point at a key that does not exist (or a section that was renamed)."""
    from tuneforge.config import peer_keys
    from tuneforge.config.schemas import TuneforgeConfig, schema_keys

    valid = set(schema_keys(TuneforgeConfig))
    for tool, table in peer_keys.TABLES.items():
        for name, alias in table.items():
            assert bool(alias.target) != bool(alias.skip), (tool, name)
            assert not alias.target or alias.target in valid, (tool, name, alias.target)
            assert not alias.skip or alias.note, (tool, name)
