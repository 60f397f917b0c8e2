"""Loss masks built at data-preparation time: exactly the assistant content + its end-of-turn token."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoTokenizer

from tests.conftest import shared
from tests.mask_oracles import GENERATION_TEMPLATE, TRIMMING_TEMPLATE, pipeline_rows
from tuneforge.config.schemas import CollatorConfig, DataConfig, FormatConfig, TokenizerConfig, TrainConfig
from tuneforge.data.pipeline import prepare
from tuneforge.data.render import content_opaque
from tuneforge.data.tokenize import IGNORE, assistant_mask_route
from tuneforge.models.tokenizer import apply_fixes


def _trained_text(tokenizer, ids, labels):
    return tokenizer.decode([i for i, l in zip(ids, labels) if l != IGNORE])


def test_single_turn_trains_completion_and_eos(smollm_tokenizer):
    tok = smollm_tokenizer
    conv = [{"role": "user", "content": "Rewrite 3 March 2021"}, {"role": "assistant", "content": "2021-03-03"}]
    out = pipeline_rows(tok, [conv])
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
    out = pipeline_rows(tok, [conv])
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert _trained_text(tok, ids, labels) == "Hello!<|im_end|>Paris.<|im_end|>"


def test_truncation_is_counted(smollm_tokenizer):
    conv = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]
    out = pipeline_rows(smollm_tokenizer, [conv], max_length=32)
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
    [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok " * 30}],
]


def _template_tokenizer(name, smollm_tokenizer):
    """A tokenizer with each chat template shipped (conf/tokenizer, recipes) or tested, set as the run would."""
    if name == "embedded":  # SmolLM2's own template (tokenizer.chat_template=keep), the default model
        return smollm_tokenizer
    if name == "chatml":  # tokenizer.chat_template=chatml on a base model without one (recipe opt350m-chatml)
        tok = AutoTokenizer.from_pretrained(str(shared("tokenizers/opt-125m")))
        apply_fixes(tok, TokenizerConfig(chat_template="chatml"))
        return tok
    if name == "phi-3":  # recipe phi3-mini-chat: closes a conversation with EOS after the last <|end|>
        tok = AutoTokenizer.from_pretrained(str(shared("tokenizers/phi-3-mini-4k-instruct")))
        apply_fixes(tok, TokenizerConfig())
        return tok
    tok = copy.deepcopy(smollm_tokenizer)
    tok.chat_template = {"generation-markers": GENERATION_TEMPLATE, "trims-content": TRIMMING_TEMPLATE}[name]
    return tok


@pytest.mark.parametrize("template", ["embedded", "chatml", "phi-3", "generation-markers", "trims-content"])
@pytest.mark.parametrize("collator, max_length, truncation_mode, system_prompt", [
    ("completion_only", 512, "keep_start", None), ("assistant_only", 512, "keep_start", None),
    ("assistant_only", 48, "keep_start", None), ("assistant_only", 48, "keep_end", None), ("lm", 48, "keep_end", None),
    # format.system_prompt="" (the demo recipe): an empty system turn before rows that have none.
    ("completion_only", 512, "keep_start", ""), ("assistant_only", 48, "keep_end", ""),
])
def test_production_masks_equal_the_oracle(template, collator, max_length, truncation_mode, system_prompt,
                                           smollm_tokenizer):
    """The data stage's map function (one-pass render + span labels by lookup) gives, token for token, the labels
    of the oracle (prefix renders + a per-token loop, tests/mask_oracles.py) on every chat template shipped or
    tested here, with and without truncation, for completion-only, assistant-only and full-sequence loss.
    `pipeline_rows` raises on the first row that differs."""
    tok = _template_tokenizer(template, smollm_tokenizer)
    # Each template takes the route it is here for, so a comparison cannot pass on the wrong path.
    assert content_opaque(tok.get_chat_template()) == (template in ("embedded", "chatml", "phi-3"))
    assert (assistant_mask_route(tok) == "generation") == (template == "generation-markers")
    out = pipeline_rows(tok, CONVERSATIONS, CollatorConfig(name=collator), max_length, truncation_mode,
                        system_prompt)
    assert any(out["truncated"]) == (max_length < 512)  # the short limit cuts the long rows, the long one none
    if collator == "lm":
        assert out["labels"] == out["input_ids"]
    else:  # an uncut row trains its assistant turns and masks its prompt
        assert all(0 < n < len(ids) for n, ids, cut in zip(out["n_trained"], out["input_ids"], out["truncated"])
                   if not cut)
