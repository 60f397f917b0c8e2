"""Loss masks and collators: the decoded trained tokens of a batch are exactly the expected spans.

Masks are built at preparation time (data/text_masks.py); the collators only pad or flatten. The rows here
are labelled by the production path and checked against the oracles (tests/mask_oracles.py) on the way.
These tests port the behaviours TRL's removed DataCollatorForCompletionOnlyLM tests pinned (templates given
as ids, multi-turn pairing with an instruction template, a (truncated) row that lacks the template trains
nothing, padding-free output) and check both padding sides.
"""

from __future__ import annotations

import pytest
import torch
from conftest import shared
from mask_oracles import tokenize_texts
from transformers import AutoTokenizer

from tests.mask_oracles import GENERATION_TEMPLATE, pipeline_rows, tokenize_text_rows
from tuneforge.config.schemas import CollatorConfig, PackingConfig
from tuneforge.data.collators import CausalLMCollator, TokenCounter, build_collator
from tuneforge.data.tokenize import IGNORE, assistant_mask_route

SINGLE = [{"role": "user", "content": "Rewrite 3 March 2021"}, {"role": "assistant", "content": "2021-03-03"}]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


def trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, l in zip(ids, labels) if l != IGNORE])


def conv(tokenizer, conversations, name="completion_only", max_length=512):
    return pipeline_rows(tokenizer, conversations, CollatorConfig(name=name), max_length)


def text_rows(tokenizer, texts, max_length=512, truncation_mode="keep_start", spans=None, **collator):
    """Text rows labelled by production (`text_masks.tokenize_texts`), equal to the oracle's labels."""
    cfg, spans = CollatorConfig(**collator), spans or [None] * len(texts)
    out = tokenize_texts(tokenizer, texts, spans, max_length, truncation_mode, cfg)
    oracle = tokenize_text_rows({"text": texts, "spans": spans}, tokenizer, cfg, max_length, truncation_mode)
    keys = ("input_ids", "labels", "truncated")
    assert [out[k] for k in keys] == [oracle[k] for k in keys]
    return out


def collate_rows(out, collate):
    return collate([{"input_ids": i, "labels": l} for i, l in zip(out["input_ids"], out["labels"])])


# --- conversations --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["completion_only", "assistant_only"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_chat_batch_trains_exactly_the_assistant_turns(smollm_tokenizer, name, padding_side):
    tok = smollm_tokenizer
    out = conv(tok, [SINGLE, MULTI], name)
    batch = collate_rows(out, build_collator(CollatorConfig(name=name), PackingConfig(), tok, padding_side))
    expected = ["2021-03-03<|im_end|>", "Hello!<|im_end|>Paris.<|im_end|>"]
    for row, want in zip(range(2), expected):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        assert trained_text(tok, ids.tolist(), labels.tolist()) == want
        # Pads are never trained; EOS (<|im_end|>) is trained once per turn and is not PAD.
        assert (labels[mask == 0] == IGNORE).all()
        assert tok.eos_token_id != tok.pad_token_id
        trained = [i for i, l in zip(ids.tolist(), labels.tolist()) if l != IGNORE]
        assert trained.count(tok.eos_token_id) == want.count("<|im_end|>")
        # No doubled EOS anywhere in the real tokens.
        real = ids[mask == 1].tolist()
        assert all(not (a == b == tok.eos_token_id) for a, b in zip(real, real[1:]))
    short = batch["attention_mask"][min((0, 1), key=lambda r: len(out["input_ids"][r]))]
    assert (short[0] == 0) if padding_side == "left" else (short[-1] == 0)


def test_left_padding_gives_each_row_its_own_positions(smollm_tokenizer):
    tok = smollm_tokenizer
    out = conv(tok, [SINGLE, MULTI])
    batch = collate_rows(out, CausalLMCollator(pad_token_id=tok.pad_token_id, padding_side="left"))
    n = len(out["input_ids"][0])
    row = batch["position_ids"][0]
    assert row[-n:].tolist() == list(range(n)) and batch["input_ids"][0, -n:].tolist() == out["input_ids"][0]


def test_lm_collator_trains_every_token(smollm_tokenizer):
    tok = smollm_tokenizer
    out = conv(tok, [SINGLE], name="lm")
    assert out["labels"][0] == out["input_ids"][0]
    batch = collate_rows(conv(tok, [SINGLE, MULTI], name="lm"), build_collator(CollatorConfig(name="lm"), PackingConfig(), tok))
    # Exactly the non-pad positions are trained.
    assert torch.equal(batch["labels"] != IGNORE, batch["attention_mask"] == 1)


def test_generation_markers_route_matches_offsets_route(smollm_dir):
    tok = AutoTokenizer.from_pretrained(smollm_dir)
    tok.pad_token = "<|endoftext|>"
    assert assistant_mask_route(tok) == "offsets"  # SmolLM2's template has no {% generation %}
    offsets = conv(tok, [MULTI], name="assistant_only")
    tok.chat_template = GENERATION_TEMPLATE
    assert assistant_mask_route(tok) == "generation"
    generation = conv(tok, [MULTI], name="assistant_only")
    assert trained_text(tok, generation["input_ids"][0], generation["labels"][0]) == "Hello!<|im_end|>Paris.<|im_end|>"
    # Same template text either way (SmolLM2's template but for the default system prompt): same masks per turn.
    assert trained_text(tok, offsets["input_ids"][0], offsets["labels"][0]) == "Hello!<|im_end|>Paris.<|im_end|>"


def test_generation_mask_without_end_of_turn_falls_back_to_offsets(smollm_dir):
    tok = AutoTokenizer.from_pretrained(smollm_dir)
    # Markers around the content only: the end-of-turn token would never be trained (rule 2).
    tok.chat_template = GENERATION_TEMPLATE.replace(
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}",
        "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' }}")
    assert assistant_mask_route(tok) == "offsets"
    out = conv(tok, [SINGLE], name="assistant_only")
    assert trained_text(tok, out["input_ids"][0], out["labels"][0]) == "2021-03-03<|im_end|>"


# --- formatted text: response / instruction templates ---------------------------------------------

def test_response_template_string(smollm_tokenizer):
    tok = smollm_tokenizer
    text = "### Question: Rewrite 3 March 2021\n### Answer: 2021-03-03<|im_end|>"
    out = text_rows(tok, [text], response_template="### Answer:")
    assert trained_text(tok, out["input_ids"][0], out["labels"][0]) == " 2021-03-03<|im_end|>"


def test_spans_train_the_token_that_overlaps_them(smollm_tokenizer):
    tok = smollm_tokenizer
    text = "Q: capital of France?\nA: Paris<|im_end|>"
    start = text.index("Paris")
    out = text_rows(tok, [text], spans=[[[start, len(text)]]])
    # The span starts after the space, the BPE token " Paris" before it: that token is trained all the same.
    assert tok.convert_ids_to_tokens(out["input_ids"][0]).count("ĠParis") == 1
    assert trained_text(tok, out["input_ids"][0], out["labels"][0]) == " Paris<|im_end|>"
    # Same with a response template that includes the trailing space.
    templ = text_rows(tok, [text], response_template="A: ")
    assert templ["labels"] == out["labels"]


def test_multi_turn_pairs_every_response_with_the_next_instruction(smollm_tokenizer):
    tok = smollm_tokenizer
    text = ("### Human: Hi\n### Assistant: Hello!\n### Human: Capital of France?\n"
            "### Assistant: Paris.<|im_end|>")
    out = text_rows(tok, [text], response_template="### Assistant:", instruction_template="### Human:")
    assert trained_text(tok, out["input_ids"][0], out["labels"][0]) == " Hello!\n Paris.<|im_end|>"
    # Without the instruction template the first response runs into the second human turn.
    alone = text_rows(tok, [text], response_template="### Assistant:")
    assert "Capital of France?" in trained_text(tok, alone["input_ids"][0], alone["labels"][0])


def test_template_as_ids_matches_string_template(smollm_tokenizer):
    tok = smollm_tokenizer
    text = "### Human: Hi\n### Assistant: Hello!\n### Human: Bye\n### Assistant: Bye!<|im_end|>"
    response_ids = tok.encode("\n### Assistant:", add_special_tokens=False)[1:]
    instruction_ids = tok.encode("\n### Human:", add_special_tokens=False)[1:]
    by_ids = text_rows(tok, [text], response_template=response_ids, instruction_template=instruction_ids)
    by_str = text_rows(tok, [text], response_template="### Assistant:", instruction_template="### Human:")
    assert by_ids["labels"] == by_str["labels"]
    assert trained_text(tok, by_ids["input_ids"][0], by_ids["labels"][0]) == " Hello!\n Bye!<|im_end|>"


def test_sentencepiece_template_matched_in_context():
    """DESIGN rule 6: SentencePiece tokenizes "### Assistant:" differently after a newline than alone."""
    tok = AutoTokenizer.from_pretrained(str(shared("tokenizers/phi-3-mini-4k-instruct")))
    template = "### Assistant:"
    alone = tok.encode(template, add_special_tokens=False)
    in_context = tok.encode("\n" + template, add_special_tokens=False)[2:]  # drop "▁" and "\n"
    assert alone != in_context
    texts = ["### Human: Hi\n### Assistant: Hello there<|endoftext|>"]
    for tpl in (template, in_context):
        out = text_rows(tok, texts, response_template=tpl)
        assert trained_text(tok, out["input_ids"][0], out["labels"][0]) == "Hello there<|endoftext|>"
    # Matched alone, the template is not found: the row trains nothing (the pipeline counts it as fully masked).
    naive = text_rows(tok, texts, response_template=alone)
    assert naive["n_trained"] == [0] and all(l == IGNORE for l in naive["labels"][0])


def test_missing_template_masks_the_row(smollm_tokenizer):
    tok = smollm_tokenizer
    long_prompt = "### Question: " + "word " * 200 + "\n### Answer: yes<|im_end|>"
    out = text_rows(tok, [long_prompt, "no template here", "### Answer: ok"], max_length=64,
                    response_template="### Answer:")
    # The template was cut off the long row and is absent from the second: both train nothing, and the pipeline
    # counts them as fully masked (and drops them).
    assert out["truncated"] == [True, False, False] and out["n_trained"][:2] == [0, 0]
    assert all(l == IGNORE for l in out["labels"][0]) and all(l == IGNORE for l in out["labels"][1])
    assert trained_text(tok, out["input_ids"][2], out["labels"][2]) == " ok"
    # keep_end keeps the answer of the long row.
    kept = text_rows(tok, [long_prompt], max_length=64, truncation_mode="keep_end", response_template="### Answer:")
    assert trained_text(tok, kept["input_ids"][0], kept["labels"][0]) == " yes<|im_end|>"


def test_text_lm_trains_every_token(smollm_tokenizer):
    out = text_rows(smollm_tokenizer, ["plain pretraining text<|im_end|>"], name="lm")
    assert out["labels"] == out["input_ids"]


# --- collators ------------------------------------------------------------------------------------

def test_padding_free_output(smollm_tokenizer):
    tok = smollm_tokenizer
    out = conv(tok, [SINGLE, MULTI])
    batch = collate_rows(out, build_collator(CollatorConfig(), PackingConfig(mode="padding_free"), tok))
    n0, n1 = (len(x) for x in out["input_ids"])
    assert "attention_mask" not in batch  # an all-ones mask would disable packed-sequence isolation
    assert batch["input_ids"].shape == (1, n0 + n1)
    assert batch["position_ids"][0].tolist() == list(range(n0)) + list(range(n1))
    labels = batch["labels"][0]
    assert labels[0] == IGNORE and labels[n0] == IGNORE  # nothing predicts a sequence's first token
    assert trained_text(tok, batch["input_ids"][0].tolist(), labels.tolist()) == (
        "2021-03-03<|im_end|>Hello!<|im_end|>Paris.<|im_end|>")


def test_pad_to_multiple_of(smollm_tokenizer):
    tok = smollm_tokenizer
    out = conv(tok, [SINGLE, MULTI])
    for packing in (PackingConfig(), PackingConfig(mode="padding_free")):
        batch = collate_rows(out, build_collator(CollatorConfig(pad_to_multiple_of=64), packing, tok))
        assert batch["input_ids"].shape[1] % 64 == 0


def test_padding_collator_for_classification(smollm_tokenizer):
    tok = smollm_tokenizer
    collate = build_collator(CollatorConfig(name="padding", pad_to_multiple_of=8), PackingConfig(), tok)
    batch = collate([{"input_ids": [1, 2, 3], "label": 0}, {"input_ids": [4], "label": 1}])
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].tolist() == [0, 1]
    assert batch["attention_mask"].sum().item() == 4
    longest = build_collator(CollatorConfig(name="padding"), PackingConfig(), tok)
    assert longest([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}])["input_ids"].shape == (2, 3)


def test_token_counter(smollm_tokenizer):
    tok = smollm_tokenizer
    out = conv(tok, [SINGLE, MULTI])
    counter = TokenCounter(build_collator(CollatorConfig(), PackingConfig(), tok))
    batch = collate_rows(out, counter)
    s = counter.summary()
    real = sum(len(x) for x in out["input_ids"])
    assert s["real_tokens"] == real and s["processed_tokens"] == batch["input_ids"].numel()
    assert s["padding_efficiency"] == real / batch["input_ids"].numel() < 1
    trained = sum(1 for row in out["labels"] for l in row[1:] if l != IGNORE)
    assert s["trained_tokens"] == trained and s["trained_token_fraction"] == trained / real
    free = TokenCounter(build_collator(CollatorConfig(), PackingConfig(mode="padding_free"), tok))
    collate_rows(out, free)
    assert free.summary()["padding_efficiency"] == 1.0 and free.summary()["trained_tokens"] == trained
