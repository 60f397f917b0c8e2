"""Sample generations during training: a few held-out prompts answered every N steps.

They go through the shared inference helper (eval mode, KV cache, left padding) and land in
`RUN/samples.jsonl` and the log, so a user sees the model learn (or break) without waiting for the end.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tuneforge.eval.inference import GenerationSettings, Rendered, generate

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"


class SampleGenerations(TrainerCallback):
    """Every `every` optimizer steps (and at the end), answer `pairs` and append them to samples.jsonl."""

    def __init__(self, tokenizer, pairs: list[tuple[Any, str]], settings: GenerationSettings, every: int, path: Path):
        eos = tokenizer.eos_token or "\0"
        self.pairs = [(prompt, reference.removesuffix(eos)) for prompt, reference in pairs]
        self.tokenizer, self.settings, self.every, self.path = tokenizer, settings, every, path
        self._last_step = -1

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._sample(model, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != self._last_step:
            self._sample(model, state)

    def _sample(self, model, state) -> None:
        self._last_step = state.global_step
        # Every rank generates (a sharded model generates together); the main process writes.
        answers = generate(model, self.tokenizer, [p for p, _ in self.pairs], self.settings)
        if not state.is_world_process_zero:
            return
        with self.path.open("a") as fh:
            for (prompt, reference), answer in zip(self.pairs, answers):
                prompt = prompt.text if isinstance(prompt, Rendered) else prompt
                fh.write(json.dumps({"step": state.global_step, "prompt": prompt, "reference": reference,
                                     "prediction": answer}, ensure_ascii=False) + "\n")
        log.info("step %d samples: %s", state.global_step, " | ".join(repr(a) for a in answers))
