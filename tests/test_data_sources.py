"""Sources: every local file type, directories, globs, slices, held-out splits, renames, mixes, bad files."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import DataConfig, FormatConfig, MixSourceConfig
from tuneforge.data import sources
from tuneforge.data.mix import mix_counts
from tuneforge.data.sources import ROW, data_sources, load_source

ROWS = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(10)]


def _src(path, fmt=None, **kw) -> MixSourceConfig:
    return MixSourceConfig(path=str(path), format=fmt or FormatConfig(), **kw)


def _cfg(**kw) -> DataConfig:
    return DataConfig(**{"eval_fraction": 0.0, "shuffle": False, **kw})


def _write(path, rows=ROWS):
    suffix = path.suffix
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix in (".csv", ".tsv"):
        pd.DataFrame(rows).to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif suffix == ".txt":
        path.write_text("".join(r["prompt"] + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".tsv", ".parquet"])
def test_each_file_type_loads_the_same_rows(tmp_path, suffix):
    ds = load_source(_src(_write(tmp_path / f"rows{suffix}")), _cfg())["train"]
    assert ds.column_names == ["prompt", "completion", ROW]
    assert ds["prompt"] == [r["prompt"] for r in ROWS] and ds["completion"][3] == "answer 3"


def test_txt_gives_a_text_column(tmp_path):
    ds = load_source(_src(_write(tmp_path / "rows.txt"), FormatConfig(strategy="text")), _cfg())["train"]
    assert ds["text"] == [r["prompt"] for r in ROWS]


def test_directory_splits_by_file_name_and_eval_split(tmp_path):
    _write(tmp_path / "train.jsonl")
    _write(tmp_path / "test.jsonl", ROWS[:3])
    parts = load_source(_src(tmp_path, eval_split="test"), _cfg())
    assert len(parts["train"]) == 10 and len(parts["eval"]) == 3


def test_eval_split_may_be_a_file(tmp_path):
    train, held = _write(tmp_path / "a.jsonl"), _write(tmp_path / "held.jsonl", ROWS[:2])
    parts = load_source(_src(train, eval_split=str(held)), _cfg())
    assert len(parts["eval"]) == 2 and parts["eval"]["prompt"] == ["question 0", "question 1"]


def test_glob_and_slice(tmp_path):
    _write(tmp_path / "part1.jsonl", ROWS[:4])
    _write(tmp_path / "part2.jsonl", ROWS[4:])
    assert len(load_source(_src(tmp_path / "part*.jsonl"), _cfg())["train"]) == 10
    ds = load_source(_src(tmp_path / "part*.jsonl", split="train[:3]"), _cfg())["train"]
    assert ds["prompt"] == ["question 0", "question 1", "question 2"]


def test_builtin_slices_like_datasets():
    cfg = _cfg(builtin_rows=20)
    full = load_source(_src("builtin:dates"), cfg)["train"]
    part = load_source(_src("builtin:dates", split="train[50%:]"), cfg)["train"]
    assert len(part) == 10 and part["prompt"] == full["prompt"][10:]
    with pytest.raises(ConfigError, match="train or a slice"):
        load_source(_src("builtin:dates", split="validation"), cfg)


def test_eval_fraction_shuffle_seed_and_cap(tmp_path):
    path = _write(tmp_path / "rows.jsonl")
    a = load_source(_src(path, max_samples=4), _cfg(eval_fraction=0.2, shuffle=True, seed=1))
    b = load_source(_src(path, max_samples=4), _cfg(eval_fraction=0.2, shuffle=True, seed=1))
    c = load_source(_src(path), _cfg(eval_fraction=0.0, shuffle=True, seed=2))
    assert len(a["train"]) == 4 and len(a["eval"]) == 2
    assert a["train"]["prompt"] == b["train"]["prompt"]  # seeded: reproducible
    assert c["train"]["prompt"] != [r["prompt"] for r in ROWS]  # shuffled
    assert not set(a["train"][ROW]) & set(a["eval"][ROW])  # held-out rows are not trained


def test_columns_are_renamed_and_bad_renames_are_explained(tmp_path):
    path = _write(tmp_path / "rows.jsonl", [{"sentence": "s", "translation_extra": "t"}])
    ds = load_source(_src(path, columns={"sentence": "prompt", "translation_extra": "completion"}), _cfg())["train"]
    assert ds["prompt"] == ["s"] and ds["completion"] == ["t"]
    with pytest.raises(ConfigError, match=r"renames \['sentnce'\].*available columns: \['sentence', 'translation_extra'"):
        load_source(_src(path, columns={"sentnce": "prompt"}), _cfg())


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:3: malformed JSON line"):
        load_source(_src(path), _cfg(on_bad_row="error"))


def test_malformed_jsonl_row_after_a_good_one_names_file_and_line(tmp_path):
    """Here Arrow's reader fails first and datasets' fallback parser raises a ValueError, not an Arrow error."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt":\n{"prompt": "c"}\n')
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: malformed JSON line"):
        load_source(_src(path), _cfg(on_bad_row="error"))


def test_malformed_json_array_names_file_and_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"prompt": "a", "completion": "b"},\n{"prompt": "c" "completion": "d"}\n]')
    with pytest.raises(ConfigError, match=r"bad\.json:3: malformed JSON"):
        load_source(_src(path), _cfg())


def test_mixed_file_types_and_empty_directories_are_refused(tmp_path):
    _write(tmp_path / "a.jsonl")
    _write(tmp_path / "b.csv")
    with pytest.raises(ConfigError, match="mixes file types"):
        load_source(_src(tmp_path), _cfg())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no data files"):
        load_source(_src(tmp_path / "empty"), _cfg())


def test_hub_sources_pass_path_name_split_revision(monkeypatch):
    seen = {}

    def fake_load_dataset(path, name=None, split=None, revision=None):
        seen.update(path=path, name=name, split=split, revision=revision)
        from datasets import Dataset

        return Dataset.from_list(ROWS)

    monkeypatch.setattr(sources, "load_dataset", fake_load_dataset)
    src = MixSourceConfig(path="org/data", name="cfg", split="train[:10]", revision="abc123", format=FormatConfig())
    assert len(load_source(src, _cfg())["train"]) == 10
    assert seen == {"path": "org/data", "name": "cfg", "split": "train[:10]", "revision": "abc123"}


def test_unreachable_hub_dataset_is_a_config_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(sources, "load_dataset", offline)
    with pytest.raises(ConfigError, match="not a local file, directory or glob"):
        load_source(MixSourceConfig(path="org/nothing", format=FormatConfig()), _cfg())


def test_single_path_is_a_mix_of_one():
    fmt = FormatConfig(strategy="alpaca")
    (src,) = data_sources(DataConfig(path="x.jsonl", columns={"a": "b"}), fmt)
    assert src.path == "x.jsonl" and src.columns == {"a": "b"} and src.format is fmt


def test_mix_counts_follow_weights_and_caps():
    assert mix_counts([100, 100], [0.75, 0.25], 40) == [30, 10]
    # Without a total: the largest mix no source runs out of (the 0.5 source has 50 rows -> 100 in all).
    assert mix_counts([50, 1000], [0.5, 0.5], None) == [50, 50]
    # No weights: sources in proportion to their size, capped in total.
    assert mix_counts([30, 10], None, 20) == [15, 5]
    assert mix_counts([30, 10], None, None) == [30, 10]
