"""DESIGN rule 1 on real tokenizers: PAD must not be EOS."""

from __future__ import annotations

from transformers import AutoTokenizer

from tests.conftest import shared
from tuneforge.config.schemas import TokenizerConfig
from tuneforge.models.loading import resize_rows
from tuneforge.models.tokenizer import NEW_PAD, apply_fixes, content_hash, load_tokenizer


def test_default_tokenizer_pad_becomes_unk(smollm_dir):
    raw = AutoTokenizer.from_pretrained(smollm_dir)
    assert raw.pad_token == raw.eos_token == "<|im_end|>"  # as shipped: the classic silent failure
    tokenizer, report = load_tokenizer(smollm_dir, TokenizerConfig())
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.eos_token == "<|im_end|>"
    assert len(tokenizer) == len(raw)  # UNK reused: no new token, no resize
    assert report.fixes and "PAD must differ from EOS" in report.fixes[0]


def test_pad_none_leaves_tokenizer_as_loaded(smollm_dir):
    tokenizer, report = load_tokenizer(smollm_dir, TokenizerConfig(pad_token="none"))
    assert tokenizer.pad_token == tokenizer.eos_token and not report.fixes


def test_new_pad_token_when_unk_is_eos():
    """OPT: BOS == EOS == UNK == </s>; with PAD == EOS too, only a new token can fix it."""
    tokenizer = AutoTokenizer.from_pretrained(str(shared("tokenizers/opt-125m")))
    tokenizer.pad_token = tokenizer.eos_token
    before = len(tokenizer)
    report = apply_fixes(tokenizer, TokenizerConfig())
    assert tokenizer.pad_token == NEW_PAD and tokenizer.pad_token_id == before
    assert report.added_tokens == [NEW_PAD]


def test_resize_rule_is_capped():
    assert resize_rows(49152, 49152) == 49152  # fits: no resize
    assert resize_rows(49152, 49153) == 49216  # +64, not 65536
    assert resize_rows(50272, 50266) == 50272  # OPT's spare rows absorb new tokens
    assert resize_rows(50272, 50273) == 50304  # 50272 = 32 * 1571 -> next multiple of 32


def test_content_hash_tracks_content_not_name(smollm_dir):
    a, _ = load_tokenizer(smollm_dir, TokenizerConfig())
    b, _ = load_tokenizer(smollm_dir, TokenizerConfig())
    assert content_hash(a) == content_hash(b)
    b.chat_template = b.chat_template + " "
    assert content_hash(a) != content_hash(b)
