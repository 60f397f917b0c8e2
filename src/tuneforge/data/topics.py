"""The classification demo set: short news-like sentences about one of four topics.

Generated deterministically from a seed. Sentences share their frame ("Reports say that ...",
"Yesterday ...") across topics, so only the content words carry the label.
"""

from __future__ import annotations

import random

TOPICS = {
    "sports": {
        "subject": ["the striker", "the home team", "the goalkeeper", "the coach", "the sprinter", "the captain"],
        "event": ["scored twice in the final minutes", "won the championship match", "broke the national record",
                  "was injured during training", "signed a new contract with the club", "lost the semi-final on penalties"],
    },
    "weather": {
        "subject": ["a cold front", "the storm", "heavy rain", "the heatwave", "thick fog", "strong winds"],
        "event": ["flooded several streets", "brought temperatures below freezing", "is expected to last until Sunday",
                  "closed the mountain roads", "knocked down power lines", "delayed flights at the airport"],
    },
    "food": {
        "subject": ["the new bakery", "the chef", "the street market", "a family restaurant", "the cheese maker",
                    "the vineyard"],
        "event": ["introduced a seasonal tasting menu", "won an award for its sourdough bread",
                  "started serving vegan dishes", "sold out of fresh pastries by noon",
                  "shared a recipe for tomato soup", "opened a second kitchen downtown"],
    },
    "technology": {
        "subject": ["the start-up", "the chip maker", "a software company", "the research lab", "the phone maker",
                    "the cloud provider"],
        "event": ["released a faster processor", "patched a security flaw in its app", "launched an open-source compiler",
                  "announced a new battery design", "moved its servers to renewable power",
                  "shipped an update to its operating system"],
    },
}
FRAMES = ["{s} {e} {w}.", "Reports say that {s} {e} {w}.", "Yesterday {s} {e} {w}.",
          "According to locals, {s} {e} {w}.", "In the morning news: {s} {e} {w}."]
WHERE = ["in Lisbon", "near Oslo", "in the capital", "this week", "on Tuesday", "in a small town", "last night",
         "across the region"]


def generate_topics(rows: int, seed: int = 42) -> list[dict[str, str]]:
    """`rows` {text, label} pairs, labels balanced in expectation."""
    rng = random.Random(seed)
    names = sorted(TOPICS)
    out = []
    for _ in range(rows):
        label = rng.choice(names)
        words = TOPICS[label]
        text = rng.choice(FRAMES).format(s=rng.choice(words["subject"]), e=rng.choice(words["event"]),
                                         w=rng.choice(WHERE))
        out.append({"text": text[0].upper() + text[1:], "label": label})
    return out
