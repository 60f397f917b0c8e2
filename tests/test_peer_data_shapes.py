"""The data shapes Axolotl's and LLaMA-Factory's data sets use, through the real preference data stage on the
embedded tokenizer: answers that are one message object ({role, content} or ShareGPT {from, value}), LLaMA-Factory's
ranking ShareGPT rows read through `data.path=DIR/dataset_info.json:NAME`, and argilla-style pairs whose
conversations repeat the prompt turns (the shared prefix is the prompt)."""

from __future__ import annotations

import json

import pytest

from tuneforge.config.compose import load_config
from tuneforge.config.errors import ConfigError
from tuneforge.data.preference import prepare_preferences
from tuneforge.models.tokenizer import stop_token_ids


def _generation_prompt(tok, turns):
    text = tok.apply_chat_template([{"role": "system", "content": ""}] + turns, tokenize=False,
                                   add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def _check(data, tok, prompt_turns, chosen="Paris", rejected="Lyon"):
    assert data.stats["train"].rows_kept == data.stats["train"].rows_in > 0, data.stats["train"].bad_rows
    for row in data.train:
        assert row["prompt_ids"] == _generation_prompt(tok, prompt_turns)
        assert tok.decode(row["chosen_ids"]) == f"{chosen}<|im_end|>"
        assert tok.decode(row["rejected_ids"]) == f"{rejected}<|im_end|>"
        assert row["chosen_ids"][-1] in stop_token_ids(tok)


def _prepare(tmp_path, rows, tok, *overrides, path_override=None):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(["recipe=dpo-demo", "data=local", f"data.path={path_override or path}",
                       "data.eval_fraction=0", "data.cache=false", *overrides])
    return prepare_preferences(cfg.data, cfg.format, cfg.train, tok)


USER = [{"role": "user", "content": "Capital of France?"}]


@pytest.mark.parametrize("chosen,rejected", [
    ({"role": "assistant", "content": "Paris"}, {"role": "assistant", "content": "Lyon"}),
    ({"from": "gpt", "value": "Paris"}, {"from": "gpt", "value": "Lyon"}),
])
def test_an_answer_that_is_one_message_object(tmp_path, smollm_tokenizer, chosen, rejected):
    rows = [{"prompt": "Capital of France?", "chosen": chosen, "rejected": rejected}]
    _check(_prepare(tmp_path, rows, smollm_tokenizer), smollm_tokenizer, USER)


def test_llamafactory_ranking_sharegpt_rows_through_dataset_info(tmp_path, smollm_tokenizer):
    rows = [{"conversations": [{"from": "human", "value": "Capital of France?"}],
             "chosen": {"from": "gpt", "value": "Paris"}, "rejected": {"from": "gpt", "value": "Lyon"}}]
    (tmp_path / "dpo_demo.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"dpo_demo": {
        "file_name": "dpo_demo.json", "ranking": True, "formatting": "sharegpt",
        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}}))
    spec = f"{tmp_path / 'dataset_info.json'}:dpo_demo"
    cfg = load_config(["recipe=dpo-demo", "data=local", f"data.path={spec}"])
    assert cfg.data.path == str(tmp_path / "dpo_demo.json") and cfg.format.prompt_column == "conversations"
    _check(_prepare(tmp_path, [], smollm_tokenizer, path_override=spec), smollm_tokenizer, USER)


def test_argilla_pairs_repeating_the_prompt_turns_share_it(tmp_path, smollm_tokenizer):
    turns = [{"role": "user", "content": "I am planning a trip."}, {"role": "assistant", "content": "Where to?"},
             {"role": "user", "content": "Capital of France?"}]
    rows = [{"chosen": turns + [{"role": "assistant", "content": "Paris"}],
             "rejected": turns + [{"role": "assistant", "content": "Lyon"}]}]
    _check(_prepare(tmp_path, rows, smollm_tokenizer), smollm_tokenizer, turns)


def test_an_sft_data_set_from_dataset_info_with_its_column_mapping(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps([{"q": "2+2?", "a": "4"}]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "mine": {"file_name": "rows.json", "columns": {"prompt": "q", "response": "a"}},
        "chat": {"file_name": "rows.json", "formatting": "sharegpt", "tags": {"role_tag": "speaker"}}}))
    cfg = load_config(["data=local", f"data.path={tmp_path / 'dataset_info.json'}:mine"])
    assert (cfg.format.strategy, cfg.format.instruction_column, cfg.format.output_column) == ("alpaca", "q", "a")
    for spec, why in [("mine2", "has no data set 'mine2' (it has: chat, mine)"),
                      ("chat", "message keys {'role_tag': 'speaker', 'content_tag': 'value'}")]:
        with pytest.raises(ConfigError, match=__import__("re").escape(why)):
            load_config(["data=local", f"data.path={tmp_path / 'dataset_info.json'}:{spec}"])


@pytest.mark.parametrize("how", ["truncate", "drop"])
def test_rows_longer_than_max_length_are_truncated_or_dropped_and_counted(tmp_path, smollm_tokenizer, how):
    """data.on_long_row: Axolotl drops over-long rows, tuneforge truncates by default; both are counted."""
    from tuneforge.data.pipeline import prepare

    rows = [{"prompt": f"Say hi {i}", "completion": "hi"} for i in range(4)] + \
           [{"prompt": "word " * 120, "completion": "ok"} for _ in range(2)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(["data=local", f"data.path={path}", "data.eval_fraction=0", "data.cache=false",
                       "train.max_length=64", f"data.on_long_row={how}"])
    st = prepare(cfg.data, cfg.format, cfg.train, smollm_tokenizer).stats["train"]
    if how == "drop":
        assert (st.rows_in, st.rows_kept, st.dropped_long, st.truncated) == (6, 4, 2, 0)
    else:  # truncated from the end (keep_start): the answer is cut off, so those rows have nothing to train
        assert (st.rows_in, st.truncated + st.fully_masked >= 2, st.dropped_long) == (6, True, 0)


def test_long_preference_rows_are_dropped_and_counted(tmp_path, smollm_tokenizer):
    rows = [{"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
            {"prompt": "Capital of Spain?", "chosen": "Madrid " * 80, "rejected": "Seville"}]
    st = _prepare(tmp_path, rows, smollm_tokenizer, "train.max_length=64", "data.on_long_row=drop").stats["train"]
    assert (st.rows_in, st.rows_kept, st.dropped_long) == (2, 1, 1)
