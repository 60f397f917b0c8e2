"""Formatting strategies: rows -> messages, or text + the character spans to train."""

from __future__ import annotations

import pytest

from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import FormatConfig
from tuneforge.data.formats import ALPACA_PROMPT_NO_INPUT, BadRow, FormatContext, check_columns, formatter

CHAT = FormatContext(eos_token="</s>", has_chat_template=True)
PLAIN = FormatContext(eos_token="</s>", has_chat_template=False)


def fmt(row, ctx=CHAT, **kw):
    return formatter(FormatConfig(**kw), ctx)(row)


def trained(out):
    return [out["text"][s:e] for s, e in out["spans"]]


def test_instruction_with_system_prompt():
    out = fmt({"prompt": "Hi", "completion": "Hello"}, system_prompt="Be brief.")
    assert out == {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello"}]}


def test_empty_system_prompt_is_an_empty_system_turn_and_inference_gets_the_same(smollm_tokenizer):
    """format.system_prompt="" suppresses a template's default system prompt (SmolLM2's: 16 tokens a row);
    inference prompts get the run's system prompt exactly as its training rows did (rule 5)."""
    from tuneforge.data.formats import with_system_prompt

    row = fmt({"prompt": "Hi", "completion": "Hello"}, system_prompt="")
    assert row["messages"][0] == {"role": "system", "content": ""}
    assert fmt({"prompt": "Hi", "completion": "Hello"})["messages"][0]["role"] == "user"  # None: no turn
    full = smollm_tokenizer.apply_chat_template(row["messages"], tokenize=False)
    default = smollm_tokenizer.apply_chat_template(row["messages"][1:], tokenize=False)
    assert "SmolLM" in default and "SmolLM" not in full
    cfg = FormatConfig(system_prompt="")
    prompt = smollm_tokenizer.apply_chat_template(with_system_prompt("Hi", cfg), tokenize=False,
                                                  add_generation_prompt=True)
    assert full.startswith(prompt)  # the inference prompt is the training row up to the answer
    own = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert with_system_prompt(own, cfg) == own


def test_instruction_accepts_trl_conversational_prompt_completion():
    row = {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Yo"}]}
    assert [m["role"] for m in fmt(row)["messages"]] == ["user", "assistant"]


def test_conversational_and_sharegpt():
    roles = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert fmt({"messages": roles}, strategy="conversational")["messages"] == roles
    # ShareGPT from/value; Arrow fills the absent role/content fields with None.
    share = [{"from": "human", "value": "a", "role": None, "content": None},
             {"from": "gpt", "value": "b", "role": None, "content": None}]
    assert fmt({"conversations": share}, strategy="conversational", messages_column="conversations")["messages"] == roles
    # A configured system prompt does not duplicate the data's own system turn.
    own = [{"role": "system", "content": "S"}] + roles
    assert fmt({"messages": own}, strategy="conversational", system_prompt="X")["messages"] == own


@pytest.mark.parametrize("messages, reason", [
    ([{"role": "wizard", "content": "a"}, {"role": "assistant", "content": "b"}], "unknown role 'wizard'"),
    ([{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}], "empty or non-text user content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}], "empty or non-text assistant content"),
    ([{"role": "user", "content": "a"}], "no assistant turn"),
    ("not a list", "messages is not a list of messages"),
])
def test_malformed_conversations_say_why(messages, reason):
    with pytest.raises(BadRow, match=reason):
        fmt({"messages": messages}, strategy="conversational")


@pytest.mark.parametrize("row, reason", [
    ({"prompt": None, "completion": "x"}, "prompt is null"),
    ({"prompt": "  ", "completion": "x"}, "prompt is empty"),
    ({"prompt": "q", "completion": 3}, "completion is int, not text"),
])
def test_malformed_instruction_rows_say_why(row, reason):
    with pytest.raises(BadRow, match=reason):
        fmt(row)


def test_alpaca_chat_omits_empty_input():
    with_input = fmt({"instruction": "Add", "input": "2, 3", "output": "5"}, strategy="alpaca")
    without = fmt({"instruction": "Add", "input": "", "output": "5"}, strategy="alpaca")
    assert with_input["messages"][0]["content"] == "Add\n\n2, 3"
    assert without["messages"][0]["content"] == "Add" and without["messages"][1]["content"] == "5"


def test_alpaca_classic_prompt_without_chat_template():
    out = fmt({"instruction": "Add", "input": None, "output": "5"}, ctx=PLAIN, strategy="alpaca")
    assert out["text"] == ALPACA_PROMPT_NO_INPUT.format(instruction="Add") + "5</s>"
    assert trained(out) == ["5</s>"]
    forced = fmt({"instruction": "Add", "input": "2, 3", "output": "5"}, ctx=CHAT, strategy="alpaca", alpaca_style="classic")
    assert "### Input:\n2, 3\n\n### Response:\n" in forced["text"] and trained(forced) == ["5</s>"]


def test_text_with_and_without_response_template():
    row = {"text": "### Q: hi\n### A: hello"}
    assert fmt(row, strategy="text") == {"text": "### Q: hi\n### A: hello</s>", "spans": []}
    out = fmt(row, strategy="text", response_template="### A:")
    assert trained(out) == [" hello</s>"]
    assert fmt({"text": "x</s>"}, strategy="text")["text"] == "x</s>"  # EOS never doubled
    with pytest.raises(BadRow, match="response_template not found"):
        fmt({"text": "no marker"}, strategy="text", response_template="### A:")


def test_template_appends_eos_and_knows_the_completion_span():
    cfg = dict(strategy="template", template="### Question: {prompt}\n### Answer: {completion}",
               response_template="### Answer:")
    out = fmt({"prompt": "2+2?", "completion": "4"}, **cfg)
    assert out["text"] == "### Question: 2+2?\n### Answer: 4</s>" and trained(out) == [" 4</s>"]
    # The template may place EOS itself ({eos_token}), and numbers are text.
    own = fmt({"q": "n?", "a": 7}, strategy="template", template="Q {q} A:{a}{eos_token}\n", response_template="A:")
    assert own["text"] == "Q n? A:7</s>\n" and trained(own) == ["7</s>\n"]
    no_eos = fmt({"prompt": "p", "completion": "c"}, append_eos=False, **cfg)
    assert not no_eos["text"].endswith("</s>")


def test_missing_columns_list_what_exists_and_the_mapping_that_fixes_it():
    with pytest.raises(ConfigError) as err:
        check_columns(FormatConfig(), ["question", "answer", "id"], "train split of 'x.jsonl'")
    msg = str(err.value)
    assert "needs column(s) ['prompt', 'completion']" in msg and "['question', 'answer', 'id']" in msg
    assert "+data.columns.question=prompt" in msg and "+data.columns.answer=completion" in msg
    with pytest.raises(ConfigError, match=r"\+data.columns.conversations=messages"):
        check_columns(FormatConfig(strategy="conversational"), ["conversations", "id"], "x")


def test_mapping_hint_follows_the_role_of_a_renamed_column():
    """format.prompt_column=question on prompt/completion data: the prompt column is the source, not
    whichever column is spelled most like 'question'."""
    with pytest.raises(ConfigError) as err:
        check_columns(FormatConfig(prompt_column="question"), ["prompt", "completion"], "x")
    assert "+data.columns.prompt=question" in str(err.value)
    assert "completion=question" not in str(err.value)
