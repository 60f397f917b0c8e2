"""Every doctor check fires on the case it exists for, with real tokenizers (no network)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tests.conftest import cli_in_process, shared
from tests.mask_oracles import pipeline_rows
from tuneforge.config.schemas import CollatorConfig, PeftConfig, TokenizerConfig, TuneforgeConfig
from tuneforge.data.pipeline import DataStats, PreparedData
from tuneforge.data.tokenize import IGNORE
from tuneforge.models.tokenizer import TokenizerReport, apply_fixes, load_tokenizer
from tuneforge.tasks import doctor


def _ctx(tokenizer, train_rows, eval_rows=None, stats=None, cfg=None, report=None, vocab=None, context=8192):
    eval_rows = eval_rows or [{"input_ids": [1], "labels": [IGNORE], "messages": None}]
    data = PreparedData(
        train=Dataset.from_list(train_rows),
        eval=Dataset.from_list(eval_rows),
        stats={"train": stats or DataStats(rows_in=len(train_rows), rows_kept=len(train_rows))},
    )
    model_config = SimpleNamespace(vocab_size=vocab or len(tokenizer), max_position_embeddings=context)
    return doctor.Context(cfg or TuneforgeConfig(), tokenizer, report or TokenizerReport(original={}), model_config, data)


def _by_name(checks, name):
    return next(c for c in checks if c.name == name)


def _row(tokenizer, messages):
    """A correctly masked chat row, as the data stage prepares it."""
    out = pipeline_rows(tokenizer, [messages])
    return {"input_ids": out["input_ids"][0], "labels": out["labels"][0], "messages": messages}


CONV = [{"role": "user", "content": "Write 3 March 2021 as YYYY-MM-DD"}, {"role": "assistant", "content": "2021-03-03"}]


def test_pad_equal_eos_is_an_error_and_the_auto_fix_is_reported(smollm_dir):
    broken, report = load_tokenizer(smollm_dir, TokenizerConfig(pad_token="none"))
    checks = doctor.special_tokens(_ctx(broken, [_row(broken, CONV)], report=report))
    assert _by_name(checks, "PAD != EOS").status == doctor.ERROR
    fixed, report = load_tokenizer(smollm_dir, TokenizerConfig())
    check = _by_name(doctor.special_tokens(_ctx(fixed, [_row(fixed, CONV)], report=report)), "PAD != EOS")
    assert check.status == doctor.FIXED and "'<|im_end|>' -> '<|endoftext|>'" in check.action


def test_bos_and_unk_equal_eos_warn_on_opt():
    tok = AutoTokenizer.from_pretrained(str(shared("tokenizers/opt-125m")))
    checks = doctor.special_tokens(_ctx(tok, [{"input_ids": [2], "labels": [2], "messages": None}]))
    assert _by_name(checks, "BOS != EOS").status == doctor.WARNING
    assert _by_name(checks, "UNK != EOS").status == doctor.WARNING


def test_untrained_eos_and_doubled_eos_fire(smollm_tokenizer):
    tok = smollm_tokenizer
    good = _row(tok, CONV)
    untrained = dict(good, labels=[l if t != tok.eos_token_id else IGNORE for t, l in zip(good["input_ids"], good["labels"])])
    assert _by_name(doctor.eos_trained(_ctx(tok, [good])), "EOS / end-of-turn trained").status == doctor.OK
    assert _by_name(doctor.eos_trained(_ctx(tok, [untrained])), "EOS / end-of-turn trained").status == doctor.ERROR
    ids = good["input_ids"] + [tok.eos_token_id, tok.eos_token_id]
    doubled = {"input_ids": ids, "labels": list(ids), "messages": None}
    cfg = TuneforgeConfig(collator=CollatorConfig(name="lm"))
    assert _by_name(doctor.eos_trained(_ctx(tok, [doubled], cfg=cfg)), "no doubled EOS").status == doctor.WARNING


def test_missing_and_mismatched_chat_template(smollm_tokenizer):
    tok = smollm_tokenizer
    row = _row(tok, CONV)
    assert _by_name(doctor.chat_template(_ctx(tok, [row], eval_rows=[row])), "one chat template").status == doctor.OK
    other = dict(row, input_ids=row["input_ids"][:3] + [5] + row["input_ids"][4:])
    assert _by_name(doctor.chat_template(_ctx(tok, [row], eval_rows=[other])), "one chat template").status == doctor.ERROR
    plain = AutoTokenizer.from_pretrained(str(shared("tokenizers/opt-125m")))
    assert doctor.chat_template(_ctx(plain, [row], eval_rows=[row]))[0].status == doctor.ERROR


def test_phi3_chat_template_round_trip():
    tok, _ = load_tokenizer(str(shared("tokenizers/phi-3-mini-4k-instruct")), TokenizerConfig())
    row = _row(tok, CONV)
    decoded = tok.decode([i for i, l in zip(row["input_ids"], row["labels"]) if l != IGNORE])
    assert decoded.strip().startswith("2021-03-03") and decoded.endswith("<|end|>")
    assert _by_name(doctor.chat_template(_ctx(tok, [row], eval_rows=[row])), "one chat template").status == doctor.OK
    # Phi-3 closes a conversation with EOS, so a prefix is not a prefix of the whole: multi-turn still masks
    # every assistant turn through its <|end|>, and nothing else.
    multi = CONV + [{"role": "user", "content": "And 4 July 1976?"}, {"role": "assistant", "content": "1976-07-04"}]
    row = _row(tok, multi)
    trained = tok.decode([i for i, l in zip(row["input_ids"], row["labels"]) if l != IGNORE])
    assert trained == "2021-03-03<|end|>1976-07-04<|end|>"


def _sentencepiece_like() -> PreTrainedTokenizerFast:
    """A Llama-style tokenizer (BPE over Metaspace pieces, '▁' prefix on the first word only)."""
    corpus = ["### Human: hello there\n### Assistant: hi friend", "### Assistant: good\n### Human: thanks"] * 50
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_response_template_in_context_mismatch_and_its_fix():
    tok = _sentencepiece_like()
    text = "### Human: hello there\n### Assistant: hi friend</s>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    cfg = TuneforgeConfig(collator=CollatorConfig(response_template="### Assistant:"))
    check = _by_name(doctor.response_templates(_ctx(tok, [{"input_ids": ids, "labels": ids, "messages": None}], cfg=cfg)),
                     "collator.response_template in context")
    assert check.status == doctor.WARNING and "add_special_tokens" in check.action
    # The suggested fix: make the template one special token; alone and in context then agree.
    apply_fixes(tok, TokenizerConfig(add_special_tokens=["### Assistant:"], pad_token="new"))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    check = _by_name(doctor.response_templates(_ctx(tok, [{"input_ids": ids, "labels": ids, "messages": None}], cfg=cfg)),
                     "collator.response_template in context")
    assert check.status == doctor.OK
    cfg = TuneforgeConfig(collator=CollatorConfig(response_template="### Answer:"))
    assert doctor.response_templates(_ctx(tok, [{"input_ids": ids, "labels": ids, "messages": None}], cfg=cfg))[0].status \
        == doctor.ERROR


def test_fully_masked_truncation_context_and_leaks(smollm_tokenizer):
    tok = smollm_tokenizer
    row = _row(tok, CONV)
    stats = DataStats(rows_in=100, rows_kept=95, fully_masked=5, truncated=3)
    checks = doctor.masking_and_lengths(_ctx(tok, [row], eval_rows=[row], stats=stats, context=64))
    assert _by_name(checks, "labels not all -100").status == doctor.ERROR  # 5% > 1%
    assert _by_name(checks, "truncation").status == doctor.WARNING
    assert _by_name(checks, "max_length vs context").status == doctor.ERROR  # 512 > 64
    assert _by_name(checks, "held-out not in train").status == doctor.WARNING
    ok = doctor.masking_and_lengths(_ctx(tok, [row], stats=DataStats(rows_in=100, rows_kept=100)))
    assert all(c.status == doctor.OK for c in ok)


def test_opt_chatml_no_resize_and_trainable_new_tokens():
    tok = AutoTokenizer.from_pretrained(str(shared("tokenizers/opt-125m")))
    report = apply_fixes(tok, TokenizerConfig(chat_template="chatml"))
    # ChatML's own <|im_start|> and <|im_end|> are added (OPT's BOS stays </s>, not a turn opener any more).
    assert tok.bos_token == "</s>" and tok.pad_token == "<pad>" and len(tok) == 50267
    checks = doctor.vocabulary(_ctx(tok, [{"input_ids": [2], "labels": [2], "messages": None}], report=report,
                                    vocab=50272))
    assert _by_name(checks, "vocabulary vs embeddings").status == doctor.OK  # 50267 tokens fit in 50272 rows
    assert _by_name(checks, "new tokens trainable").status == doctor.OK
    frozen = TuneforgeConfig(peft=PeftConfig(train_new_tokens=False))
    checks = doctor.vocabulary(_ctx(tok, [{"input_ids": [2], "labels": [2], "messages": None}], report=report,
                                    vocab=50265, cfg=frozen))
    assert _by_name(checks, "vocabulary vs embeddings").status == doctor.FIXED
    assert _by_name(checks, "new tokens trainable").status == doctor.WARNING
    apply_fixes(tok, TokenizerConfig(chat_template="keep", add_special_tokens=["### Answer:"]))
    assert len(tok("### Answer:", add_special_tokens=False)["input_ids"]) == 1


def test_doctor_cli_ok_json_and_broken_config(tmp_path):
    ok = cli_in_process("doctor", "--json", "data.builtin_rows=60", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert report["errors"] is False and any(c["name"] == "PAD != EOS" and c["status"] == "fixed" for c in report["checks"])
    broken = cli_in_process("doctor", "tokenizer=none", "data.builtin_rows=60", cwd=tmp_path)
    assert broken.returncode == 1 and "error" in broken.stdout and "PAD != EOS" in broken.stdout
    # train refuses the same config before loading any weights.
    train = cli_in_process("train", "tokenizer=none", "data.builtin_rows=60", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert train.returncode == 2 and "doctor found errors" in train.stderr + train.stdout
    assert not (tmp_path / "run" / "adapter").exists()


NO_END_OF_TURN = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' %}{% generation %}"
                  "{{ m['content'] }}\n{% endgeneration %}{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")


def test_a_template_without_end_of_turn_is_told_from_truncation(smollm_tokenizer):
    """An answer span reaching the row's end passes only when the row was really cut (its `truncated` flag): a
    template whose turns have no end-of-turn token also ends its last answer at the row's end."""
    import copy

    tok = copy.deepcopy(smollm_tokenizer)
    tok.chat_template = NO_END_OF_TURN
    out = pipeline_rows(tok, [CONV])
    row = {"input_ids": out["input_ids"][0], "labels": out["labels"][0], "truncated": out["truncated"][0],
           "messages": CONV}
    assert row["truncated"] is False and row["labels"][-1] != IGNORE  # the trained span reaches the row's end
    cfg = TuneforgeConfig(tokenizer=TokenizerConfig(chat_template="my_template.jinja"))
    check = _by_name(doctor.eos_trained(_ctx(tok, [row], cfg=cfg)), "EOS / end-of-turn trained")
    assert check.status == doctor.ERROR
    assert "'2021-03-03\\n'" in check.action and "tokenizer.chat_template=my_template.jinja" in check.action
    assert "tokenizer.chat_template=chatml" in check.action  # the fix
    cut = pipeline_rows(smollm_tokenizer, [CONV], max_length=len(_row(smollm_tokenizer, CONV)["input_ids"]) - 3)
    cut_row = {"input_ids": cut["input_ids"][0], "labels": cut["labels"][0], "truncated": cut["truncated"][0],
               "messages": CONV}
    assert cut_row["truncated"] is True
    check = _by_name(doctor.eos_trained(_ctx(smollm_tokenizer, [cut_row])), "EOS / end-of-turn trained")
    assert check.status == doctor.OK and "1 cut by truncation" in check.action
