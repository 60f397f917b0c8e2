"""The named chat templates `tokenizer.chat_template=NAME` selects (models/tokenizer.py applies them)."""

from __future__ import annotations

# chatml is the only one written so far; llama3, qwen2.5, qwen3, mistral, gemma and phi3 are issue 33, part 5.
NAMES = ("chatml",)
