"""`tuneforge infer`: answer prompts with a trained run, through the shared inference helper; with a reward model
(a task=reward run), print the score of each prompt + answer, through the shared scoring path (eval/reward_model.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from tuneforge.commands.base import as_object, hydra_command, input_file, output_path
from tuneforge.config.compose import quote_free_text
from tuneforge.config.errors import ConfigError
from tuneforge.config.formats import TEXT_STRATEGIES
from tuneforge.runs import rundir


@dataclass
class InferConfig:
    """The `infer` command's config (conf/infer.yaml)."""

    run_dir: str = MISSING
    prompt: Optional[str] = None
    # A reward run: the answer to score after `prompt` (a prompts_file gives one per row: answer, or messages ending in
    # an assistant turn).
    answer: Optional[str] = None
    prompts_file: Optional[str] = None
    # JSONL of {prompt, completion} per answer (answers are printed too); a reward run: {prompt, answer, score}.
    output_file: Optional[str] = None
    chat: bool = False
    max_new_tokens: int = 128
    max_input_tokens: int = 1024
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def _jsonl_rows(path: str):
    """(line number, row) of each non-empty line of a JSONL file; a line that is not JSON is one line, exit 2."""
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{n}: not valid JSON ({exc.msg}).") from None


def read_prompts(path: str) -> list:
    """JSONL: one {"prompt": "..."} or {"messages": [...]} per line."""
    prompts = []
    for n, row in _jsonl_rows(path):
        if "messages" in row:
            prompts.append(row["messages"])
        elif "prompt" in row:
            prompts.append(row["prompt"])
        else:
            raise ConfigError(f"{path}:{n}: expected a 'prompt' or 'messages' key, found {sorted(row)}.")
    return prompts


def read_answers(path: str) -> list[tuple]:
    """JSONL of (prompt, answer) to score: one {"prompt": ..., "answer": ...} or {"messages": [..., an assistant
    turn]} per line."""
    pairs = []
    for n, row in _jsonl_rows(path):
        messages = row.get("messages") if isinstance(row, dict) else None
        if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
                and messages[-1].get("role") == "assistant":
            pairs.append((messages[:-1], str(messages[-1].get("content", ""))))
        elif isinstance(row, dict) and "prompt" in row and isinstance(row.get("answer"), str):
            pairs.append((row["prompt"], row["answer"]))
        else:
            raise ConfigError(f"{path}:{n}: a reward model scores a prompt + answer: give 'prompt' and 'answer', or "
                              "'messages' ending in an assistant turn.")
    return pairs


def score(cfg: InferConfig) -> list[float]:
    """A reward run: the score of each prompt + answer (printed one per line), rendered as its training pairs were."""
    from tuneforge.eval.reward_model import load_reward_model

    if cfg.chat:
        raise ConfigError(f"{cfg.run_dir} is a reward model: it scores answers, it does not chat; give prompt=... "
                          "answer=..., or prompts_file=FILE.jsonl.")
    if cfg.prompts_file:
        pairs = read_answers(str(input_file("prompts_file", cfg.prompts_file)))
    elif cfg.prompt is not None and cfg.answer is not None:
        pairs = [(cfg.prompt, cfg.answer)]
    else:
        raise ConfigError(f'{cfg.run_dir} is a reward model: infer prints the score of an answer: prompt="..." '
                          'answer="...", or prompts_file=FILE.jsonl of {"prompt": ..., "answer": ...} rows.')
    if cfg.output_file:
        output_path("output_file", cfg.output_file)
    scores = load_reward_model(cfg.run_dir, batch_size=cfg.batch_size).score([p for p, _ in pairs],
                                                                             [a for _, a in pairs])
    for value in scores:
        print(f"{value:.4f}")
    if cfg.output_file:
        rundir.write_predictions(Path(cfg.output_file), [{"prompt": p, "answer": a, "score": s}
                                                         for (p, a), s in zip(pairs, scores)])
    return scores


def run(cfg: InferConfig) -> list:
    # Imported when the command runs: `tuneforge --help` reads every command module, and must not load torch.
    from tuneforge.config.tasks import task
    from tuneforge.data.formats import with_system_prompt
    from tuneforge.eval.inference import GenerationSettings, generate
    from tuneforge.models.trained import load_trained

    if task(rundir.read_config(Path(cfg.run_dir)).task).scores:
        return score(cfg)
    if cfg.answer is not None:
        raise ConfigError("answer= is scored by a reward model (a task=reward run); this run generates answers.")
    if not (cfg.prompt or cfg.prompts_file or cfg.chat):
        raise ConfigError('infer needs prompt="...", prompts_file=FILE.jsonl or chat=true.')
    # Before the model loads: a missing prompts file or output folder is one line, not a traceback minutes later.
    prompts = [cfg.prompt] if cfg.prompt else read_prompts(str(input_file("prompts_file", cfg.prompts_file))) \
        if cfg.prompts_file and not cfg.chat else None
    if cfg.output_file:
        output_path("output_file", cfg.output_file)
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, max_input_tokens=cfg.max_input_tokens,
                                  batch_size=cfg.batch_size, do_sample=cfg.do_sample,
                                  temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    model, tokenizer, run_cfg = load_trained(cfg.run_dir)
    chat_rows = bool(tokenizer.chat_template) and run_cfg.format.strategy not in TEXT_STRATEGIES
    # Chat prompts get the run's system prompt, as its training rows did (rule 5); text formats are raw text.
    as_trained = (lambda p: with_system_prompt(p, run_cfg.format)) if chat_rows else (lambda p: p)
    if cfg.chat:
        return chat(model, tokenizer, settings, as_trained)
    answers = generate(model, tokenizer, [as_trained(p) for p in prompts], settings)
    for answer in answers:
        print(answer)
    if cfg.output_file:
        rundir.write_predictions(Path(cfg.output_file), [{"prompt": p, "completion": a} for p, a in zip(prompts, answers)])
    return answers


def chat(model, tokenizer, settings, as_trained) -> list[str]:
    """Interactive multi-turn chat with streamed answers; an empty line or Ctrl-D ends it."""
    from tuneforge.eval.inference import generate

    messages, answers = [], []
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        print("model> ", end="", flush=True)
        answer = generate(model, tokenizer, [as_trained(messages)], settings, stream=True)[0]
        messages.append({"role": "assistant", "content": answer})
        answers.append(answer)
    return answers


def app(dcfg) -> None:
    run(as_object(dcfg))


COMMAND = hydra_command(
    "infer", "answer with a trained run",
    'tuneforge infer run_dir=PATH prompt="..."   (or prompts_file=FILE.jsonl [output_file=OUT.jsonl], or chat=true; '
    'a reward run: prompt="..." answer="...")',
    config_name="infer", schema=InferConfig, app=app,
    # prompt= is a person's text, typed as is: quoted for Hydra here.
    rewrite_args=quote_free_text)
