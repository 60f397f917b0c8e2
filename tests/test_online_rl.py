"""Online RL (task=grpo|rloo) without a model: the reward functions (built-ins, the strict loader, the per-batch output
check), the prompt data stage, the config rules, the console line and the no-signal stop. The trainers themselves run
in tests/test_online_rl_e2e.py."""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import pytest

from tuneforge.config.compose import load_config
from tuneforge.config.errors import ConfigError
from tuneforge.eval import rewards as R

GRPO = ["recipe=grpo-demo"]


def _entries(*specs):
    return [SimpleNamespace(name=s[0], weight=s[1] if len(s) > 1 else 1.0, kwargs=s[2] if len(s) > 2 else {})
            for s in specs]


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    """A reward file in the working directory, as a user's next to their recipe (imported from there, as TRL does)."""
    monkeypatch.chdir(tmp_path)
    name = f"user_rewards_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(
        "def good(prompts, completions, answer, **kwargs):\n"
        "    return [float(c == a) for c, a in zip(completions, answer)]\n"
        "def no_kwargs(prompts, completions):\n"
        "    return [0.0 for _ in completions]\n"
        "def short(prompts, completions, **kwargs):\n"
        "    return [1.0]\n"
        "def nothing(prompts, completions, **kwargs):\n"
        "    return [None for _ in completions]\n"
        "def nan(prompts, completions, **kwargs):\n"
        "    return [float('nan') for _ in completions]\n"
        "def inf(prompts, completions, **kwargs):\n"
        "    return [1.0] * (len(completions) - 1) + [float('inf')]\n"
        "def text(prompts, completions, **kwargs):\n"
        "    return ['1' for _ in completions]\n"
        "NOT_A_FUNCTION = 3\n"
    )
    yield name
    sys.modules.pop(name, None)
    if str(tmp_path) in sys.path:
        sys.path.remove(str(tmp_path))


def test_a_users_reward_file_in_the_working_directory_loads_and_is_called_with_the_rows_columns(user_module):
    (reward,) = R.load_rewards(_entries((f"{user_module}:good", 2.0)), ["answer"])
    assert (reward.name, reward.weight) == ("good", 2.0)
    fn = R.checked(reward)
    assert fn.__name__ == "good"  # TRL logs rewards/NAME
    assert fn(prompts=["p", "p"], completions=["a", "b"], answer=["a", "a"], completion_ids=[[1], [2]],
              trainer_state=None, log_extra=None, log_metric=None) == [1.0, 0.0]


@pytest.mark.parametrize("name, columns, message", [
    ("no_such_module_xyz:f", ["answer"], "cannot import module 'no_such_module_xyz'"),
    ("{mod}:missing", ["answer"], "has no 'missing'; its functions: good"),
    ("{mod}:NOT_A_FUNCTION", ["answer"], "is a int, not a function"),
    ("{mod}:no_kwargs", ["answer"], "cannot be called as a reward function"),
    ("{mod}:good", ["reference"], "missing a required argument: 'answer'"),
    ("iso_dat", ["answer"], "Did you mean 'iso_date'"),
    ("iso_date", ["reference"], "reads column 'answer'"),
])
def test_rewards_that_cannot_be_called_are_refused_before_any_weights_load(user_module, name, columns, message):
    with pytest.raises(ConfigError, match="rewards\\[0\\]") as err:
        R.load_rewards(_entries((name.format(mod=user_module),)), columns)
    assert message in str(err.value)


def test_reward_kwargs_are_bound_and_checked():
    (reward,) = R.load_rewards(_entries(("exact_match", 1.0, {"column": "gold"})), ["gold"])
    assert reward(["p"], [" The 2021-03-05 "], gold=["2021-03-05 the"]) == [1.0]
    with pytest.raises(ConfigError, match="takes no 'colum'"):
        R.load_rewards(_entries(("exact_match", 1.0, {"colum": "gold"})), ["gold"])
    with pytest.raises(ConfigError, match="already an argument"):
        R.load_rewards(_entries(("regex", 1.0, {"completions": "x"})), [])
    (over,) = R.load_rewards(_entries(("overlong",)), [], defaults={"max_tokens": 8})
    assert over.kwargs == {"max_tokens": 8}  # train.max_completion_length unless the entry says otherwise
    with pytest.raises(ConfigError, match="rewards is empty"):
        R.load_rewards([], [])


@pytest.mark.parametrize("fn, message", [
    ("short", "returned 1 values for 3 completions"),
    ("nothing", "returned None for every completion"),
    ("nan", "returned nan for completion 0"),
    ("inf", "returned inf for completion 2"),
    ("text", "returned '1' for completion 0"),
])
def test_reward_outputs_are_checked_at_every_batch_naming_the_reward(user_module, fn, message):
    (reward,) = R.load_rewards(_entries((f"{user_module}:{fn}",)), [])
    state = SimpleNamespace(global_step=7)
    with pytest.raises(R.RewardOutputError, match=f"reward '{fn}' \\(rewards\\[0\\]\\) at step 7") as err:
        R.checked(reward)(prompts=["p"] * 3, completions=["a", "b", "c"], completion_ids=[[]] * 3,
                          trainer_state=state, log_extra=None, log_metric=None)
    assert message in str(err.value)


def test_builtin_rewards():
    p = ["q"] * 6
    completions = ["2021-03-05", "The date is 2021-03-05.", "2021-05-03", "March 5, 2021", "1999-01-01", "none"]
    assert R.iso_date(p, completions, answer=["2021-03-05"] * 6) == pytest.approx([1.0, 0.5, 0.1, 0.1, 0.0, 0.0])
    assert R.iso_date(p, completions, answer=["2021-03-05"] * 6, partial=False) == [1, 0, 0, 0, 0, 0]
    assert R.date_equivalent(p[:4], completions[:4], answer=["2021-03-05"] * 4) == [1.0, 0.0, 0.0, 1.0]
    assert R.regex(p[:3], completions[:3], pattern=r"\d{4}-\d{2}-\d{2}") == [1.0, 0.0, 1.0]
    assert R.number(p[:3], ["It is 42.", "4,200", "x"], answer=["42", "4200", "1"]) == [1.0, 1.0, 0.0]
    assert R.overlong(p[:4], [""] * 4, completion_ids=[[0] * n for n in (4, 6, 7, 8)], max_tokens=8, buffer=2) \
        == [0.0, 0.0, -0.5, -1.0]
    assert R.exact_match(p[:2], ["An Apple!", "apple pie"], answer=["apple", "apple"]) == [1.0, 0.0]


def test_weighted_total_is_trls_nansum():
    rewards = [R.Reward("a", R.regex, 1.0, {}, "rewards[0]"), R.Reward("b", R.regex, 0.5, {}, "rewards[1]")]
    assert R.weighted_total(rewards, {"a": [1.0, None], "b": [2.0, 4.0]}) == [2.0, 2.0]


# --- config -------------------------------------------------------------------------------------------------------

def test_grpo_and_rloo_configs_are_their_trainer_configs_fields():
    cfg = load_config([*GRPO, "train.loss_type=dr_grpo", "train.importance_sampling_level=sequence",
                       "train.beta=0.04", "train.scale_rewards=none"])
    assert (cfg.task, cfg.train.loss_type, cfg.train.beta, cfg.format.strategy) == ("grpo", "dr_grpo", 0.04, "prompt")
    from tuneforge.config.library_args import trainer_arguments

    args = trainer_arguments(cfg, __import__("pathlib").Path("/nonexistent"))
    # reward_weights: the grpo-demo recipe's rewards[].weight (iso_date 1.0, overlong 0.5)
    assert type(args).__name__ == "GRPOConfig" and args.reward_weights == [1.0, 0.5] and not args.remove_unused_columns
    rloo = trainer_arguments(load_config([*GRPO, "task=rloo", "train.normalize_advantages=true"]),
                             __import__("pathlib").Path("/nonexistent"))
    assert type(rloo).__name__ == "RLOOConfig" and rloo.normalize_advantages


@pytest.mark.parametrize("overrides, message", [
    (["task=grpo", "format=prompt"], "`rewards` is empty"),
    (["rewards=[{name:exact_match}]"], "rewards are for task=grpo|rloo"),
    ([*GRPO, "train.use_vllm=true"], "train.use_vllm=true: vLLM generates on CUDA GPUs only"),
    ([*GRPO, "train.num_generations=1"], "at least 2 completions"),
    ([*GRPO, "rewards=[{name:'a b'}]"], "give a built-in reward's name or module:function"),
    ([*GRPO, "format=instruction"], "format.strategy=prompt"),
    ([*GRPO, "peft=none", "quant=none"], "needs LoRA"),
    (["train.num_generations=4"], "task=sft trains with SFTConfig"),
    ([*GRPO, "train.reward_weights=[1.0]"], "rewards"),
])
def test_online_rl_refusals(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("|", "\\|").replace("`", "`").replace(".", "\\.")
                       .replace("(", "\\(").replace(")", "\\)")):
        load_config(overrides)


# --- the prompt data stage ----------------------------------------------------------------------------------------

def test_prompt_rows_render_what_inference_sends_and_keep_every_other_column(tmp_path, smollm_tokenizer):
    import json

    from tuneforge.config.schemas import DataConfig, FormatConfig, TrainConfig
    from tuneforge.data.prompts import prepare_prompts, reward_columns
    from tuneforge.eval.inference import Rendered, prompt_ids

    rows = [{"prompt": f"Say {i}", "answer": str(i), "tests": [i, i + 1]} for i in range(8)]
    rows += [{"messages": [{"role": "user", "content": "Say 9"}], "answer": "9", "tests": [9]},
             {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "answer": "",
              "tests": []}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = prepare_prompts(DataConfig(path=str(path), eval_fraction=0.0, shuffle=False, cache=False),
                           FormatConfig(strategy="prompt", system_prompt=""), TrainConfig(max_length=64),
                           smollm_tokenizer)
    assert sorted(reward_columns(data)) == ["answer", "tests"] and len(data.train) == 9
    assert list(data.stats["train"].bad_rows.values()) == [1]  # the row ending with an answer
    by_answer = {r["answer"]: r for r in data.train}
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "Say 9"}]
    # The prompt TRL tokenizes is exactly what the inference helper sends for the same turns.
    assert smollm_tokenizer(by_answer["9"]["prompt"])["input_ids"] == prompt_ids(smollm_tokenizer, messages, 1024)
    assert prompt_ids(smollm_tokenizer, Rendered(by_answer["9"]["prompt"]), 1024) == \
        prompt_ids(smollm_tokenizer, messages, 1024)
    assert by_answer["3"]["tests"] == [3, 4]


def test_a_column_named_as_trls_own_arguments_is_refused(tmp_path, smollm_tokenizer):
    import json

    from tuneforge.config.schemas import DataConfig, FormatConfig, TrainConfig
    from tuneforge.data.prompts import prepare_prompts

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    with pytest.raises(ConfigError, match="data.columns.completion=answer"):
        prepare_prompts(DataConfig(path=str(path), eval_fraction=0.0, cache=False), FormatConfig(strategy="prompt"),
                        TrainConfig(), smollm_tokenizer)


# --- console and the no-signal stop -------------------------------------------------------------------------------

def test_the_console_line_of_an_online_rl_step():
    from tuneforge.runs.console import step_line

    logs = {"loss": 1e-8, "grad_norm": 0.3, "learning_rate": 1e-4, "reward": 0.42, "reward_std": 0.31,
            "rewards/iso_date/mean": 0.4, "rewards/iso_date/std": 0.3, "rewards/overlong/mean": -0.1,
            "rewards/overlong/std": 0.2, "frac_reward_zero_std": 0.25, "kl": 0.002, "completions/mean_length": 12.5,
            "completions/clipped_ratio": 0.1, "entropy": 1.0, "clip_ratio/low_mean": 0.0}
    line = step_line(5, 20, logs)
    assert line.startswith("step 5/20: reward 0.420\u00b10.310 (iso_date 0.400\u00b10.300, overlong -0.100\u00b10.200)")
    assert "no-signal 0.25, kl 0.002, length 12.5, clipped 0.1, loss 1e-08" in line and "entropy" not in line


def test_no_signal_for_patience_logged_steps_stops_the_run():
    from tuneforge.runs.faults import StopOnNoSignal, no_signal_message

    guard = StopOnNoSignal(patience=2)
    control = SimpleNamespace(should_training_stop=False)
    for step, frac in [(1, 1.0), (2, 0.5), (3, 1.0), (4, 1.0)]:
        guard.on_log(None, SimpleNamespace(global_step=step), control, logs={"frac_reward_zero_std": frac})
        assert control.should_training_stop == (step == 4)
    assert (guard.first_step, guard.tripped_at) == (3, 4)
    assert "train.no_signal_patience" in no_signal_message(guard)
    inert = StopOnNoSignal(patience=1)  # other tasks log no such key
    inert.on_log(None, SimpleNamespace(global_step=1), control, logs={"loss": math.nan})
    assert inert.tripped_at is None


def test_a_sweep_optimizes_a_reward():
    from tuneforge.runs.objective import objective

    metrics = {"eval_after": {"reward": 0.6, "rewards/iso_date": 0.5, "exact_match": 0.25}}
    assert objective(metrics, "rewards/iso_date") == 0.5 and objective(metrics, "reward") == 0.6


def test_held_out_answers_reach_length_rewards_as_token_ids(smollm_dir):
    """The held-out table scores length rewards (overlong) on the answers' token ids, as TRL passes them in training:
    an answer that ended gets its EOS, one cut at max_new_tokens does not (it was 0 for every answer before)."""
    from transformers import AutoTokenizer

    from tuneforge.eval.inference import GenerationSettings
    from tuneforge.tasks.online_rl import OnlineRL

    task = object.__new__(OnlineRL)
    task.tokenizer, task.gen = AutoTokenizer.from_pretrained(smollm_dir), GenerationSettings(max_new_tokens=12)
    ids = task._answer_ids(["2001-02-03", "2001-02-03 is the date you asked for"])
    eos = task.tokenizer.eos_token_id
    assert ids[0] == task.tokenizer("2001-02-03", add_special_tokens=False)["input_ids"] + [eos] and len(ids[0]) == 11
    assert len(ids[1]) == 12 and eos not in ids[1]
    assert R.overlong([""] * 2, ["", ""], completion_ids=ids, max_tokens=12, buffer=1) == [0.0, -1.0]


def test_the_reward_doctor_warns_of_cut_completions_unless_a_length_reward_penalizes_them():
    from tuneforge.tasks.doctor import OK, WARNING
    from tuneforge.tasks.reward_doctor import RewardDoctorReport, checks

    stats = {"mean": 0.1, "std": 0.1, "min": 0.0, "max": 0.5}

    def cut(*names):
        report = RewardDoctorReport(8, 4, {n: stats for n in (*names, "total")}, 0.1, {}, 0.81, [])
        return next(c for c in checks(report, 0.5, 16) if c.name == "completions cut")

    alone = cut("iso_date")
    assert alone.status == WARNING and "reward brevity (rewards: overlong)" in alone.action
    with_length = cut("iso_date", "overlong")
    assert with_length.status == OK and "81% cut at 16 tokens; the overlong reward penalizes them" == with_length.action
