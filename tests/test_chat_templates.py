"""The named chat templates (`tokenizer.chat_template=NAME`, config/chat_templates.py), each checked against the
domain rules on the embedded SmolLM2 tokenizer: PAD != EOS (rule 1), the end-of-turn token ends every assistant
span and is trained (rule 2), the generation prompt is exactly the text before an answer (rule 5), and assistant
spans are found by rendering (rules 6-7). Plus today's chatml fix on OPT (BOS == EOS), and phi3 against Phi-3's own
template."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoTokenizer

from tests.conftest import shared
from tuneforge.config.chat_templates import NAMES, TEMPLATES
from tuneforge.config.schemas import CollatorConfig, TokenizerConfig
from tuneforge.data.render import render_conversations
from tuneforge.data.text_masks import build_labels, encode
from tuneforge.data.tokenize import IGNORE
from tuneforge.models.tokenizer import apply_fixes, stop_token_ids

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris.\n\nIt is on the Seine."}]


def test_the_named_templates_are_the_issues_list():
    assert set(NAMES) == {"chatml", "llama3", "qwen2.5", "qwen3", "mistral", "gemma", "phi3"}


@pytest.fixture(scope="module")
def smollm_raw(smollm_tokenizer):
    return smollm_tokenizer


def _with_template(base, name):
    tok = copy.deepcopy(base)
    report = apply_fixes(tok, TokenizerConfig(chat_template=name))
    return tok, report


@pytest.mark.parametrize("name", NAMES)
def test_named_template_keeps_the_domain_rules(name, smollm_tokenizer):
    tok, report = _with_template(smollm_tokenizer, name)
    spec = TEMPLATES[name]
    end = spec.end_of_turn or tok.eos_token
    # Rule 1: PAD differs from EOS and from the end-of-turn token.
    assert tok.pad_token not in (tok.eos_token, end)
    # The template's tokens are single (special) tokens, added where the vocabulary lacked them.
    for t in spec.tokens:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert set(report.added_tokens) <= set(spec.tokens)
    end_id = tok.convert_tokens_to_ids(end)
    assert end_id in stop_token_ids(tok)  # generation stops at the end of a turn
    stops = [tok.convert_ids_to_tokens(i) for i in stop_token_ids(tok)]
    (text, spans), = render_conversations(tok, [CONVERSATION], stops)
    # Rules 6-7: every assistant turn is found, from its content through its end-of-turn token, nothing else.
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [text[a:b] for a, b in spans] == [a + end for a in answers]
    # Rule 5: the generation prompt is the text before the last answer, as training renders it.
    prompt = tok.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt == text[:spans[-1][0]]
    # Rule 2: the end-of-turn token is trained, in every assistant turn; prompts are masked.
    labels = build_labels([text], [spans], encode(tok, [text]), 512, "keep_start",
                          CollatorConfig(name="assistant_only"))["labels"][0]
    trained = [t for t in labels if t != IGNORE]
    assert trained.count(end_id) == len(answers)
    assert tok.decode(trained) == "".join(a + end for a in answers)


def test_chatml_uses_im_start_and_im_end_not_the_models_bos_and_eos():
    """OPT's BOS == EOS == </s>: the old chatml option made </s> end (and BOS <|im_start|> open) every turn."""
    tok = AutoTokenizer.from_pretrained(str(shared("tokenizers/opt-125m")))
    report = apply_fixes(tok, TokenizerConfig(chat_template="chatml"))
    assert report.added_tokens == ["<|im_start|>", "<|im_end|>"] and tok.bos_token == tok.eos_token == "</s>"
    text = tok.apply_chat_template(CONVERSATION[1:3], tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tok) and tok.pad_token == "<pad>"


def test_phi3_renders_what_phi3s_own_template_renders():
    tok = AutoTokenizer.from_pretrained(str(shared("tokenizers/phi-3-mini-4k-instruct")))
    ours = copy.deepcopy(tok)
    report = apply_fixes(ours, TokenizerConfig(chat_template="phi3"))
    assert report.added_tokens == []  # Phi-3's vocabulary has every token the format writes
    for conversation in (CONVERSATION[1:], CONVERSATION):
        theirs = tok.apply_chat_template(conversation, tokenize=False)
        # Phi-3's template closes a whole conversation with EOS after the last <|end|>\n (outside any turn).
        assert ours.apply_chat_template(conversation, tokenize=False) + tok.eos_token == theirs
        assert ours.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True) == \
            tok.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
