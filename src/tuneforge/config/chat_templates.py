"""The named chat templates `tokenizer.chat_template=NAME` selects, written from each format's published
specification (models/tokenizer.py applies them: the template, and its special tokens where the vocabulary lacks
them).

Every template here keeps the rules the data stage relies on (DESIGN section 5): each assistant turn ends with its
end-of-turn token right after the content (so that token is trained, rule 2), the generation prompt is exactly the
text that precedes an assistant content in training (rule 5), and a conversation renders as the concatenation of
its turns, so a prefix of the conversation renders as a prefix of the text (the assistant spans are found by
rendering, rule 6). Tool calls and multimodal contents are not part of these templates.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    # The Jinja template (transformers' chat-template variables: messages, add_generation_prompt, bos_token, ...).
    text: str
    # Special tokens the template writes; added to a vocabulary that lacks them (new embedding rows, trained).
    tokens: tuple[str, ...]
    # The token that ends an assistant turn (a stop token for generation); "" when it is the tokenizer's EOS.
    end_of_turn: str
    # Where the format is published.
    spec: str


# BOS where the tokenizer has one (a template variable that is None would render as "None").
_BOS = "{{ bos_token if bos_token else '' }}"
# A system turn folded into the first user turn, for formats without a system role (Mistral, Gemma).
_FOLD_SYSTEM = ("{% set first_user = namespace(done=false) %}{% set system = messages[0]['content'] + '\\n\\n' "
                "if messages and messages[0]['role'] == 'system' else '' %}")


def _chatml(default_system: str = "", generation_suffix: str = "") -> str:
    """ChatML: `<|im_start|>ROLE\\nCONTENT<|im_end|>\\n` per turn; `generation_suffix` opens every assistant content
    (Qwen3's empty think block) so that training and the generation prompt agree."""
    system = ("{% if not messages or messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n" + default_system
              + "<|im_end|>\\n' }}{% endif %}") if default_system else ""
    return (system + "{% for message in messages %}{% if message['role'] == 'assistant' %}"
            "{{ '<|im_start|>assistant\\n" + generation_suffix + "' + message['content'] + '<|im_end|>\\n' }}"
            "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
            "{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n" + generation_suffix + "' }}{% endif %}")


TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (
    ChatTemplate("chatml", _chatml(), ("<|im_start|>", "<|im_end|>"), "<|im_end|>",
                 "OpenAI ChatML (openai-python chatml.md), as Qwen and SmolLM use it"),
    ChatTemplate("qwen2.5", _chatml("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
                 ("<|im_start|>", "<|im_end|>"), "<|im_end|>",
                 "Qwen2.5 instruct models: ChatML with Qwen's default system prompt when a conversation has none"),
    # Thinking off: Qwen3's non-thinking generation prompt (enable_thinking=False) opens the answer with an empty
    # think block, and every trained answer starts with the same block, so training sees what inference sends.
    ChatTemplate("qwen3", _chatml(generation_suffix="<think>\\n\\n</think>\\n\\n"),
                 ("<|im_start|>", "<|im_end|>", "<think>", "</think>"), "<|im_end|>",
                 "Qwen3: ChatML; non-thinking mode (an empty <think></think> block before each answer)"),
    ChatTemplate("llama3",
                 "{{ '<|begin_of_text|>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] "
                 "+ '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
                 ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>",
                 "Meta Llama 3 / 3.1 model card: prompt format"),
    # Mistral's instruct format ends an answer with EOS itself (no separate end-of-turn token); the answer follows
    # [/INST] directly, so the generation prompt is exactly the text before it. A system turn is folded into the
    # first user turn (the format has no system role).
    ChatTemplate("mistral",
                 _BOS + _FOLD_SYSTEM + "{% for message in messages %}{% if message['role'] == 'user' %}"
                 "{{ '[INST] ' + (system if not first_user.done else '') + message['content'] + ' [/INST]' }}"
                 "{% set first_user.done = true %}{% elif message['role'] == 'assistant' %}"
                 "{{ message['content'] + eos_token }}{% endif %}{% endfor %}",
                 ("[INST]", "[/INST]"), "",
                 "Mistral-7B-Instruct model card: <s>[INST] user [/INST]answer</s>[INST] ..."),
    ChatTemplate("gemma",
                 _BOS + _FOLD_SYSTEM + "{% for message in messages %}{% if message['role'] != 'system' %}"
                 "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
                 "{{ '<start_of_turn>' + role + '\\n' + (system if role == 'user' and not first_user.done else '') "
                 "+ message['content'] | trim + '<end_of_turn>\\n' }}"
                 "{% if role == 'user' %}{% set first_user.done = true %}{% endif %}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
                 ("<start_of_turn>", "<end_of_turn>"), "<end_of_turn>",
                 "Gemma 2/3 model card: <start_of_turn>user|model ... <end_of_turn>; no system role"),
    ChatTemplate("phi3",
                 "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
                 ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "<|end|>",
                 "Phi-3 model card: <|user|>\\n ... <|end|>\\n<|assistant|>\\n"),
)}

NAMES = tuple(TEMPLATES)
# End-of-turn tokens of the named templates (and of the models that use them): generation stops at them too.
END_OF_TURN_TOKENS = tuple(dict.fromkeys(t.end_of_turn for t in TEMPLATES.values() if t.end_of_turn))
