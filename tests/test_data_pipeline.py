"""The data stage end to end: every strategy through the real tokenizer, bad rows, mixes, the cache."""

from __future__ import annotations

import copy
import json
import logging

import pytest
from conftest import shared

from tests.mask_oracles import TRIMMING_TEMPLATE, labels_from_spans, tokenize_text_rows
from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import CollatorConfig, DataConfig, FormatConfig, MixSourceConfig, TrainConfig
from tuneforge.data.pipeline import prepare
from tuneforge.data.render import render_conversations
from tuneforge.data.text_masks import encode, encoding_span_labels, offsets_of, span_labels
from tuneforge.data.tokenize import IGNORE, assistant_spans
from tuneforge.models.tokenizer import stop_token_ids

TRAIN = TrainConfig(max_length=256)


def trained_texts(tokenizer, ds):
    return [tokenizer.decode([i for i, l in zip(r["input_ids"], r["labels"]) if l != IGNORE]) for r in ds]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _data(path, tmp_path, **kw):
    return DataConfig(**{"path": str(path), "eval_fraction": 0.0, "shuffle": False,
                         "cache_dir": str(tmp_path / "cache"), **kw})


QA = [{"prompt": f"What is {i} plus {i}?", "completion": str(2 * i)} for i in range(6)]


@pytest.mark.parametrize("strategy, rows, extra, expected", [
    ("instruction", QA, {}, "4<|im_end|>"),
    ("conversational", [{"messages": [{"role": "user", "content": q["prompt"]},
                                      {"role": "assistant", "content": q["completion"]}]} for q in QA], {}, "4<|im_end|>"),
    ("alpaca", [{"instruction": q["prompt"], "input": "", "output": q["completion"]} for q in QA], {}, "4<|im_end|>"),
    ("text", [{"text": f"Q: {q['prompt']}\nA: {q['completion']}"} for q in QA], {"response_template": "A:"},
     " 4<|im_end|>"),
    ("template", QA, {"template": "Q: {prompt}\nA: {completion}", "response_template": "A:"}, " 4<|im_end|>"),
])
def test_every_strategy_trains_exactly_the_completion_and_eos(smollm_tokenizer, tmp_path, strategy, rows, extra, expected):
    path = _jsonl(tmp_path / "rows.jsonl", rows)
    data = prepare(_data(path, tmp_path), FormatConfig(strategy=strategy, **extra), TRAIN, smollm_tokenizer)
    assert len(data.train) == 6 and data.train.column_names == ["input_ids", "labels"]
    assert trained_texts(smollm_tokenizer, data.train)[2] == expected


def test_multi_turn_sharegpt_trains_every_assistant_turn(smollm_tokenizer, tmp_path):
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."}]
    path = _jsonl(tmp_path / "chat.jsonl", [{"conversations": conv}])
    data = prepare(_data(path, tmp_path), FormatConfig(strategy="conversational", messages_column="conversations"),
                   TRAIN, smollm_tokenizer)
    assert trained_texts(smollm_tokenizer, data.train) == ["Hello!<|im_end|>Paris.<|im_end|>"]


def test_collator_lm_trains_every_token(smollm_tokenizer, tmp_path):
    path = _jsonl(tmp_path / "rows.jsonl", QA)
    data = prepare(_data(path, tmp_path), FormatConfig(), TRAIN, smollm_tokenizer, CollatorConfig(name="lm"))
    row = data.train[0]
    assert row["labels"] == row["input_ids"]


def test_render_markers_match_prefix_renders(smollm_tokenizer):
    """The one-pass marker render gives the same text and spans as the prefix-render method, multi-turn included."""
    tok = smollm_tokenizer
    stops = [tok.convert_ids_to_tokens(i) for i in stop_token_ids(tok)]
    convs = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "More?"}, {"role": "assistant", "content": "  padded  "}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    ]
    for conv, (text, spans) in zip(convs, render_conversations(tok, convs, stops)):
        ref_text, ref_spans = assistant_spans(tok, conv, stops)
        assert text == ref_text and spans == [list(s) for s in ref_spans]


def test_render_falls_back_when_the_template_rewrites_content(smollm_tokenizer):
    """A template that trims content: marker positions cannot be trusted, the exact method answers."""
    tok = copy.deepcopy(smollm_tokenizer)
    tok.chat_template = TRIMMING_TEMPLATE
    stops = ["<|im_end|>"]
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  spaced answer  "}]
    (text, spans), = render_conversations(tok, [conv], stops)
    assert text[spans[0][0]:spans[0][1]] == "spaced answer<|im_end|>"


def test_span_labels_equal_the_reference_rule(smollm_tokenizer):
    texts = ["Q: what?\nA: 42<|im_end|>", "héllo wörld 🙂 ok", "a  b\n\n c"]
    spans = [[[11, 24]], [[3, 9], [12, 14]], [[1, 4]]]
    ids, encodings = encode(smollm_tokenizer, texts)
    for i, enc, s in zip(ids, encodings, spans):
        offsets = offsets_of(enc)
        assert span_labels(i, offsets, s) == labels_from_spans(i, offsets, s)
        assert encoding_span_labels(i, enc, s) == labels_from_spans(i, offsets, s)
    # A boundary no token covers: the lookup declines and the offsets decide.
    assert encoding_span_labels(ids[0], encodings[0], [[11, 99]]) is None


def test_bad_rows_are_counted_with_reasons_and_first_indices(smollm_tokenizer, tmp_path, caplog):
    rows = list(QA)
    rows[1] = {"prompt": "q", "completion": ""}
    rows[4] = {"prompt": None, "completion": "x"}
    path = _jsonl(tmp_path / "rows.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        data = prepare(_data(path, tmp_path), FormatConfig(), TRAIN, smollm_tokenizer)
    st = data.stats["train"]
    assert st.rows_in == 6 and st.rows_kept == 4 and st.rows_dropped == 2
    assert st.bad_rows == {"completion is empty": 1, "prompt is null": 1} and st.bad_row_examples == [1, 4]
    assert "dropped 2 malformed rows" in caplog.text and "[1, 4]" in caplog.text
    with pytest.raises(ConfigError, match=r"row 1 is malformed: completion is empty \(data.on_bad_row=error"):
        prepare(_data(path, tmp_path, on_bad_row="error", cache=False), FormatConfig(), TRAIN, smollm_tokenizer)


def test_empty_after_filtering_is_an_error(smollm_tokenizer, tmp_path):
    path = _jsonl(tmp_path / "rows.jsonl", [{"prompt": "q", "completion": ""}] * 3)
    with pytest.raises(ConfigError, match=r"No usable training rows: 3 read, 3 malformed \(3x completion is empty\)"):
        prepare(_data(path, tmp_path), FormatConfig(), TRAIN, smollm_tokenizer)


def test_missing_columns_fail_before_formatting(smollm_tokenizer, tmp_path):
    path = _jsonl(tmp_path / "rows.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ConfigError, match=r"\+data.columns.question=prompt, \+data.columns.answer=completion"):
        prepare(_data(path, tmp_path), FormatConfig(), TRAIN, smollm_tokenizer)
    data = prepare(_data(path, tmp_path, columns={"question": "prompt", "answer": "completion"}), FormatConfig(),
                   TRAIN, smollm_tokenizer)
    assert len(data.train) == 1


def test_chat_strategy_without_chat_template_is_explained(smollm_tokenizer, tmp_path):
    tok = copy.deepcopy(smollm_tokenizer)
    tok.chat_template = None
    path = _jsonl(tmp_path / "rows.jsonl", QA)
    with pytest.raises(ConfigError, match="tokenizer.chat_template=chatml"):
        prepare(_data(path, tmp_path), FormatConfig(), TRAIN, tok)
    # alpaca falls back to the classic prompt
    alp = _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add 2 and 2", "input": "", "output": "4"}])
    data = prepare(_data(alp, tmp_path), FormatConfig(strategy="alpaca"), TRAIN, tok)
    assert trained_texts(tok, data.train) == ["4<|im_end|>"]
    assert "### Response:\n4" in tok.decode(data.train[0]["input_ids"])


def test_mix_with_weights_and_a_format_per_source(smollm_tokenizer, tmp_path):
    chat = _jsonl(tmp_path / "chat.jsonl", QA * 5)  # 30 rows
    plain = _jsonl(tmp_path / "plain.jsonl", [{"q": f"Say {i}", "a": str(i)} for i in range(30)])
    mix = [MixSourceConfig(path=chat, weight=3.0),
           MixSourceConfig(path=plain, weight=1.0,
                           format=FormatConfig(strategy="template", template="{q} => {a}", response_template="=>"))]
    cfg = DataConfig(mix=mix, max_samples=20, eval_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    data = prepare(cfg, FormatConfig(), TRAIN, smollm_tokenizer)
    st = data.stats["train"]
    assert st.rows_kept == 20 and st.sources == {f"mix[0] {chat}": 15, f"mix[1] {plain}": 5}
    texts = trained_texts(smollm_tokenizer, data.train)
    assert sum(t.endswith("<|im_end|>") and not t.startswith(" ") for t in texts) == 15  # chat completions
    assert sum(t.startswith(" ") for t in texts) == 5  # " 3<|im_end|>" after "=>"


def test_eval_split_keeps_what_generation_needs(smollm_tokenizer, tmp_path):
    path = _jsonl(tmp_path / "rows.jsonl", QA * 4)
    data = prepare(_data(path, tmp_path, eval_fraction=0.25), FormatConfig(), TRAIN, smollm_tokenizer)
    assert data.eval.column_names == ["input_ids", "labels", "messages"] and len(data.eval) == 6
    assert data.eval[0]["messages"][-1]["role"] == "assistant"
    tmpl = FormatConfig(strategy="template", template="Q: {prompt}\nA: {completion}", response_template="A:")
    data = prepare(_data(path, tmp_path, eval_fraction=0.25), tmpl, TRAIN, smollm_tokenizer)
    assert data.eval.column_names == ["input_ids", "labels", "messages", "text", "spans"]
    row = data.eval[0]
    assert row["text"][row["spans"][0][0]:].endswith("<|im_end|>")


def test_cache_hits_on_rerun_and_misses_on_content_changes(smollm_tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    _jsonl(path, QA)
    cfg, fmt = _data(path, tmp_path), FormatConfig()
    first = prepare(cfg, fmt, TRAIN, smollm_tokenizer)
    again = prepare(_data(path, tmp_path, num_proc=2, map_batch_size=3), fmt, TRAIN, smollm_tokenizer)
    assert not first.cache_hit and again.cache_hit and again.cache_path == first.cache_path
    assert again.train["input_ids"] == first.train["input_ids"] and again.stats == first.stats

    changed_tok = copy.deepcopy(smollm_tokenizer)
    changed_tok.chat_template = smollm_tokenizer.chat_template.replace("helpful AI assistant", "terse assistant")
    misses = {
        "tokenizer chat template": prepare(cfg, fmt, TRAIN, changed_tok),
        "format": prepare(cfg, FormatConfig(system_prompt="Be brief."), TRAIN, smollm_tokenizer),
        "max_length": prepare(cfg, fmt, TrainConfig(max_length=64), smollm_tokenizer),
        "collator": prepare(cfg, fmt, TRAIN, smollm_tokenizer, CollatorConfig(name="lm")),
    }
    _jsonl(path, QA[:5])  # same path, new content
    misses["file content"] = prepare(cfg, fmt, TRAIN, smollm_tokenizer)
    for what, result in misses.items():
        assert not result.cache_hit, what
    assert len(misses["file content"].train) == 5
    added = copy.deepcopy(smollm_tokenizer)
    added.add_tokens(["<|new|>"])
    assert not prepare(cfg, fmt, TRAIN, added).cache_hit


def test_alpaca_5000_end_to_end(smollm_tokenizer, tmp_path):
    path = shared("alpaca_5000.json")
    cfg = DataConfig(path=str(path), eval_fraction=0.02, cache_dir=str(tmp_path / "cache"))
    data = prepare(cfg, FormatConfig(strategy="alpaca"), TrainConfig(max_length=512), smollm_tokenizer)
    st = data.stats["train"]
    assert st.rows_in == 4900 and st.bad_rows == {"output is empty": 2} and st.rows_kept == 4898
    assert len(data.eval) == 100 and 0 < st.trained_tokens < st.tokens
    rows = json.loads(path.read_text())
    by_output = {r["output"]: r for r in rows}
    for text in trained_texts(smollm_tokenizer, data.train.select(range(20))):
        assert text.endswith("<|im_end|>") and text[: -len("<|im_end|>")] in by_output


def test_content_opaque_templates_render_once(smollm_tokenizer):
    from tuneforge.data.render import content_opaque

    assert content_opaque(smollm_tokenizer.chat_template)
    copies = "{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
    assert content_opaque(copies)
    for inspects in ("{% for m in messages %}{{ m['content'] | trim }}{% endfor %}",
                     "{% for m in messages %}{% if '<think>' in m.content %}T{% endif %}{{ m.content }}{% endfor %}",
                     "{% for m in messages %}{% set c = m['content'] %}{{ c }}{% endfor %}",
                     "{% for x in messages %}{{ x | tojson }}{% endfor %}",
                     "{{ messages | map(attribute='content') | join(' ') }}",
                     "{% for m in messages | selectattr('content', 'equalto', 'x') %}{{ m.content }}{% endfor %}"):
        assert not content_opaque(inspects), inspects


def test_num_proc_gives_the_same_rows(smollm_tokenizer, tmp_path):
    path = _jsonl(tmp_path / "rows.jsonl", QA * 3)
    one = prepare(_data(path, tmp_path, cache=False), FormatConfig(), TRAIN, smollm_tokenizer)
    two = prepare(_data(path, tmp_path, cache=False, num_proc=2, map_batch_size=4), FormatConfig(), TRAIN,
                  smollm_tokenizer)
    assert two.train["input_ids"] == one.train["input_ids"] and two.train["labels"] == one.train["labels"]


def test_alpaca_classic_with_a_tokenizer_without_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from tuneforge.config.schemas import TokenizerConfig
    from tuneforge.models.tokenizer import apply_fixes

    tok = AutoTokenizer.from_pretrained(str(shared("tokenizers/opt-125m")))
    apply_fixes(tok, TokenizerConfig())
    assert not tok.chat_template
    path = _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Name a colour.", "input": "", "output": "Blue"}] * 2)
    data = prepare(_data(path, tmp_path), FormatConfig(strategy="alpaca"), TRAIN, tok)
    row = data.train[0]
    assert trained_texts(tok, data.train)[0] == "Blue</s>"  # the classic prompt, the answer + EOS trained
    assert tok.decode(row["input_ids"]).startswith("Below is an instruction") and row["input_ids"][-1] == tok.eos_token_id


def test_text_without_spans_uses_the_collator_response_template(smollm_tokenizer, tmp_path):
    path = _jsonl(tmp_path / "rows.jsonl", [{"text": f"Q: {q['prompt']}\nA: {q['completion']}"} for q in QA])
    data = prepare(_data(path, tmp_path), FormatConfig(strategy="text"), TRAIN, smollm_tokenizer,
                   CollatorConfig(response_template="A:"))
    assert trained_texts(smollm_tokenizer, data.train)[2] == " 4<|im_end|>"


def test_max_samples_caps_training_rows(smollm_tokenizer, tmp_path):
    path = _jsonl(tmp_path / "rows.jsonl", QA)
    data = prepare(_data(path, tmp_path, max_samples=4), FormatConfig(), TRAIN, smollm_tokenizer)
    assert data.stats["train"].rows_in == 4 and len(data.train) == 4


def test_fast_labels_equal_the_reference_tokenizer_stage_on_alpaca(smollm_tokenizer):
    """Render (one pass) + bisection/char lookups == prefix renders + the oracle tokenize_text_rows, row for row."""
    from mask_oracles import tokenize_texts

    from tuneforge.data.formats import FormatContext, formatter

    tok = smollm_tokenizer
    rows = [r for r in json.loads(shared("alpaca_5000.json").read_text())[:400] if r["output"].strip()]
    fmt = formatter(FormatConfig(strategy="alpaca"), FormatContext(tok.eos_token, True))
    convs = [fmt(r)["messages"] for r in rows]
    stops = [tok.convert_ids_to_tokens(i) for i in stop_token_ids(tok)]
    fast = render_conversations(tok, convs, stops)
    ref = [assistant_spans(tok, c, stops) for c in convs]
    assert [t for t, _ in fast] == [t for t, _ in ref]
    ours = tokenize_texts(tok, [t for t, _ in fast], [s for _, s in fast], 128, "keep_end", CollatorConfig())
    theirs = tokenize_text_rows({"text": [t for t, _ in ref], "spans": [s for _, s in ref]}, tok, CollatorConfig(),
                                128, "keep_end")
    assert ours["input_ids"] == theirs["input_ids"] and ours["labels"] == theirs["labels"]
    assert sum(ours["truncated"]) > 0  # truncation exercised


def test_marker_render_matches_prefix_renders_on_phi3():
    """Phi-3 closes a conversation with EOS after the last turn; both routes train through <|end|> only."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(shared("tokenizers/phi-3-mini-4k-instruct")))
    stops = [tok.convert_ids_to_tokens(i) for i in stop_token_ids(tok)]
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}]
    (text, spans), = render_conversations(tok, [conv], stops)
    ref_text, ref_spans = assistant_spans(tok, conv, stops)
    assert text == ref_text and spans == [list(s) for s in ref_spans]
    assert [text[s:e] for s, e in spans] == ["Hello!<|end|>", "Paris.<|end|>"]
