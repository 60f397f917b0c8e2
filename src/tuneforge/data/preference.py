"""The preference data stage (task=dpo, task=kto): rows -> prompt ids + the ids of each answer, checked,
counted and cached like the SFT stage (pipeline.py), with the same chat-template rendering (render.py).

Row forms (`format.strategy`):
  preference  prompt / chosen / rejected. Each answer is text, one message object or a conversation; without a
              prompt column the chosen and rejected conversations carry it (their common prefix: TRL's implicit
              prompt, argilla-style pairs).
  unpaired    prompt / completion / label (KTO: true = desirable).

Every answer is rendered in its conversation by the chat template, so an answer is what training sees after
the same generation prompt inference sends (DESIGN rule 5); the prompt is cut off by token position (rule 4)
and the answer ends with its end-of-turn token, trained (rule 2). tuneforge gives TRL these ids and TRL does not
tokenize again (see preference.py).

Bad rows (counted, reported, dropped or refused by data.on_bad_row): a missing or empty side, chosen == rejected,
an unknown chat role, an answer that starts by repeating the prompt, a prompt that alone fills train.max_length
(truncation would cut the whole answer), a prompt the template renders differently for generation.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from datasets import Dataset, DatasetDict, Features, List, Value
from transformers import PreTrainedTokenizerBase

from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import DataConfig, FormatConfig, TrainConfig
from tuneforge.data import cache
from tuneforge.data.formats import BadRow, conversational, text_field, with_system_prompt
from tuneforge.data.pipeline import DataStats, LoadedSources, PreparedData, report
from tuneforge.data.render import render_conversations
from tuneforge.data.sources import ROW, data_sources
from tuneforge.data.text_masks import encode
from tuneforge.models.tokenizer import content_hash, stop_token_ids

log = logging.getLogger(__name__)

STRATEGIES = ("preference", "unpaired")
# What each task's trainer reads (TRL's DataCollatorForPreference / DataCollatorForUnpairedPreference).
PAIRED = ["prompt_ids", "chosen_ids", "rejected_ids"]
UNPAIRED = ["prompt_ids", "completion_ids", "label"]
_IDS = List(Value("int64"))
_MESSAGES = List({"role": Value("string"), "content": Value("string")})
# The held-out split also keeps what generation scoring needs (evaluate.generation_pairs): the prompt with the
# preferred answer, as messages or as text + the answer's span.
_GENERATION = {"messages": _MESSAGES, "text": Value("string"), "spans": List(List(Value("int64")))}


def answer_columns(fmt: FormatConfig) -> list[str]:
    return ["chosen", "rejected"] if fmt.strategy == "preference" else ["completion"]


def prepare_preferences(data_cfg: DataConfig, format_cfg: FormatConfig, train_cfg: TrainConfig,
                        tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Train/eval preference rows as token ids, with their statistics; reused from the cache when the data,
    the configs and the tokenizer content are unchanged."""
    sources = data_sources(data_cfg, format_cfg)
    key = (cache.cache_key(data_cfg, sources, train_cfg.max_length, train_cfg.truncation_mode,
                           content_hash(tokenizer), {"stage": "preference"}) if data_cfg.cache else None)
    if key and (hit := cache.load(data_cfg, key)):
        splits, stats = hit
        return PreparedData(train=splits["train"], eval=splits["eval"],
                            stats={k: DataStats(**v) for k, v in stats.items()},
                            cache_path=str(cache.data_cache_dir(data_cfg) / key), cache_hit=True)
    loaded = LoadedSources.load(data_cfg, sources)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
    out, stats = {}, {}
    for split in ("train", "eval"):
        st, parts = DataStats(), []
        for _, src, rows, where, label in loaded.rows(split, st):
            parts.append(_process(rows.to_list(), src.format, tokenizer, stops, train_cfg, data_cfg.on_bad_row,
                                  where, st, label, keep_generation=split == "eval",
                                  drop_long=data_cfg.on_long_row == "drop"))
        merged = loaded.merge(parts, split, st)
        out[split], stats[split] = merged, st
        report(split, st)
    splits = DatasetDict(out)
    path = None
    if key:
        path = str(cache.save(data_cfg, key, splits, {k: v.as_dict() for k, v in stats.items()}))
        splits = cache.load(data_cfg, key)[0]
    return PreparedData(train=splits["train"], eval=splits["eval"], stats=stats, cache_path=path)


def _features(fmt: FormatConfig, keep_generation: bool) -> Features:
    columns = {c: _IDS for c in (PAIRED if fmt.strategy == "preference" else UNPAIRED)}
    if fmt.strategy == "unpaired":
        columns["label"] = Value("bool")
    return Features(columns | (_GENERATION if keep_generation else {}))


def _process(rows: list[dict], fmt: FormatConfig, tokenizer, stops: list[str], train_cfg: TrainConfig,
             on_bad_row: str, where: str, st: DataStats, label: str, keep_generation: bool,
             drop_long: bool = False) -> Dataset:
    chat = bool(tokenizer.chat_template)
    built: list[Optional[dict]] = []
    for row in rows:
        try:
            built.append(_row(row, fmt, tokenizer, stops, chat, train_cfg))
        except BadRow as exc:
            if on_bad_row == "error":
                raise ConfigError(f"{where}: row {row[ROW]} is malformed: {exc} (data.on_bad_row=error; "
                                  "data.on_bad_row=drop skips and counts such rows).") from None
            reason = f"{label}: {exc}" if label else str(exc)
            st.bad_rows[reason] = st.bad_rows.get(reason, 0) + 1
            if len(st.bad_row_examples) < 5:
                st.bad_row_examples.append(row[ROW])
            built.append(None)
    kept = [b for b in built if b is not None]
    if drop_long:  # data.on_long_row=drop: an answer cut at train.max_length leaves the row out (counted)
        st.dropped_long += sum(b["truncated"] for b in kept)
        kept = [b for b in kept if not b["truncated"]]
    st.rows_in += len(rows)
    st.rows_kept += len(kept)
    st.truncated += sum(b.pop("truncated") for b in kept)
    answers = [c for c in (PAIRED if fmt.strategy == "preference" else UNPAIRED) if c.endswith("_ids")][1:]
    st.trained_tokens += sum(len(b[c]) for b in kept for c in answers)
    st.tokens += sum(len(b["prompt_ids"]) * len(answers) for b in kept) + sum(len(b[c]) for b in kept for c in answers)
    if label:
        st.sources[label] = st.sources.get(label, 0) + len(kept)
    features = _features(fmt, keep_generation)
    columns = {name: [b.get(name) for b in kept] for name in features}
    return Dataset.from_dict(columns, features=features)


def _row(row: dict, fmt: FormatConfig, tokenizer, stops: list[str], chat: bool, train_cfg: TrainConfig) -> dict:
    prompt, answers = _parse(row, fmt, chat)
    if fmt.strategy == "preference" and answers["chosen"] == answers["rejected"]:
        raise BadRow("chosen and rejected are the same answer")
    said = prompt[-1]["content"] if chat else prompt
    for name, answer in answers.items():
        if len(said.strip()) > 20 and answer.strip().startswith(said.strip()):
            raise BadRow(f"{name} starts by repeating the prompt (is the prompt inside the answer column?)")
    prompt_text, completions = _render(prompt, answers, fmt, tokenizer, stops, chat)
    ids = encode(tokenizer, [prompt_text] + [prompt_text + c for c in completions.values()])[0]
    prompt_ids, max_length = ids[0], train_cfg.max_length
    if len(prompt_ids) >= max_length:
        raise BadRow(f"the prompt alone is {len(prompt_ids)} tokens, train.max_length={max_length}: truncation "
                     "would cut every answer token")
    out: dict[str, Any] = {"prompt_ids": prompt_ids, "truncated": False}
    for (name, _), full in zip(completions.items(), ids[1:]):
        if full[:len(prompt_ids)] != prompt_ids:  # a token spanning the boundary: no clean cut by position
            raise BadRow(f"the prompt's last token merges with the {name} answer's first; end the prompt on a "
                         "token boundary (a chat template does)")
        answer_ids = full[len(prompt_ids):]
        room = max_length - len(prompt_ids)
        if len(answer_ids) > room:  # keep_start, as TRL's collator would cut it
            answer_ids, out["truncated"] = answer_ids[:room], True
        out["chosen_ids" if name == "chosen" else "rejected_ids" if name == "rejected" else "completion_ids"] = answer_ids
    if fmt.strategy == "unpaired":
        out["label"] = _label(row, fmt)
    preferred = answers["chosen" if fmt.strategy == "preference" else "completion"]
    if chat:
        out["messages"] = prompt + [{"role": "assistant", "content": preferred}]
    else:
        answer = next(iter(completions.values()))
        out["text"], out["spans"] = prompt_text + answer, [[len(prompt_text), len(prompt_text) + len(answer)]]
    return out


def _label(row: dict, fmt: FormatConfig) -> bool:
    value = row.get(fmt.label_column)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise BadRow(f"{fmt.label_column} is {value!r}, not true/false (desirable or not)")


def _parse(row: dict, fmt: FormatConfig, chat: bool) -> tuple[Any, dict[str, str]]:
    """(prompt, {answer name: answer text}): the prompt as messages (chat) or text."""
    names = answer_columns(fmt)
    columns = {"chosen": fmt.chosen_column, "rejected": fmt.rejected_column, "completion": fmt.completion_column}
    # One message object ({role, content} or ShareGPT {from, value}: LLaMA-Factory's ranking rows, Axolotl's chat
    # template pairs) is a conversation of one turn.
    raw = {n: [v] if isinstance(v, dict) else v for n, v in ((n, row.get(columns[n])) for n in names)}
    prompt = row.get(fmt.prompt_column)
    if all(isinstance(v, list) for v in raw.values()):  # conversations
        if not chat:
            raise BadRow("conversations need a chat template (tokenizer.chat_template=chatml)")
        convs = {n: [dict(m) for m in v] for n, v in raw.items()}
        if prompt is None:  # implicit prompt: the turns the answers share
            prompt = _common_prefix(list(convs.values()))
            convs = {n: c[len(prompt):] for n, c in convs.items()}
        for n, c in convs.items():
            if len(c) != 1 or (c[0].get("role") or c[0].get("from")) not in ("assistant", "gpt"):
                raise BadRow(f"{columns[n]} must end in exactly one assistant turn after the prompt")
        raw = {n: c[0].get("content") if c[0].get("content") is not None else c[0].get("value")
               for n, c in convs.items()}
    answers = {n: text_field({columns[n]: v}, columns[n]) for n, v in raw.items()}
    if prompt is None:
        raise BadRow(f"{fmt.prompt_column} is missing (text answers need a prompt column)")
    if not chat:
        if not isinstance(prompt, str):
            raise BadRow("conversations need a chat template (tokenizer.chat_template=chatml)")
        return text_field({fmt.prompt_column: prompt}, fmt.prompt_column), answers
    turns = [{"role": "user", "content": text_field({fmt.prompt_column: prompt}, fmt.prompt_column)}] \
        if isinstance(prompt, str) else [dict(m) for m in prompt]
    # The SFT strategy's checks (roles, empty turns) and its system-prompt rule, on the prompt + an answer.
    messages = conversational({"messages": turns + [{"role": "assistant", "content": answers[names[0]]}]},
                              FormatConfig(messages_column="messages", system_prompt=fmt.system_prompt),
                              None)["messages"]
    return messages[:-1], answers


def scored_sequences(pairs: list[tuple[Any, str]], fmt: FormatConfig, tokenizer, max_length: int) -> list[list[int]]:
    """Token ids of prompt + answer per pair, rendered as this stage renders one side of a training pair (the chat
    template with the format's system-prompt rule, the answer through its end-of-turn token; without a template the
    text + EOS), the answer's end cut at `max_length`: what a reward model scores (its held-out pairs were built the
    same way by `prepare_preferences`). A prompt is text (one user turn) or {role, content} messages; an empty answer
    is scored too."""
    chat = bool(tokenizer.chat_template)
    texts = []
    if chat:
        stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
        convs = []
        for prompt, answer in pairs:  # the training rows' system-prompt rule (rule 5)
            convs.append(list(with_system_prompt(prompt, fmt)) + [{"role": "assistant", "content": answer}])
        for result in render_conversations(tokenizer, convs, stops):
            if isinstance(result, Exception):
                raise BadRow(str(result))
            text, spans = result
            texts.append(text[:spans[-1][1]] if spans else text)
    else:
        eos = tokenizer.eos_token or ""
        for prompt, answer in pairs:
            if not isinstance(prompt, str):
                raise BadRow("conversations need a chat template (tokenizer.chat_template=chatml)")
            texts.append(prompt + (answer if not fmt.append_eos or answer.endswith(eos) else answer + eos))
    return [ids[:max_length] for ids in encode(tokenizer, texts)[0]] if texts else []


def _common_prefix(convs: list[list[dict]]) -> list[dict]:
    n = 0
    while all(len(c) > n for c in convs) and all(c[n] == convs[0][n] for c in convs):
        n += 1
    return convs[0][:n]


def _render(prompt: Any, answers: dict[str, str], fmt: FormatConfig, tokenizer, stops: list[str],
            chat: bool) -> tuple[str, dict[str, str]]:
    """(prompt text, {name: answer text through its end-of-turn token}) as training will tokenize them."""
    if not chat:
        eos = tokenizer.eos_token or ""
        return prompt, {n: a if not fmt.append_eos or a.endswith(eos) else a + eos for n, a in answers.items()}
    convs = [prompt + [{"role": "assistant", "content": a}] for a in answers.values()]
    rendered = render_conversations(tokenizer, convs, stops)
    completions, prompt_text = {}, None
    for name, result in zip(answers, rendered):
        if isinstance(result, Exception):
            raise BadRow(str(result))
        text, spans = result
        start, end = spans[-1]
        if prompt_text is None:
            prompt_text = text[:start]
        completions[name] = text[start:end]
    # What inference sends (inference.prompt_ids): the same prompt with the generation prompt.
    if tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) != prompt_text:
        raise BadRow("the chat template renders this prompt differently for generation than before its answer: "
                     "training would not see what inference sends")
    return prompt_text, completions
