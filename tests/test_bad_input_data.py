"""Bad data input (issue 24, the data half): each case is refused with one line that names the file and what to
fix, or dropped and counted where data.on_bad_row=drop allows it; either way no good row is lost."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from tests.conftest import cli_in_process
from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import DataConfig, FormatConfig, MixSourceConfig, TrainConfig
from tuneforge.data import sources
from tuneforge.data.pipeline import DataStats, prepare
from tuneforge.data.sources import load_source
from tuneforge.data.tokenize import IGNORE
from tuneforge.tasks.doctor import malformed_rows

TRAIN = TrainConfig(max_length=256)
GOOD = [{"prompt": f"What is {i} plus {i}?", "completion": str(2 * i)} for i in range(4)]


def _data(path, tmp_path, **kw) -> DataConfig:
    return DataConfig(**{"path": str(path), "eval_fraction": 0.0, "shuffle": False,
                         "cache_dir": str(tmp_path / "cache"), **kw})


def _lines(path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def _src(path, **kw) -> MixSourceConfig:
    return MixSourceConfig(path=str(path), format=FormatConfig(), **kw)


def _trained(tokenizer, ds) -> list[str]:
    return [tokenizer.decode([i for i, l in zip(r["input_ids"], r["labels"]) if l != IGNORE]) for r in ds]


def _refused(exc: pytest.ExceptionInfo) -> str:
    """The message is one line (the CLI prints it as is)."""
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


# --- malformed JSON lines --------------------------------------------------------------------------------------

def _with_bad_line(tmp_path) -> str:
    rows = [json.dumps(r) for r in GOOD]
    return _lines(tmp_path / "rows.jsonl", rows[:2] + ['{"prompt": "broken", "completion":'] + rows[2:])


def test_malformed_json_line_is_dropped_counted_and_located(smollm_tokenizer, tmp_path):
    path = _with_bad_line(tmp_path)
    data = prepare(_data(path, tmp_path), FormatConfig(), TRAIN, smollm_tokenizer)
    st = data.stats["train"]
    assert _trained(smollm_tokenizer, data.train) == [f"{r['completion']}<|im_end|>" for r in GOOD]
    assert st.rows_in == 5 and st.rows_kept == 4 and st.rows_dropped == 1
    assert st.bad_rows == {f"{path}: malformed JSON line": 1} and st.bad_line_examples == [f"{path}:3"]
    assert st.as_dict()["bad_line_examples"] == [f"{path}:3"]  # train.py writes as_dict() into metrics.json
    assert f"{path}:3" in st.bad_positions()
    again = prepare(_data(path, tmp_path), FormatConfig(), TRAIN, smollm_tokenizer)  # the cache keeps the report
    assert again.cache_hit and again.stats["train"] == st
    # The doctor's table says it too.
    check, = malformed_rows(SimpleNamespace(data=data, cfg=SimpleNamespace(data=_data(path, tmp_path))))
    assert check.status == "warning" and "1 of 5 rows dropped" in check.action and f"{path}:3" in check.action


def test_malformed_json_line_with_on_bad_row_error_names_file_and_line(smollm_tokenizer, tmp_path):
    path = _with_bad_line(tmp_path)
    with pytest.raises(ConfigError) as exc:
        prepare(_data(path, tmp_path, on_bad_row="error"), FormatConfig(), TRAIN, smollm_tokenizer)
    assert _refused(exc).startswith(f"{path}:3: malformed JSON line (")
    assert "data.on_bad_row=drop" in str(exc.value)


def test_dropped_lines_are_counted_in_their_own_split_of_a_directory(tmp_path):
    _lines(tmp_path / "train.jsonl", [json.dumps(r) for r in GOOD])
    held = _lines(tmp_path / "test.jsonl", [json.dumps(GOOD[0]), "not json", json.dumps(GOOD[1]), "{"])
    skipped: dict = {}
    parts = load_source(_src(tmp_path, eval_split="test"), DataConfig(eval_fraction=0.0, shuffle=False),
                        skipped=skipped)
    assert parts["train"]["prompt"] == [r["prompt"] for r in GOOD]
    assert parts["eval"]["prompt"] == [GOOD[0]["prompt"], GOOD[1]["prompt"]]
    assert skipped["train"].counts == {} and skipped["eval"].counts == {held: 2}
    assert skipped["eval"].first == [f"{held}:2", f"{held}:4"]


def test_a_file_of_only_malformed_lines_is_refused_not_emptied(tmp_path):
    path = _lines(tmp_path / "rows.jsonl", ["{", "nope"])
    with pytest.raises(ConfigError) as exc:
        load_source(_src(path), DataConfig(eval_fraction=0.0))
    assert _refused(exc).startswith(f"{path}:1: malformed JSON line")


# --- malformed rows (the file parses) --------------------------------------------------------------------------

def test_null_and_empty_fields_are_dropped_and_counted(smollm_tokenizer, tmp_path):
    rows = GOOD[:2] + [{"prompt": None, "completion": "x"}, {"prompt": "q", "completion": ""}] + GOOD[2:]
    path = _lines(tmp_path / "rows.jsonl", [json.dumps(r) for r in rows])
    data = prepare(_data(path, tmp_path), FormatConfig(), TRAIN, smollm_tokenizer)
    st = data.stats["train"]
    assert st.rows_in == 6 and st.rows_kept == 4 and st.bad_row_examples == [2, 3]
    assert st.bad_rows == {"prompt is null": 1, "completion is empty": 1} and not st.bad_line_examples
    assert _trained(smollm_tokenizer, data.train) == [f"{r['completion']}<|im_end|>" for r in GOOD]


def test_unknown_chat_role_is_dropped_and_counted(smollm_tokenizer, tmp_path):
    conv = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in GOOD]
    wizard = {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "no"}]}
    path = _lines(tmp_path / "chat.jsonl", [json.dumps(r) for r in conv[:1] + [wizard] + conv[1:]])
    fmt = FormatConfig(strategy="conversational")
    data = prepare(_data(path, tmp_path), fmt, TRAIN, smollm_tokenizer)
    st = data.stats["train"]
    assert st.rows_kept == 4 and st.bad_rows == {"unknown role 'wizard'": 1} and st.bad_row_examples == [1]
    assert _trained(smollm_tokenizer, data.train) == [f"{r['completion']}<|im_end|>" for r in GOOD]
    with pytest.raises(ConfigError, match=r"row 1 is malformed: unknown role 'wizard'"):
        prepare(_data(path, tmp_path, on_bad_row="error", cache=False), fmt, TRAIN, smollm_tokenizer)


def test_a_50000_character_row_is_truncated_and_counted(smollm_tokenizer, tmp_path):
    long = {"prompt": "Write a long answer.", "completion": "word " * 10_000}
    path = _lines(tmp_path / "rows.jsonl", [json.dumps(r) for r in [long] + GOOD])
    data = prepare(_data(path, tmp_path), FormatConfig(), TRAIN, smollm_tokenizer)
    st = data.stats["train"]
    assert len(long["completion"]) == 50_000
    assert st.rows_kept == 5 and st.truncated == 1 and not st.bad_rows
    assert len(data.train[0]["input_ids"]) == TRAIN.max_length
    assert _trained(smollm_tokenizer, data.train)[1:] == [f"{r['completion']}<|im_end|>" for r in GOOD]


# --- files that are not data -----------------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_refused(tmp_path, content):
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError) as exc:
        load_source(_src(path), DataConfig())
    assert _refused(exc) == f"data.path={str(path)!r}: {path} is empty: no rows."


def test_csv_with_only_a_header_is_refused(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("prompt,completion\n")
    with pytest.raises(ConfigError) as exc:
        load_source(_src(path), DataConfig())
    assert _refused(exc) == f"data.path={str(path)!r}: no rows in {path}."


def test_binary_file_is_refused(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + random.Random(0).randbytes(4000))
    with pytest.raises(ConfigError) as exc:
        load_source(_src(path), DataConfig())
    assert _refused(exc) == (f"data.path={str(path)!r}: {path} is not UTF-8 text (byte 0x89 at offset 0); "
                             "convert it to UTF-8.")


def test_utf16_file_is_refused(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n", encoding="utf-16-le")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(NUL byte at offset 1: binary or UTF-16\?\)"):
        load_source(_src(path), DataConfig())


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.csv"])
def test_latin1_file_is_refused(tmp_path, name):
    path = tmp_path / name
    good = "prompt,completion\nq,a\n" if name.endswith(".csv") else json.dumps(GOOD[0]) + "\n"
    at = len(good)
    text = good + ("café,au lait\n" if name.endswith(".csv") else '{"prompt": "café", "completion": "x"}\n')
    path.write_bytes(text.encode("latin-1"))
    offset = at + text[at:].index("é")
    with pytest.raises(ConfigError) as exc:
        load_source(_src(path), DataConfig(eval_fraction=0.0))
    assert _refused(exc) == (f"data.path={str(path)!r}: {path} is not UTF-8 text (byte 0xe9 at offset {offset}); "
                             "convert it to UTF-8.")


def test_non_utf8_byte_past_the_checked_head_is_still_named(tmp_path, monkeypatch):
    """Only the head is decoded up front; a bad byte further on fails the load, which then names it too."""
    monkeypatch.setattr(sources, "_HEAD_BYTES", 8)
    path = tmp_path / "rows.csv"
    path.write_bytes("prompt,completion\nq,a\ncafé,x\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"rows\.csv is not UTF-8 text \(byte 0xe9 at offset 25\)"):
        load_source(_src(path), DataConfig(eval_fraction=0.0))


# --- columns ---------------------------------------------------------------------------------------------------

def test_missing_columns_are_named_with_the_mapping_that_fixes_them(smollm_tokenizer, tmp_path):
    path = _lines(tmp_path / "rows.jsonl", [json.dumps({"question": r["prompt"], "answer": r["completion"]})
                                            for r in GOOD])
    with pytest.raises(ConfigError) as exc:
        prepare(_data(path, tmp_path), FormatConfig(), TRAIN, smollm_tokenizer)
    msg = _refused(exc)
    assert "needs column(s) ['prompt', 'completion']" in msg and "['question', 'answer']" in msg
    assert "+data.columns.question=prompt" in msg and "+data.columns.answer=completion" in msg


def test_one_row_csv_with_wrong_columns_gets_the_column_message_first(tmp_path):
    """The row count (too few to hold out data.eval_fraction) is the wrong fix while the columns are wrong."""
    path = tmp_path / "one.csv"
    path.write_text("q,a\nx,y\n")
    with pytest.raises(ConfigError) as exc:
        load_source(_src(path), DataConfig(eval_fraction=0.1))
    assert "needs column(s) ['prompt', 'completion']" in _refused(exc) and "too few" not in str(exc.value)
    path.write_text("prompt,completion\nx,y\n")  # right columns: now the row count is what to fix
    with pytest.raises(ConfigError, match="has 1 row.*too few to hold out data.eval_fraction=0.1"):
        load_source(_src(path), DataConfig(eval_fraction=0.1))


# --- through the CLI -------------------------------------------------------------------------------------------

def test_cli_refuses_a_binary_file_with_one_line_and_exit_2(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(random.Random(1).randbytes(2000))
    proc = cli_in_process("preview", "data=local", f"data.path={path}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if str(path) in line]
    assert len(lines) == 1 and "is not UTF-8 text" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_data_stats_from_an_older_cache_still_load():
    """Cached stats written before bad_line_examples existed read back with an empty list."""
    st = DataStats(**{"rows_in": 3, "rows_kept": 3, "bad_rows": {}, "bad_row_examples": []})
    assert st.bad_line_examples == [] and st.bad_positions() == ""
