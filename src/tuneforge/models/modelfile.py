"""An Ollama Modelfile for an exported GGUF: the training chat template converted to Ollama's Go template, the stop
tokens and the run's system prompt.

Ollama does not run Jinja: a template must be rewritten for it. That is done only for the template families whose
turns are one fixed prefix and suffix per role (ChatML, Llama 3, Phi-3), and only after the run's own template has
rendered probe conversations exactly as the family's pieces do; any other template is refused with the reason. The
Go template is built from the same pieces that passed that check (Go itself is not run here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from tuneforge.config.errors import ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    # (before, after) the content of each role's turn, and the text that opens the answer.
    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str
    # Written once before the conversation (Llama 3's <|begin_of_text|>).
    start: str = ""

    def render(self, system: Optional[str], turns: list[dict[str, Any]]) -> str:
        """The prompt text this family gives a conversation (`system` None: no system turn), with the generation
        prompt: what the Go template renders, in Python, to check the pieces against the run's template."""
        text = self.start + (self.system[0] + system + self.system[1] if system is not None else "")
        for turn in turns:
            before, after = self.user if turn["role"] == "user" else self.assistant
            text += before + turn["content"] + after
        return text + self.generation

    def go_template(self, always_system: bool) -> str:
        def go(text: str) -> str:  # a literal in Go's template syntax
            return text.replace("{{", '{{"{{"}}')

        system = go(self.system[0]) + "{{ .System }}" + go(self.system[1])
        return (go(self.start)
                + (system if always_system else "{{ if .System }}" + system + "{{ end }}")
                # No `{{-`: it would trim the newline that ends the turn before it.
                + '{{ range .Messages }}{{ if eq .Role "user" }}' + go(self.user[0]) + "{{ .Content }}"
                + go(self.user[1]) + '{{ else if eq .Role "assistant" }}' + go(self.assistant[0]) + "{{ .Content }}"
                + go(self.assistant[1]) + "{{ end }}{{ end }}" + go(self.generation))


def _tags(open_: str, close: str, sep: str = "\n") -> dict:
    return {role: (open_.format(role=role) + sep, close) for role in ("system", "user", "assistant")}


_CHATML = _tags("<|im_start|>{role}", "<|im_end|>\n")
_LLAMA3 = _tags("<|start_header_id|>{role}<|end_header_id|>", "<|eot_id|>", "\n\n")
_PHI3 = _tags("<|{role}|>", "<|end|>\n")
FAMILIES = (
    Family("chatml", _CHATML["system"], _CHATML["user"], _CHATML["assistant"], "<|im_start|>assistant\n"),
    Family("llama3", _LLAMA3["system"], _LLAMA3["user"], _LLAMA3["assistant"],
           "<|start_header_id|>assistant<|end_header_id|>\n\n", start="<|begin_of_text|>"),
    Family("phi3", _PHI3["system"], _PHI3["user"], _PHI3["assistant"], "<|assistant|>\n"),
)
# Conversations the run's template and a family must render alike ("\x00" never occurs in a real template).
_PROBES = ([{"role": "user", "content": "Q1"}],
           [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}])
_MARK = "\x00SYSTEM\x00"


def _render(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _default_system(tokenizer, fam: Family) -> Optional[str] | bool:
    """The system text the run's template writes when a conversation has none: None when it writes no system turn,
    False when its output is not this family's."""
    text = _render(tokenizer, _PROBES[0])
    if text == fam.render(None, _PROBES[0]):
        return None
    before, _, after = fam.render(_MARK, _PROBES[0]).partition(_MARK)
    if text.startswith(before) and text.endswith(after) and len(text) >= len(before) + len(after):
        return text[len(before):len(text) - len(after)]
    return False


def convert(tokenizer, system_prompt: Optional[str]) -> tuple[Family, Optional[str]]:
    """(the family whose pieces render exactly as the run's template, the SYSTEM the Modelfile sets), or a refusal.
    `system_prompt`: the run's format.system_prompt (None: its conversations had no system turn of their own)."""
    if not tokenizer.chat_template:
        raise ConfigError("format=ollama: the run has no chat template to convert for Ollama.")
    reasons = []
    for fam in FAMILIES:
        try:
            default = _default_system(tokenizer, fam)
            same = default is not False and all(
                _render(tokenizer, [{"role": "system", "content": "S"}, *probe]) == fam.render("S", probe)
                for probe in _PROBES)
        except Exception as exc:  # noqa: BLE001 (a template may refuse a system turn: then it is not this family)
            reasons.append(f"{fam.name}: {type(exc).__name__}")
            continue
        if same:
            return fam, system_prompt if system_prompt is not None else default
        reasons.append(f"{fam.name}: renders differently")
    raise ConfigError("format=ollama: the run's chat template is none of the families tuneforge converts to Ollama's "
                      f"Go template ({'; '.join(reasons)}); Ollama does not run Jinja, so a Modelfile with another "
                      "template would prompt the model unlike training. Use format=gguf and give the template to "
                      "your server yourself.")


def modelfile(gguf_name: str, fam: Family, system: Optional[str], stops: list[str]) -> str:
    """The Modelfile text: FROM the GGUF beside it, the converted template, the stop tokens, the system prompt."""
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{fam.go_template(always_system=system is not None)}"""']
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def rendered_like_training(tokenizer, fam: Family, system: Optional[str], conversations: list) -> int:
    """How many of `conversations` (message lists, the held-out prompts) the family's pieces render exactly as the
    run's template does, with the Modelfile's system prompt where a conversation has none."""
    same = 0
    for messages in conversations:
        own = messages[0]["content"] if messages and messages[0]["role"] == "system" else system
        turns = [m for m in messages if m["role"] != "system"]
        same += fam.render(own, turns) == _render(tokenizer, messages)
    return same
