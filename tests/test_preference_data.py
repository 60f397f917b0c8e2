"""The preference data stage (data/preference.py) on the embedded tokenizer: explicit and implicit prompts, the
chat template's rendering cut by token position, and bad rows counted with their reasons."""

from __future__ import annotations

import json

import pytest

from tuneforge.config.compose import load_config
from tuneforge.config.errors import ConfigError
from tuneforge.data.preference import prepare_preferences
from tuneforge.models.tokenizer import stop_token_ids


def _prepare(tmp_path, rows, tokenizer, *overrides):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(["recipe=dpo-demo", "data=local", f"data.path={path}", "data.eval_fraction=0",
                       "data.cache=false", *overrides])
    return prepare_preferences(cfg.data, cfg.format, cfg.train, tokenizer)


def test_text_and_implicit_prompt_rows_render_like_inference(tmp_path, smollm_tokenizer):
    tok = smollm_tokenizer
    user = [{"role": "user", "content": "Capital of France?"}]
    rows = [{"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
            {"chosen": user + [{"role": "assistant", "content": "Paris"}],
             "rejected": user + [{"role": "assistant", "content": "Lyon"}]}]
    data = _prepare(tmp_path, rows, tok)
    assert data.stats["train"].rows_kept == 2
    expected_prompt = tok(tok.apply_chat_template([{"role": "system", "content": ""}] + user, tokenize=False,
                                                  add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    for row in data.train:
        assert row["prompt_ids"] == expected_prompt  # what inference sends, cut by token position
        assert tok.decode(row["chosen_ids"]) == "Paris<|im_end|>"
        assert row["rejected_ids"][-1] in stop_token_ids(tok)  # the end-of-turn token is trained


def test_bad_rows_are_counted_with_reasons_or_refused(tmp_path, smollm_tokenizer):
    good = {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"}
    rows = [good,
            {"prompt": "Capital of Italy?", "chosen": "Rome", "rejected": "Rome"},
            {"prompt": "Capital of Spain?", "chosen": "", "rejected": "Seville"},
            {"prompt": "Name the capital city of Germany, please.",
             "chosen": "Name the capital city of Germany, please. Berlin", "rejected": "Bonn"},
            {"prompt": "word " * 200, "chosen": "a", "rejected": "b"}]
    st = _prepare(tmp_path, rows, smollm_tokenizer).stats["train"]
    assert (st.rows_in, st.rows_kept) == (5, 1)
    reasons = " | ".join(st.bad_rows)
    for expected in ("same answer", "chosen is empty", "repeating the prompt", "prompt alone is"):
        assert expected in reasons
    with pytest.raises(ConfigError, match=r"row \d+ is malformed: chosen and rejected are the same answer"):
        _prepare(tmp_path, rows[:2], smollm_tokenizer, "data.on_bad_row=error")


def test_malformed_json_lines_are_dropped_and_counted_with_their_position(tmp_path, smollm_tokenizer):
    good = [{"prompt": f"Capital number {i}?", "chosen": "Paris", "rejected": "Lyon"} for i in range(3)]
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps(r) for r in good]
    path.write_text("\n".join(lines[:2] + ['{"prompt": "broken", "chosen": '] + lines[2:]) + "\n")
    cfg = load_config(["recipe=dpo-demo", "data=local", f"data.path={path}", "data.eval_fraction=0",
                       "data.cache=false"])
    st = prepare_preferences(cfg.data, cfg.format, cfg.train, smollm_tokenizer).stats["train"]
    assert (st.rows_in, st.rows_kept) == (4, 3)
    assert st.bad_rows == {f"{path}: malformed JSON line": 1} and st.bad_line_examples == [f"{path}:3"]


def test_preview_of_a_preference_task_points_at_the_doctor_in_one_line(tmp_path):
    from tests.conftest import cli_in_process

    result = cli_in_process("preview", "recipe=dpo-demo", f"preview.output_dir={tmp_path / 'preview'}")
    out = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in out
    assert len([line for line in out.splitlines() if "for task=dpo run `tuneforge doctor`" in line]) == 1
    assert not (tmp_path / "preview").exists()  # refused before anything was written
