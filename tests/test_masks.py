"""Loss masks built at data-preparation time: exactly the assistant content + its end-of-turn token."""

from __future__ import annotations

import pytest

from tests.conftest import shared
from tests.mask_oracles import tokenize_conversations
from tuneforge.config import CollatorConfig, DataConfig, FormatConfig, TrainConfig
from tuneforge.data.pipeline import prepare
from tuneforge.data.render import render_conversations
from tuneforge.data.text_masks import tokenize_texts
from tuneforge.data.tokenize import IGNORE
from tuneforge.tokenizer import stop_token_ids


def _trained_text(tokenizer, ids, labels):
    return tokenizer.decode([i for i, l in zip(ids, labels) if l != IGNORE])


def _tok(tokenizer, conversations, max_length=512):
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
    return tokenize_conversations({"messages": conversations}, tokenizer, stops, max_length, "keep_start")


def test_single_turn_trains_completion_and_eos(smollm_tokenizer):
    tok = smollm_tokenizer
    conv = [{"role": "user", "content": "Rewrite 3 March 2021"}, {"role": "assistant", "content": "2021-03-03"}]
    out = _tok(tok, [conv])
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert _trained_text(tok, ids, labels) == "2021-03-03<|im_end|>"
    # EOS is trained once (no doubled EOS), and it is not the PAD token.
    trained = [i for i, l in zip(ids, labels) if l != IGNORE]
    assert trained[-1] == tok.eos_token_id and trained.count(tok.eos_token_id) == 1
    assert tok.eos_token_id != tok.pad_token_id
    # The template's newline after <|im_end|> is masked.
    assert tok.decode(ids[-1:]) == "\n" and labels[-1] == IGNORE


def test_multi_turn_trains_every_assistant_turn_only(smollm_tokenizer):
    tok = smollm_tokenizer
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    out = _tok(tok, [conv])
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert _trained_text(tok, ids, labels) == "Hello!<|im_end|>Paris.<|im_end|>"


def test_truncation_is_counted(smollm_tokenizer):
    conv = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]
    out = _tok(smollm_tokenizer, [conv], max_length=32)
    assert out["truncated"] == [True] and len(out["input_ids"][0]) == 32
    assert all(l == IGNORE for l in out["labels"][0])  # the answer was cut off: nothing to train


def test_demo_data_pipeline(smollm_tokenizer):
    data = prepare(DataConfig(builtin_rows=50), FormatConfig(), TrainConfig(max_length=128), smollm_tokenizer)
    st = data.stats["train"]
    assert st.rows_in == 45 and st.rows_kept == 45 and not st.bad_rows
    assert 0 < st.trained_tokens < st.tokens
    row = data.train[0]
    completion = _trained_text(smollm_tokenizer, row["input_ids"], row["labels"])
    assert len(completion) == len("YYYY-MM-DD<|im_end|>") and completion[4] == "-"
    assert len(data.eval) == 5 and data.eval[0]["messages"][-1]["role"] == "assistant"


CONVERSATIONS = [
    [{"role": "user", "content": "Rewrite 3 March 2021"}, {"role": "assistant", "content": "2021-03-03"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris.\n\nIt is on the Seine."}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "word " * 40},
     {"role": "assistant", "content": "ok " * 30}],
]


@pytest.mark.parametrize("template", ["embedded", "phi-3-mini-4k-instruct"])
@pytest.mark.parametrize("collator, max_length, truncation_mode", [
    ("assistant_only", 512, "keep_start"), ("assistant_only", 48, "keep_start"), ("assistant_only", 48, "keep_end"),
    ("lm", 48, "keep_end"),
])
def test_production_masks_equal_the_oracle(template, collator, max_length, truncation_mode, smollm_tokenizer):
    """The one production path (one-pass render + span labels by lookup) gives, token for token, the labels of
    the reference implementation (prefix renders + a per-token loop, tests/mask_oracles.py) on each chat
    template shipped or tested here, with and without truncation, for assistant-only and full-sequence loss."""
    from transformers import AutoTokenizer

    tok = smollm_tokenizer if template == "embedded" else AutoTokenizer.from_pretrained(
        str(shared(f"tokenizers/{template}")))
    stops = [tok.convert_ids_to_tokens(i) for i in stop_token_ids(tok)]
    cfg = CollatorConfig(name=collator)
    rendered = render_conversations(tok, CONVERSATIONS, stops)
    ours = tokenize_texts(tok, [t for t, _ in rendered], [s for _, s in rendered], max_length, truncation_mode, cfg)
    oracle = tokenize_conversations({"messages": CONVERSATIONS}, tok, stops, max_length, truncation_mode, cfg)
    assert ours["input_ids"] == oracle["input_ids"]
    assert ours["labels"] == oracle["labels"]
    assert ours["truncated"] == oracle["truncated"]
    assert any(ours["truncated"]) == (max_length < 512)  # the short limit cuts the long rows, the long one none
    assert any(l != IGNORE for row in ours["labels"] for l in row)
