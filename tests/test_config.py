"""Strict configs: bad keys, types, values and combinations fail before any model loads."""

from __future__ import annotations

import pytest

from tests.conftest import cli_in_process, run_cli
from tuneforge.config.compose import group_options, load_config
from tuneforge.config.errors import ConfigError


def test_defaults_compose_to_the_demo():
    cfg = load_config([])
    assert cfg.model.name_or_path == "embedded:smollm2-135m-instruct"
    assert cfg.quant.load_in_4bit and cfg.quant.bnb_4bit_quant_type == "nf4" and cfg.quant.bnb_4bit_use_double_quant
    assert cfg.peft.method == "lora"
    assert cfg.tokenizer.pad_token == "auto"
    assert cfg.train.max_steps == 20  # from recipes/demo.yaml, applied over conf/train/default.yaml


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lerning_rate=1e-4", "unknown config key 'train.lerning_rate'.*Did you mean 'train.learning_rate'"),
        ("+train.warmup=3", "unknown config key 'train.warmup'.*Did you mean 'train.warmup_steps'"),
        ("trian.max_steps=3", "unknown config key 'trian.max_steps'.*Did you mean 'train.max_steps'"),
        ("train.learning_rate=fast", "train.learning_rate: Value 'fast'.*Float"),
        ("train.max_steps=1.5", "train.max_steps: Value '1.5'.*Integer"),
        ("peft.r=0", r"peft.r=0 must be > 0"),
        ("collator.name=completion", "collator.name='completion' is not valid.*Did you mean 'completion_only'"),
        ("model=smollm", "no such model config.*Did you mean 'smollm2_135m'"),
        ("recipe=dmeo", "no such recipe config.*Did you mean 'demo'"),
        ("peft=none", "quant.load_in_4bit=true with peft=none"),
        ("quant.upcast_non_quantized=false quant.bnb_4bit_compute_dtype=float16", "would keep norms.*fp16"),
    ],
)
def test_bad_config_is_a_clear_error(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(override.split(" "))


def test_full_finetune_combination_is_legal():
    cfg = load_config(["quant=none", "peft=none"])
    assert not cfg.quant.load_in_4bit and cfg.peft.method == "none"


def test_multirun_checks_first_value_of_each_sweep():
    assert load_config(["train.learning_rate=1e-4,2e-4"], multirun=True).train.learning_rate == 1e-4
    with pytest.raises(ConfigError, match="lerning_rate"):
        load_config(["train.lerning_rate=1e-4,2e-4"], multirun=True)


@pytest.mark.parametrize("group", ["model", "tokenizer", "data", "format", "collator", "packing", "quant", "peft",
                                   "train", "eval", "recipe"])
def test_every_shipped_option_composes(group, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "a", "output": "b"}\n')
    for option in group_options(group):
        overrides = [f"{group}={option}"]
        if (group, option) == ("data", "local"):
            overrides.append(f"data.path={rows}")  # validation checks that local files exist
        if (group, option) == ("model", "hub"):
            overrides.append("model.name_or_path=some/model")
        if (group, option) == ("peft", "none"):
            overrides.append("quant=none")
        if (group, option) == ("collator", "padding"):
            overrides.append("task=classification")  # the padding collator builds no LM labels
        if (group, option) in (("format", "preference"), ("format", "unpaired")):
            overrides.append(f"task={'dpo' if option == 'preference' else 'kto'}")  # preference rows, preference tasks
        if (group, option) == ("format", "prompt"):  # prompt rows: the online-RL tasks, which need rewards
            overrides += ["task=grpo", "rewards=[{name:exact_match}]"]
        load_config(overrides)


def test_preference_tasks_refuse_what_they_cannot_do():
    """task=dpo needs preference rows, no packing, LoRA; task=orpo (TRL's experimental ORPOTrainer) refuses what its
    trainer cannot run on prepared rows and the DPO-only keys; DPO keys are train.* keys for task=dpo and foreign to
    task=sft."""
    cfg = load_config(["recipe=dpo-demo", "train.beta=0.2", "train.loss_type=[sigmoid,sft]"])
    assert (cfg.task, cfg.train.beta, cfg.train.loss_type) == ("dpo", 0.2, ["sigmoid", "sft"])
    for overrides, message in [(["task=dpo"], "format.strategy=preference"),
                               (["recipe=dpo-demo", "packing=bfd"], "pack nothing"),
                               (["recipe=dpo-demo", "peft=none", "quant=none"], "needs LoRA"),
                               (["recipe=orpo-demo", "train.generate_during_eval=true"], "ORPOTrainer samples"),
                               (["recipe=orpo-demo", "train.loss_type=[sigmoid]"], "ORPOConfig, which has no"),
                               (["train.beta=0.3"], "DPOConfig"),
                               (["format=preference"], "task=dpo")]:
        with pytest.raises(ConfigError, match=message):
            load_config(overrides)


def test_missing_local_data_file_fails_in_validation_with_its_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(ConfigError, match=r"data.path='rwos.jsonl': no such file or directory .*" + str(tmp_path)):
        load_config(["data.path=rwos.jsonl"])
    with pytest.raises(ConfigError, match=r"data.mix\[1\].path='./gone'"):
        load_config(["+data.mix=[{path: rows.jsonl}, {path: ./gone}]"])
    with pytest.raises(ConfigError, match=r"data.eval_split='held/out.jsonl'"):
        load_config(["data.path=rows.jsonl", "data.eval_split=held/out.jsonl"])
    # What must still pass: the file itself, a glob, a hub id (checked when it loads), a split name.
    for ok in (["data.path=rows.jsonl"], ["data.path=*.jsonl"], ["data.path=tatsu-lab/alpaca"],
               ["data.path=rows.jsonl", "data.eval_split='train[:1]'"]):
        load_config(ok)


def test_cli_rejects_bad_key_fast_with_exit_2(tmp_path):
    result = run_cli("train", "train.lerning_rate=1e-4", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "Did you mean 'train.learning_rate'" in result.stderr
    assert not (tmp_path / "run").exists()  # failed before Hydra made a run directory


FREE_TEXTS = [
    "Rewrite this date in ISO 8601 format (YYYY-MM-DD). Answer with the date only.\nDate: July 4th, 1976",
    "What's the \"date\"?", "a,b=c [1, 2] {k: v}", "  padded  ", "", "${oc.env:HOME} costs $5 {x}", "\\${x}",
    "ends with a backslash \\", "a backslash before a quote \\'", "'", "\\\\'", "tab\there",
]


@pytest.mark.parametrize("text", FREE_TEXTS)
def test_a_prompt_reaches_infer_exactly_as_typed(text):
    """`tuneforge infer prompt=...` takes a person's text, not Hydra syntax: the CLI quotes it (parentheses and
    commas in the README's own example failed as a grammar error)."""
    from tuneforge.commands import infer  # noqa: F401  (registers the infer command's config schema)
    from tuneforge.config.compose import compose_config, quote_free_text

    args = quote_free_text(["run_dir=/some/run", f"prompt={text}"])
    assert compose_config(args, config_name="infer").prompt == text


def test_a_prompt_quoted_the_hydra_way_is_left_alone():
    from tuneforge.config.compose import quote_free_text

    assert quote_free_text(["prompt='already (quoted)'"]) == ["prompt='already (quoted)'"]


def test_cli_cfg_job_prints_the_composed_config():
    result = cli_in_process("train", "--cfg", "job", "train.max_steps=7")
    assert result.returncode == 0, result.stderr
    assert "max_steps: 7" in result.stdout and "name_or_path: embedded:smollm2-135m-instruct" in result.stdout


def test_cli_works_from_any_directory_and_multirun_dry_run(tmp_path):
    """-m multirun composes one job per grid point; dry_run loads nothing."""
    result = cli_in_process("train", "-m", "train.learning_rate=1e-4,2e-4", "dry_run=true",
                            f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("effective_batch_size: 8") == 2
    assert "learning_rate: 0.0001" in result.stdout and "learning_rate: 0.0002" in result.stdout
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1"]
