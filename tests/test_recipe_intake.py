"""Bring your own recipe: recipe files anywhere (a path, a user folder, --config-dir), `tuneforge recipes`, and a
run from a user recipe reproduced from its run directory alone."""

from __future__ import annotations

import re
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
    ("deepspeed=ds.json", "Axolotl's and LLaMA-Factory's deepspeed is launcher.deepspeed_config in tuneforge"),
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


# --- tuneforge import: Axolotl and LLaMA-Factory configs as recipes (fixtures written here from each tool's
# documented keys) -------------------------------------------------------------------------------------------------

AXOLOTL_QLORA = """\
base_model: NousResearch/Llama-3.2-1B
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer
load_in_4bit: true
strict: false
datasets:
  - path: teknium/GPT4-LLM-Cleaned
    type: alpaca
dataset_prepared_path: last_run_prepared
val_set_size: 0.05
output_dir: ./outputs/qlora-out
adapter: qlora
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
sequence_len: 1024
sample_packing: true
pad_to_sequence_len: true
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 1
optimizer: paged_adamw_8bit
lr_scheduler: cosine
learning_rate: 0.0002
train_on_inputs: false
bf16: auto
gradient_checkpointing: true
logging_steps: 1
flash_attention: true
warmup_steps: 10
evals_per_epoch: 4
weight_decay: 0.0
deepspeed: deepspeed_configs/zero2.json
"""

AXOLOTL_CHAT_8BIT = """\
base_model: Qwen/Qwen2.5-0.5B-Instruct
load_in_8bit: true
adapter: lora
lora_r: 16
lora_target_modules: [q_proj, v_proj]
chat_template: qwen_25
datasets:
  - path: data/chats.jsonl
    ds_type: json
    data_files: data/chats.jsonl
    type: chat_template
    field_messages: conversations
    message_property_mappings:
      role: from
      content: value
    roles_to_train: [assistant]
  - path: teknium/GPT4-LLM-Cleaned
    type: alpaca
sequence_len: 512
micro_batch_size: 1
num_epochs: 2
learning_rate: 0.0001
wandb_project: my-project
wandb_entity: my-team
mlflow_experiment_name: exp
fsdp:
  - full_shard
fsdp_config:
  fsdp_offload_params: false
  fsdp_transformer_layer_cls_to_wrap: Qwen2DecoderLayer
"""

AXOLOTL_FULL = """\
base_model: HuggingFaceTB/SmolLM2-135M
datasets:
  - path: data/text.jsonl
    type: completion
    field: body
sequence_len: 256
micro_batch_size: 4
num_epochs: 1
learning_rate: 0.00002
"""

AXOLOTL_DPO = """\
base_model: Qwen/Qwen2.5-0.5B-Instruct
rl: dpo
rl_beta: 0.2
adapter: lora
lora_r: 8
lora_alpha: 16
datasets:
  - path: argilla/distilabel-intel-orca-dpo-pairs
    split: train
    type: chatml.intel
sequence_len: 512
micro_batch_size: 1
learning_rate: 0.000005
"""

LLAMAFACTORY_SFT = """\
### model
model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct
trust_remote_code: true
### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
### dataset
dataset: identity,chats
template: qwen
cutoff_len: 1024
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 2
### output
output_dir: saves/qwen/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
report_to: none
### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
"""

LLAMAFACTORY_DPO = """\
model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct
stage: dpo
do_train: true
finetuning_type: lora
pref_beta: 0.1
pref_loss: sigmoid
dataset: pairs
template: qwen
quantization_bit: 4
output_dir: saves/qwen/lora/dpo
learning_rate: 5.0e-6
"""

LLAMAFACTORY_FULL_RM = """\
model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct
stage: rm
finetuning_type: full
dataset: pairs
"""

DATASET_INFO = {
    "identity": {"file_name": "identity.json"},
    "chats": {"file_name": "chats.json", "formatting": "sharegpt", "columns": {"messages": "conversations"}},
    "pairs": {"file_name": "pairs.json", "ranking": True, "formatting": "sharegpt",
              "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
}


@pytest.fixture
def peer_files(tmp_path, monkeypatch):
    """The fixtures above in a working directory with LLaMA-Factory's data/ folder (dataset_info.json) and the local
    data files Axolotl's configs name."""
    import json

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps(DATASET_INFO))
    (tmp_path / "deepspeed_configs").mkdir()
    (tmp_path / "deepspeed_configs" / "zero2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    for name in ("identity.json", "chats.json", "pairs.json", "chats.jsonl", "text.jsonl"):
        (data / name).write_text("[]" if name.endswith(".json") else "")
    for name, text in [("ax_qlora", AXOLOTL_QLORA), ("ax_chat", AXOLOTL_CHAT_8BIT), ("ax_full", AXOLOTL_FULL),
                       ("ax_dpo", AXOLOTL_DPO), ("lf_sft", LLAMAFACTORY_SFT), ("lf_dpo", LLAMAFACTORY_DPO),
                       ("lf_rm", LLAMAFACTORY_FULL_RM)]:
        (tmp_path / f"{name}.yaml").write_text(text)
    return tmp_path


def _import(tmp_path, name: str, *extra: str) -> tuple[str, Path]:
    out = tmp_path / f"{name}-recipe.yaml"
    result = cli_in_process("import", str(tmp_path / f"{name}.yaml"), f"out={out}", *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return out.read_text(), out


def _source_keys(text: str) -> list[str]:
    import yaml

    return list(yaml.safe_load(text))


@pytest.mark.parametrize("name,source", [("ax_qlora", AXOLOTL_QLORA), ("ax_chat", AXOLOTL_CHAT_8BIT),
                                         ("ax_full", AXOLOTL_FULL), ("ax_dpo", AXOLOTL_DPO),
                                         ("lf_sft", LLAMAFACTORY_SFT), ("lf_dpo", LLAMAFACTORY_DPO),
                                         ("lf_rm", LLAMAFACTORY_FULL_RM)])
def test_every_source_key_is_imported_with_a_comment_or_listed_with_why(peer_files, name, source):
    text, _ = _import(peer_files, name)
    body, _, skipped = text.partition("# Not imported:")
    for key in _source_keys(source):
        if key in ("dataset_dir",):
            continue
        commented = re.search(rf"# {re.escape(key)}\b", body)
        listed = re.search(rf"^#   {re.escape(key)}\b.*: (no equivalent|tuneforge always does this|refused by design)",
                           skipped, re.M)
        assert commented or listed, (key, text)


def test_axolotl_qlora_recipe_trains_what_axolotl_trained(peer_files):
    text, out = _import(peer_files, "ax_qlora")
    cfg = load_config([f"recipe={out}", "dry_run=true"])  # DeepSpeed needs CUDA GPUs to run, not to plan
    assert cfg.model.name_or_path == "NousResearch/Llama-3.2-1B" and cfg.format.strategy == "alpaca"
    assert cfg.data.path == "teknium/GPT4-LLM-Cleaned" and cfg.data.eval_fraction == 0.05
    assert cfg.quant.load_in_4bit and cfg.peft.method == "lora" and cfg.peft.r == 32 and cfg.peft.lora_alpha == 16
    assert cfg.peft.target_modules == "all-linear" and cfg.train.max_length == 1024 and cfg.packing.mode == "bfd"
    assert cfg.train.per_device_train_batch_size == 2 and cfg.train.optim == "paged_adamw_8bit"
    assert cfg.model.attn_implementation == "flash_attention_2" and cfg.collator.name == "completion_only"
    # Defaults that differ are stated, with the source's value and why.
    assert "use_liger_kernel: false  # Axolotl's default" in text and cfg.train.use_liger_kernel is False
    assert "save_total_limit: null  # Axolotl's default: every checkpoint is kept" in text
    # Axolotl's DeepSpeed JSON: the launcher of its ZeRO stage, with the file; Axolotl drops over-long rows.
    assert cfg.launcher.name == "deepspeed_zero2" and cfg.launcher.deepspeed_config == "deepspeed_configs/zero2.json"
    assert cfg.data.on_long_row == "drop" and "on_long_row: drop  # Axolotl's default" in text


def test_axolotl_chat_template_data_8bit_and_trackers(peer_files):
    text, out = _import(peer_files, "ax_chat")
    assert "report_to: [wandb]  # wandb_project: my-project (set it in the environment (WANDB_PROJECT)" in text
    assert "name: fsdp  # fsdp: [full_shard]" in text
    assert re.search(r"#   fsdp_config\.fsdp_transformer_layer_cls_to_wrap: no equivalent: tuneforge wraps", text)
    assert re.search(r"#   datasets\[0\]\.roles_to_train: tuneforge always does this", text)
    # W&B is not installed here: the recipe composes once the tracker is switched off (the refusal names wandb).
    from tuneforge.config.errors import ConfigError

    with pytest.raises(ConfigError, match="wandb"):
        load_config([f"recipe={out}"])
    cfg = load_config([f"recipe={out}", "train.report_to=none", "dry_run=true"])
    assert cfg.launcher.name == "fsdp" and cfg.launcher.fsdp_sharding_strategy == "FULL_SHARD"
    assert cfg.launcher.fsdp_offload_params is False
    assert cfg.quant.load_in_8bit and not cfg.quant.load_in_4bit and cfg.peft.target_modules == ["q_proj", "v_proj"]
    assert [s.path for s in cfg.data.mix] == ["data/chats.jsonl", "teknium/GPT4-LLM-Cleaned"]
    assert cfg.data.mix[0].format.strategy == "conversational"
    assert cfg.data.mix[0].format.messages_column == "conversations"
    assert cfg.data.mix[1].format.strategy == "alpaca"
    from tuneforge.config.chat_templates import NAMES

    if "qwen2.5" in NAMES:  # Axolotl's qwen_25
        assert cfg.tokenizer.chat_template == "qwen2.5"
    else:
        assert re.search(r"#   chat_template: no equivalent: chat template 'qwen_25'", text)


def test_axolotl_full_fine_tune_and_dpo(peer_files):
    _, out = _import(peer_files, "ax_full")
    full = load_config([f"recipe={out}"])
    assert full.peft.method == "none" and not full.quant.load_in_4bit  # no adapter key: Axolotl's full fine-tune
    assert full.format.strategy == "text" and full.format.text_column == "body"
    _, out = _import(peer_files, "ax_dpo")
    dpo = load_config([f"recipe={out}"])
    assert dpo.task == "dpo" and dpo.train.beta == 0.2 and dpo.format.strategy == "preference"
    assert dpo.format.prompt_column == "question" and not dpo.quant.load_in_4bit


def test_llamafactory_recipes_read_dataset_info_and_state_its_defaults(peer_files):
    text, out = _import(peer_files, "lf_sft")
    cfg = load_config([f"recipe={out}"])
    assert [s.path for s in cfg.data.mix] == ["data/identity.json", "data/chats.json"]
    assert cfg.data.mix[0].format.strategy == "alpaca" and cfg.data.mix[1].format.strategy == "conversational"
    assert cfg.peft.r == 8 and cfg.peft.lora_alpha == 16 and cfg.peft.lora_dropout == 0.0  # LLaMA-Factory's defaults
    assert "lora_alpha: 16  # LLaMA-Factory's default: lora_alpha = 2 x lora_rank" in text
    assert cfg.data.eval_fraction == 0.0 and not cfg.quant.load_in_4bit and cfg.data.cache is False
    assert cfg.train.max_length == 1024 and cfg.train.warmup_steps == 0.1 and cfg.train.num_train_epochs == 3.0
    _, out = _import(peer_files, "lf_dpo")
    dpo = load_config([f"recipe={out}"])
    assert dpo.task == "dpo" and dpo.quant.load_in_4bit and dpo.format.strategy == "preference"
    assert dpo.format.prompt_column == "conversations" and dpo.train.loss_type == ["sigmoid"]
    assert dpo.train.num_train_epochs == 3.0 and dpo.train.learning_rate == 5e-6


def test_llamafactory_pretraining_trains_every_token_of_the_text_column(peer_files):
    import json

    info = json.loads((peer_files / "data" / "dataset_info.json").read_text())
    info["corpus"] = {"file_name": "identity.json", "columns": {"prompt": "body"}}
    (peer_files / "data" / "dataset_info.json").write_text(json.dumps(info))
    (peer_files / "lf_pt.yaml").write_text("model_name_or_path: Qwen/Qwen2.5-0.5B\nstage: pt\nfinetuning_type: lora\n"
                                           "dataset: corpus\n")
    _, out = _import(peer_files, "lf_pt")
    cfg = load_config([f"recipe={out}"])
    assert (cfg.task, cfg.format.strategy, cfg.format.text_column, cfg.collator.name) == ("sft", "text", "body", "lm")


def test_a_reward_model_and_orpo_import_to_their_tasks(peer_files):
    """LLaMA-Factory's stage: rm and Axolotl's reward_model: true are task=reward (its padding collator); pref_loss:
    orpo and rl: orpo are task=orpo, with ORPO's lambda as train.beta."""
    text, out = _import(peer_files, "lf_rm")
    assert "refused" not in text
    cfg = load_config([f"recipe={out}"])
    assert (cfg.task, cfg.collator.name, cfg.peft.method, cfg.format.strategy) == ("reward", "padding", "none",
                                                                                    "preference")
    (peer_files / "lf_orpo.yaml").write_text(LLAMAFACTORY_DPO.replace("pref_loss: sigmoid", "pref_loss: orpo"))
    _, out = _import(peer_files, "lf_orpo")
    cfg = load_config([f"recipe={out}"])
    assert (cfg.task, cfg.train.beta) == ("orpo", 0.1)
    (peer_files / "ax_rm.yaml").write_text(AXOLOTL_DPO.replace("rl: dpo\nrl_beta: 0.2\n", "reward_model: true\n"
                                                               "model_type: AutoModelForSequenceClassification\n"
                                                               "num_labels: 1\n"))
    text, out = _import(peer_files, "ax_rm")
    assert re.search(r"#   num_labels: tuneforge always does this: the task sizes the head", text)
    assert load_config([f"recipe={out}"]).task == "reward"
    (peer_files / "ax_orpo.yaml").write_text(AXOLOTL_DPO.replace("rl: dpo\nrl_beta: 0.2", "rl: orpo\norpo_alpha: 0.2"))
    _, out = _import(peer_files, "ax_orpo")
    cfg = load_config([f"recipe={out}"])
    assert (cfg.task, cfg.train.beta) == ("orpo", 0.2)


def test_an_imported_recipe_dry_runs_from_the_cli(peer_files):
    _, out = _import(peer_files, "lf_dpo")
    result = cli_in_process("train", f"recipe={out}", "dry_run=true", f"hydra.run.dir={peer_files / 'run'}",
                            cwd=peer_files)
    assert result.returncode == 0, result.stderr
    assert "task: dpo" in result.stdout and "Qwen/Qwen2.5-0.5B-Instruct" in result.stdout


@pytest.mark.parametrize("content,args,why", [
    (AXOLOTL_FULL + "mystery_key: 1\n", [], "mystery_key: not an Axolotl key tuneforge knows"),
    (AXOLOTL_FULL, ["--from", "llamafactory"], "is an Axolotl config, not a LLaMA-Factory one"),
    ("model:\n  name_or_path: x\ntrain:\n  max_steps: 3\n", [], "is a tuneforge recipe already"),
    ("- a\n- b\n", [], "a list, not a mapping of config keys"),
    ("just: words\n", [], "not an Axolotl or LLaMA-Factory config"),
    (None, [], "no such file"),
])
def test_bad_import_input_is_one_line_exit_2_and_nothing_written(tmp_path, content, args, why):
    source = tmp_path / "source.yaml"
    if content is not None:
        source.write_text(content)
    out = tmp_path / "out.yaml"
    result = cli_in_process("import", str(source), *args, f"out={out}", cwd=tmp_path)
    assert result.returncode == 2 and why in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_import_prints_the_recipe_without_out(peer_files):
    result = cli_in_process("import", "ax_full.yaml", cwd=peer_files)
    assert result.returncode == 0 and result.stdout.startswith("# @package _global_\n")
    assert "name_or_path: HuggingFaceTB/SmolLM2-135M  # base_model" in result.stdout


def test_liger_fused_linear_cross_entropy_with_sfttrainer_is_refused_before_weights_load():
    from tuneforge.config.errors import ConfigError

    with pytest.raises(ConfigError, match=r"fused_linear_cross_entropy=true with task=sft: its trainer \(SFTTrainer\)"):
        load_config(["train.liger_kernel_config={fused_linear_cross_entropy: true}"])
    load_config(["train.liger_kernel_config={rms_norm: true}"])  # Liger's layer kernels are fine


def test_a_launcher_takes_your_own_deepspeed_json_or_fsdp_settings(tmp_path):
    """launcher.deepspeed_config / launcher.fsdp_config: the user's file reaches the Accelerate config the launcher
    writes; a stage that is not the launcher's, a file of the other launcher or a key that is not FSDP's is refused."""
    import json

    from tuneforge.config.errors import ConfigError
    from tuneforge.runs.launch import accelerate_config

    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
                              "train_micro_batch_size_per_gpu": "auto"}))
    cfg = load_config(["launcher=deepspeed_zero3", f"launcher.deepspeed_config={ds}", "dry_run=true",
                       "quant.bnb_4bit_quant_storage=bfloat16"])
    assert accelerate_config(cfg, cuda=False)["deepspeed_config"] == {"deepspeed_config_file": str(ds),
                                                                     "zero3_init_flag": True}
    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("fsdp_sharding_strategy: HYBRID_SHARD\nfsdp_offload_params: true\n")
    cfg = load_config(["launcher=fsdp", f"launcher.fsdp_config={fsdp}", "dry_run=true",
                       "quant.bnb_4bit_quant_storage=bfloat16"])
    out = accelerate_config(cfg, cuda=False)["fsdp_config"]
    assert out["fsdp_sharding_strategy"] == "HYBRID_SHARD" and out["fsdp_offload_params"] is True
    assert out["fsdp_use_orig_params"] is True  # the generated settings it does not name stay
    (tmp_path / "bad.yaml").write_text("sharding: full\n")
    for overrides, why in [(["launcher=deepspeed_zero2", f"launcher.deepspeed_config={ds}"],
                            "has zero_optimization.stage=3; launcher=deepspeed_zero2 is stage 2"),
                           (["launcher=ddp", f"launcher.deepspeed_config={ds}"], "is for launcher=deepspeed_zero2"),
                           (["launcher=fsdp", f"launcher.fsdp_config={tmp_path / 'bad.yaml'}"],
                            "sharding are not Accelerate fsdp_config keys"),
                           (["launcher=fsdp", f"launcher.fsdp_config={tmp_path / 'none.yaml'}"], "no such file")]:
        with pytest.raises(ConfigError, match=re.escape(why)):
            load_config([*overrides, "dry_run=true", "quant.bnb_4bit_quant_storage=bfloat16"])
