"""Reward functions of online RL (task=grpo|rloo): the built-in ones, and the strict loader of the `rewards` list.

A reward function is called as TRL calls it: f(prompts=[...], completions=[...], completion_ids=[...], **columns,
trainer_state=..., log_extra=..., log_metric=...), one list entry per completion (a prompt's columns repeated for
each of its completions), and returns one float per completion (None: no opinion on that one). Your own function is
user code (DESIGN rule 12): `load_rewards` imports it strictly, binds its signature to what it will be called with
before any weights load (exit 2 on a mismatch), and wraps it so that every batch's output is checked (the wrong
length, None for every completion, NaN or inf stop the run naming the reward). Nothing ever falls back to something
else.

To add a built-in: a function below taking (prompts, completions, **columns) plus its own keyword arguments, and its
name in BUILTIN.
"""

from __future__ import annotations

import datetime as dt
import inspect
import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from tuneforge.config.errors import ConfigError, closest
from tuneforge.config.user_code import is_path, load_function
from tuneforge.eval.metrics import normalize

# What TRL passes besides the row's columns (GRPOTrainer/RLOOTrainer._calculate_rewards, TRL 1.16).
TRL_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


def _text(completion: Any) -> str:
    """A completion as text: TRL gives text for text prompts, a list of messages for conversational ones."""
    if isinstance(completion, list):
        return str(completion[-1].get("content", "")) if completion else ""
    return str(completion)


def _column(columns: dict, column: str, n: int) -> list:
    values = columns.get(column)
    if values is None or len(values) != n:  # load_rewards checked the column exists; this is a library change
        raise ValueError(f"column {column!r} did not reach the reward function")
    return list(values)


# --- built-ins ---------------------------------------------------------------------------------------------------

def exact_match(prompts, completions, column: str = "answer", normalized: bool = True, **columns) -> list[float]:
    """1.0 when the completion equals the row's `column` (SQuAD-normalised unless normalized=false), else 0.0."""
    refs = _column(columns, column, len(completions))
    same = (lambda a, b: normalize(a) == normalize(b)) if normalized else (lambda a, b: a.strip() == b.strip())
    return [float(same(_text(c), str(r))) for c, r in zip(completions, refs)]


def regex(prompts, completions, pattern: str = "", full: bool = True, **columns) -> list[float]:
    """1.0 when the completion (stripped) matches `pattern` (the whole of it when full=true, else anywhere)."""
    compiled = re.compile(pattern)
    match = compiled.fullmatch if full else compiled.search
    return [float(match(_text(c).strip()) is not None) for c in completions]


def overlong(prompts, completions, completion_ids=None, max_tokens: int = 512, buffer: Optional[int] = None,
             **columns) -> list[float]:
    """DAPO's soft overlong penalty: 0 up to max_tokens - buffer tokens, then linearly down to -1 at max_tokens
    (max_tokens defaults to train.max_completion_length, buffer to a quarter of it)."""
    buffer = buffer if buffer is not None else max(1, max_tokens // 4)
    start = max_tokens - buffer
    lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else [len(_text(c)) for c in completions]
    return [0.0 if n <= start else max(-1.0, -(n - start) / buffer) for n in lengths]


_ISO = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")


def iso_date(prompts, completions, column: str = "answer", partial: bool = True, **columns) -> list[float]:
    """The correct ISO 8601 date (the row's `column`) and nothing else: 1.0. With partial credit (shaped, for a
    start whose groups would otherwise all score 0): 0.5 for the right date inside other text, 0.1 per right field
    (year, month, day) of the first YYYY-MM-DD written, 0.1 for the right year written anywhere, else 0."""
    out = []
    for completion, ref in zip(completions, _column(columns, column, len(completions))):
        text, ref = _text(completion).strip(), str(ref).strip()
        if text == ref:
            out.append(1.0)
            continue
        if not partial:
            out.append(0.0)
            continue
        found = _ISO.search(text)
        want = ref.split("-")
        if found and list(found.groups()) == want:
            out.append(0.5)
        elif found:
            out.append(0.1 * sum(a == b for a, b in zip(found.groups(), want)))
        else:
            out.append(0.1 if want and want[0] in text else 0.0)
    return out


_NUMBER = re.compile(r"[-+]?(?:\d+(?:[.,]\d+)*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")


def _as_number(text: str) -> Optional[float]:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def number(prompts, completions, column: str = "answer", tolerance: float = 1e-6, **columns) -> list[float]:
    """1.0 when the last number of the completion equals the row's `column` (a number, or text holding one) within
    `tolerance` (relative), else 0.0."""
    out = []
    for completion, ref in zip(completions, _column(columns, column, len(completions))):
        got, want = _as_number(_text(completion)), _as_number(str(ref))
        out.append(float(got is not None and want is not None and math.isclose(got, want, rel_tol=tolerance,
                                                                               abs_tol=tolerance)))
    return out


def date_equivalent(prompts, completions, column: str = "answer", **columns) -> list[float]:
    """1.0 when the completion names the same calendar day as the row's `column`, however it is written (ISO,
    'March 5, 2021', '5 March 2021', '2021/03/05'), else 0.0."""
    out = []
    for completion, ref in zip(completions, _column(columns, column, len(completions))):
        got, want = _parse_date(_text(completion)), _parse_date(str(ref))
        out.append(float(got is not None and got == want))
    return out


_DATE_FORMATS = ("%Y-%m-%d", "%Y/%m/%d", "%B %d, %Y", "%d %B %Y", "%b %d %Y", "%b %d, %Y", "%d-%b-%Y", "%A, %d %B %Y")


def _parse_date(text: str) -> Optional[dt.date]:
    text = re.sub(r"(\d)(st|nd|rd|th)\b", r"\1", text.strip().rstrip(".")).replace(" of ", " ")
    for fmt in _DATE_FORMATS:
        try:
            return dt.datetime.strptime(text, fmt).date()
        except ValueError:
            continue
    return None


BUILTIN: dict[str, Callable[..., list[float]]] = {
    "exact_match": exact_match, "regex": regex, "overlong": overlong, "iso_date": iso_date, "number": number,
    "date_equivalent": date_equivalent,
}


# --- the strict loader -------------------------------------------------------------------------------------------

@dataclass
class Reward:
    """One entry of the `rewards` list, loaded: `name` is how metrics and tables call it (rewards/NAME)."""

    name: str
    function: Callable[..., Any]
    weight: float
    kwargs: dict[str, Any]
    key: str  # rewards[i], for messages

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        return self.function(prompts=prompts, completions=completions, **kwargs, **self.kwargs)


class RewardOutputError(ConfigError):
    """A reward function returned something that is not one finite number (or None) per completion."""


def _plain(value: Any) -> Any:
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except ImportError:  # pragma: no cover - omegaconf comes with hydra, always installed
        return value


def load_rewards(entries: Sequence[Any], columns: Sequence[str], defaults: Optional[dict[str, Any]] = None) -> list[Reward]:
    """The `rewards` list as callables, each checked against what it will be called with: TRL's arguments plus the
    prompt rows' `columns` and the entry's kwargs (a signature that cannot take them, a missing column, a module
    that does not import: ConfigError, before any weights load). `defaults`: keyword arguments a built-in takes
    from the run's config when its entry does not set them (overlong's max_tokens)."""
    if not entries:
        raise ConfigError("rewards is empty: online RL learns from rewards; add at least one, e.g. "
                          "rewards=[{name:exact_match,kwargs:{column:answer}}] (built-ins: "
                          f"{', '.join(BUILTIN)}; or your own module:function).")
    loaded, seen = [], {}
    for i, entry in enumerate(entries):
        key = f"rewards[{i}]"
        name, kwargs = entry.name, dict(_plain(entry.kwargs) or {})
        if getattr(entry, "model", None):  # a reward model (eval/reward_model.py): its path checked here
            from tuneforge.eval.reward_model import ModelReward

            fn, short, name, kwargs = ModelReward(entry.model, key, kwargs), name or "reward_model", entry.model, {}
        elif is_path(name):
            fn, short = load_function(name, f"{key}.name"), name.partition(":")[2]
        elif name in BUILTIN:
            fn, short = BUILTIN[name], name
            params = inspect.signature(fn).parameters
            kwargs = {k: v for k, v in (defaults or {}).items() if k in params and k not in kwargs} | kwargs
        else:
            raise ConfigError(f"{key}.name={name!r} is neither a built-in reward ({', '.join(BUILTIN)}) nor "
                              f"module:function.{closest(name, list(BUILTIN))}")
        _check_signature(fn, name, key, kwargs, columns)
        if not isinstance(entry.weight, numbers.Real) or not math.isfinite(entry.weight):
            raise ConfigError(f"{key}.weight={entry.weight!r} must be a finite number.")
        seen[short] = seen.get(short, 0) + 1
        label = short if seen[short] == 1 else f"{short}_{seen[short]}"  # the same function twice, other kwargs
        loaded.append(Reward(label, fn, float(entry.weight), kwargs, key))
    return loaded


def _check_signature(fn: Callable, name: str, key: str, kwargs: dict, columns: Sequence[str]) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature (C code): its first batch's output check still applies
    params = signature.parameters
    # A built-in's **columns takes the rows' columns only: its own keywords are named, so a misspelt one is refused.
    takes_any = fn not in BUILTIN.values() and any(p.kind is p.VAR_KEYWORD for p in params.values())
    for k in kwargs:
        if k in TRL_ARGUMENTS or k in columns:
            raise ConfigError(f"{key}.kwargs.{k}: {k} is already an argument of every reward call (a TRL argument "
                              "or a column of the prompt rows); rename the keyword.")
        if k not in params and not takes_any:
            own = [p for p, v in params.items() if v.kind is v.KEYWORD_ONLY or (v.default is not v.empty)]
            raise ConfigError(f"{key}.kwargs.{k}: {name} takes no {k!r} (its keywords: {', '.join(own) or 'none'})."
                              f"{closest(k, own)}")
    column = kwargs.get("column", params["column"].default if "column" in params else None)
    if isinstance(column, str) and "column" in params and column not in columns:
        raise ConfigError(f"{key} ({name}) reads column {column!r}, but the prompt rows have "
                          f"{', '.join(columns) or 'no other column'}: set {key}.kwargs.column, or map a column "
                          f"with data.columns.OLD={column}.")
    call = {a: None for a in TRL_ARGUMENTS} | {c: None for c in columns} | kwargs
    try:
        signature.bind(**call)
    except TypeError as exc:
        raise ConfigError(f"{key}: {name} cannot be called as a reward function: {exc}. It is called as "
                          f"f(prompts, completions, **columns) with keyword arguments {', '.join(call)}; give it a "
                          "**kwargs parameter for those it does not read.") from None


def checked(reward: Reward) -> Callable[..., list[Optional[float]]]:
    """`reward` as the function TRL calls (named after it: TRL logs rewards/NAME), every output checked."""

    def call(prompts, completions, **kwargs):
        values = reward(prompts, completions, **kwargs)
        check_output(reward, values, len(completions), (kwargs.get("trainer_state") or _NoState).global_step)
        return [None if v is None else float(v) for v in values]

    call.__name__ = call.__qualname__ = reward.name
    return call


class _NoState:
    global_step = 0


def check_output(reward: Reward, values: Any, expected: int, step: int) -> None:
    """One finite number (or None) per completion, not None for all of them; else RewardOutputError."""
    where = f"reward {reward.name!r} ({reward.key}) at step {step}"
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RewardOutputError(f"{where} returned {type(values).__name__}, not a list of one float per completion.")
    values = list(values.tolist() if hasattr(values, "tolist") else values)
    if len(values) != expected:
        raise RewardOutputError(f"{where} returned {len(values)} values for {expected} completions: return one "
                                "float per completion (None for no opinion).")
    bad = [(i, v) for i, v in enumerate(values)
           if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v))]
    if bad:
        i, v = bad[0]
        raise RewardOutputError(f"{where} returned {v!r} for completion {i} ({len(bad)} of {expected} values are not "
                                "finite numbers): return a finite float, or None for no opinion.")
    if values and all(v is None for v in values):
        raise RewardOutputError(f"{where} returned None for every completion: nothing scores this batch.")


def score(rewards: Sequence[Reward], prompts: list, completions: list[str], rows: list[dict],
          completion_ids: Optional[list[list[int]]] = None) -> dict[str, list[Optional[float]]]:
    """Each reward's values for completions of `prompts` with their rows' columns (what the doctor and the
    held-out table score; training scores through TRL), output-checked like training's."""
    columns = {k: [r[k] for r in rows] for k in (rows[0] if rows else {})}
    extra = {"completion_ids": completion_ids if completion_ids is not None else [[] for _ in completions],
             "trainer_state": None, "log_extra": lambda *a, **k: None, "log_metric": lambda *a, **k: None}
    out = {}
    for reward in rewards:
        values = reward(prompts, completions, **columns, **extra)
        check_output(reward, values, len(completions), 0)
        out[reward.name] = [None if v is None else float(v) for v in values]
    return out


def weighted_total(rewards: Sequence[Reward], values: dict[str, list[Optional[float]]]) -> list[float]:
    """TRL's total reward per completion: the weighted sum over rewards, a None counting as no term (nansum)."""
    n = len(next(iter(values.values()))) if values else 0
    return [sum(r.weight * values[r.name][i] for r in rewards if values[r.name][i] is not None) for i in range(n)]
