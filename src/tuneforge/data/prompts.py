"""The prompt data stage (format.strategy=prompt, task=grpo|rloo): rows -> the prompt text the policy completes,
plus every other column of the row, which TRL hands to the reward functions by name.

A row gives a prompt column (text: one user turn) or a messages column without a final assistant turn. The prompt is
rendered by the chat template with the generation prompt (tuneforge's system-prompt rule applied, as for SFT and
inference: DESIGN rule 5) and given to TRL as text, so TRL tokenizes exactly what `tuneforge infer` sends and no
second template pass happens inside the trainer.

Bad rows (counted, reported, dropped or refused by data.on_bad_row): no prompt, messages ending in an assistant turn,
a prompt longer than train.max_length tokens (TRL does not cut prompts: one would fill the memory of a whole group).
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import DataConfig, FormatConfig, TrainConfig
from tuneforge.data.formats import BadRow, conversational, text_field, with_system_prompt
from tuneforge.data.pipeline import DataStats, LoadedSources, PreparedData, report
from tuneforge.data.sources import ROW, data_sources

# The column TRL completes, and the names TRL itself passes to reward functions (a row's column by one of these names
# would be shadowed or clash: GRPOTrainer._calculate_rewards, TRL 1.16).
PROMPT = "prompt"
RESERVED = ("prompt", "completion", "completion_ids", "prompts", "completions", "trainer_state", "log_extra",
            "log_metric", "environments")


def prepare_prompts(data_cfg: DataConfig, format_cfg: FormatConfig, train_cfg: TrainConfig, tokenizer) -> PreparedData:
    """Train/eval prompt rows: `prompt` (rendered text) + the rows' other columns, with their statistics. Not
    cached: rendering a template is cheap next to the first generation step."""
    sources = data_sources(data_cfg, format_cfg)
    loaded = LoadedSources.load(data_cfg, sources)
    out, stats, conversations = {}, {}, {}
    for split in ("train", "eval"):
        st, parts = DataStats(), []
        for _, src, rows, where, label in loaded.rows(split, st):
            parts.append(_process(rows.to_list(), src.format, tokenizer, train_cfg, data_cfg.on_bad_row, where, st,
                                  label, conversations))
        out[split] = loaded.merge(parts, split, st)
        stats[split] = st
        report(split, st)
    return PreparedData(train=out["train"], eval=out["eval"], stats=stats, conversations=conversations)


def reward_columns(data: PreparedData) -> list[str]:
    """The columns the reward functions receive (every column but the prompt)."""
    return [c for c in data.train.column_names if c != PROMPT]


def _process(rows: list[dict], fmt: FormatConfig, tokenizer, train_cfg: TrainConfig, on_bad_row: str, where: str,
             st: DataStats, label: str, conversations: dict) -> Dataset:
    source_columns = (fmt.prompt_column, fmt.messages_column)
    if rows:
        clash = [c for c in rows[0] if c in RESERVED and c not in source_columns]
        if clash:
            raise ConfigError(f"{where}: column {clash[0]!r} has a name TRL gives its own value when it calls the "
                              f"reward functions ({', '.join(RESERVED)}); rename it with data.columns.{clash[0]}=NEW, "
                              "e.g. data.columns.completion=answer.")
    built = []
    for row in rows:
        try:
            turns = conversation(row, fmt, tokenizer)
            prompt = render(turns, fmt, tokenizer)
            n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if n > train_cfg.max_length:
                raise BadRow(f"the prompt is {n} tokens, over train.max_length={train_cfg.max_length} (TRL does not "
                             "cut prompts)")
        except BadRow as exc:
            if on_bad_row == "error":
                raise ConfigError(f"{where}: row {row[ROW]} is malformed: {exc} (data.on_bad_row=error; "
                                  "data.on_bad_row=drop skips and counts such rows).") from None
            reason = f"{label}: {exc}" if label else str(exc)
            st.bad_rows[reason] = st.bad_rows.get(reason, 0) + 1
            if len(st.bad_row_examples) < 5:
                st.bad_row_examples.append(row[ROW])
            continue
        st.tokens += n
        conversations[prompt] = turns
        built.append({PROMPT: prompt, **{k: v for k, v in row.items() if k not in (*source_columns, ROW)}})
    st.rows_in += len(rows)
    st.rows_kept += len(built)
    if label:
        st.sources[label] = st.sources.get(label, 0) + len(built)
    return Dataset.from_list(built) if built else Dataset.from_dict({PROMPT: []})


def conversation(row: dict, fmt: FormatConfig, tokenizer) -> Any:
    """The row's prompt: its messages (one user turn for a prompt column), checked and normalised as the SFT strategy
    does (roles, empty turns, ShareGPT's from/value), before the system-prompt rule; the text itself without a chat
    template."""
    messages: Any = row.get(fmt.messages_column)
    text = row.get(fmt.prompt_column)
    if messages is None and text is None:
        raise BadRow(f"neither {fmt.prompt_column} nor {fmt.messages_column} is set")
    if not tokenizer.chat_template:
        if not isinstance(text, str):
            raise BadRow("conversations need a chat template (tokenizer.chat_template=chatml)")
        return text_field({fmt.prompt_column: text}, fmt.prompt_column)
    if messages is None:
        messages = [{"role": "user", "content": text_field({fmt.prompt_column: text}, fmt.prompt_column)}]
    if not isinstance(messages, list) or not messages:
        raise BadRow(f"{fmt.messages_column} is not a list of messages")
    last = messages[-1]
    if isinstance(last, dict) and (last.get("role") or last.get("from")) in ("assistant", "gpt"):
        raise BadRow(f"{fmt.messages_column} ends with an assistant turn: a prompt ends where the model answers "
                     f"(put the answer in a column of its own, e.g. {fmt.reference_column})")
    # The SFT strategy's checks (roles, empty turns) on the prompt + a placeholder answer; no system prompt added.
    return conversational({"messages": [dict(m) for m in messages] + [{"role": "assistant", "content": "-"}]},
                          FormatConfig(messages_column="messages", system_prompt=None), None)["messages"][:-1]


def render(turns: Any, fmt: FormatConfig, tokenizer) -> str:
    """The prompt (`conversation`) as the model sees it: the chat template with the generation prompt and the
    system-prompt rule (no template: the text)."""
    if isinstance(turns, str):
        return turns
    rendered = tokenizer.apply_chat_template(with_system_prompt(turns, fmt), tokenize=False,
                                             add_generation_prompt=True)
    # TRL tokenizes text prompts with the tokenizer's special tokens; a template that writes BOS itself would get
    # a second one from a tokenizer that adds it (Llama): the tokenizer's own stays.
    bos = tokenizer.bos_token
    if bos and rendered.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        rendered = rendered[len(bos):]
    return rendered
