"""The demo data set: dates written in many styles, to be rewritten as ISO 8601 (YYYY-MM-DD).

Generated deterministically from a seed, so every machine trains and scores on the same rows.
A 135M instruct model answers in prose or with the wrong field order before fine-tuning; a few
minutes of LoRA on a CPU teach it the format, which exact match measures without ambiguity.
"""

from __future__ import annotations

import calendar
import datetime as dt
import random

PROMPT = "Rewrite this date in ISO 8601 format (YYYY-MM-DD). Answer with the date only.\nDate: {date}"


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _styles(d: dt.date) -> list[str]:
    month, mon = calendar.month_name[d.month], calendar.month_abbr[d.month]
    weekday = calendar.day_name[d.weekday()]
    return [
        f"{month} {d.day}, {d.year}",
        f"{d.day} {month} {d.year}",
        f"{_ordinal(d.day)} of {month}, {d.year}",
        f"{mon} {d.day} {d.year}",
        f"{weekday}, {d.day} {month} {d.year}",
        f"{month.upper()} {d.day}, {d.year}",
        f"{d.year}/{d.month:02d}/{d.day:02d}",
        f"the {_ordinal(d.day)} of {month} {d.year}",
        f"{mon}. {_ordinal(d.day)}, {d.year}",
        f"{d.day}-{mon}-{d.year}",
    ]


def generate_dates(rows: int, seed: int = 42) -> list[dict[str, str]]:
    """`rows` prompt/completion pairs; the same seed always gives the same rows."""
    rng = random.Random(seed)
    start, span = dt.date(1950, 1, 1).toordinal(), 100 * 365
    out = []
    for _ in range(rows):
        d = dt.date.fromordinal(start + rng.randrange(span))
        text = rng.choice(_styles(d))
        out.append({"prompt": PROMPT.format(date=text), "completion": d.isoformat()})
    return out


def _wrong_rewrites(d: dt.date, written: str) -> list[str]:
    """Plausible answers that are not the ISO date alone: what the untrained model writes (the ISO date and then
    more text, a "Date:" label, the input echoed) and other field orders."""
    iso = d.isoformat()
    wrong = [
        f"{iso}\n\nThe original date is {written}.",
        f"Date: {iso}",
        f"Date: {written}",
        f"{d.day:02d}-{d.month:02d}-{d.year}",
        f"{d.month:02d}/{d.day:02d}/{d.year}",
        f"{d.year}-{d.day:02d}-{d.month:02d}",
    ]
    return [w for w in wrong if w != iso]


def generate_date_preferences(rows: int, seed: int = 42) -> list[dict[str, str]]:
    """The dates as preference pairs (task=dpo): chosen = the ISO date, rejected = a plausible wrong rewrite.
    The prompts are generate_dates' with the same seed, so SFT and DPO demos share their held-out prompts."""
    rng = random.Random(seed + 1)
    out = []
    for row in generate_dates(rows, seed):
        d, written = dt.date.fromisoformat(row["completion"]), row["prompt"].rsplit("Date: ", 1)[1]
        out.append({"prompt": row["prompt"], "chosen": row["completion"],
                    "rejected": rng.choice(_wrong_rewrites(d, written))})
    return out


from tuneforge.data.topics import generate_topics  # noqa: E402  (registry below)

BUILTIN = {"dates": generate_dates, "date_preferences": generate_date_preferences, "topics": generate_topics}
