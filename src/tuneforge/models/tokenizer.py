"""Load the tokenizer and apply the fixes fine-tuning needs (DESIGN rule 1).

PAD must not be EOS: with PAD == EOS the collator masks EOS as padding and the model never learns
to stop. `pad_token=auto` uses UNK when it exists and differs from EOS, otherwise adds `<|pad|>`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tuneforge.config.chat_templates import END_OF_TURN_TOKENS, TEMPLATES
from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import TokenizerConfig

log = logging.getLogger(__name__)

NEW_PAD = "<|pad|>"


@dataclass
class TokenizerReport:
    """What the fixes changed, for the run record and the doctor."""

    fixes: list[str] = field(default_factory=list)
    added_tokens: list[str] = field(default_factory=list)
    # The special tokens as loaded, before any fix.
    original: dict[str, str | None] = field(default_factory=dict)


def load_tokenizer(name_or_path: str, cfg: TokenizerConfig, revision: str | None = None,
                   trust_remote_code: bool = False) -> tuple[PreTrainedTokenizerBase, TokenizerReport]:
    source = cfg.name_or_path or name_or_path
    key = "tokenizer.name_or_path" if cfg.name_or_path else "model.name_or_path"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as exc:  # no such directory, no tokenizer files in it, or a hub id without a network
        raise ConfigError(f"{key}={source!r}: cannot load a tokenizer from it ({_first_line(exc)}). Give a local "
                          "model directory or a hub id that is reachable (or already in the Hugging Face cache)."
                          ) from exc
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise ConfigError(remote_code_refusal(key, source)) from exc
    report = apply_fixes(tokenizer, cfg)
    return tokenizer, report


def remote_code_refusal(key: str, source: str) -> str:
    """The one message for a model or tokenizer that needs its own Python code (transformers' `auto_map`)."""
    return (f"{key}={source!r} needs its own Python code to load (auto_map in its config), and tuneforge does not "
            "run a model's code unless told to: read that code, then add model.trust_remote_code=true.")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__


def apply_fixes(tokenizer: PreTrainedTokenizerBase, cfg: TokenizerConfig) -> TokenizerReport:
    report = TokenizerReport(original={k: getattr(tokenizer, f"{k}_token") for k in ("pad", "bos", "eos", "unk")})
    _set_chat_template(tokenizer, cfg.chat_template, report)
    check_template_sandbox(tokenizer)
    if cfg.add_special_tokens:
        if tokenizer.add_tokens(list(cfg.add_special_tokens), special_tokens=True):
            report.added_tokens += list(cfg.add_special_tokens)
    if cfg.add_tokens:
        if tokenizer.add_tokens(list(cfg.add_tokens)):
            report.added_tokens += list(cfg.add_tokens)
    _fix_pad(tokenizer, cfg.pad_token, report)
    tokenizer.padding_side = cfg.padding_side
    return report


def _fix_pad(tokenizer: PreTrainedTokenizerBase, how: str, report: TokenizerReport) -> None:
    eos, pad, unk = tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token
    if how == "none":
        return
    if how == "auto":
        if pad is not None and pad != eos:
            return
        how = "unk" if unk is not None and unk != eos else "new"
    if how == "unk":
        if unk is None or unk == eos:
            raise ConfigError(
                f"tokenizer.pad_token=unk, but this tokenizer's UNK is {unk!r} (EOS is {eos!r}); "
                "use tokenizer.pad_token=new or auto."
            )
        new = unk
    elif how == "new":
        new = NEW_PAD
        if new not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"pad_token": new})
            report.added_tokens.append(new)
    else:
        new = how
        if new == eos:
            raise ConfigError(f"tokenizer.pad_token={new!r} is the EOS token; PAD must differ from EOS.")
        if new not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"pad_token": new})
            report.added_tokens.append(new)
    tokenizer.pad_token = new
    report.fixes.append(f"pad_token {pad!r} -> {new!r} (PAD must differ from EOS {eos!r})")
    log.info("Tokenizer fix: %s", report.fixes[-1])


def _set_chat_template(tokenizer: PreTrainedTokenizerBase, how: str, report: TokenizerReport) -> None:
    if how == "keep":
        return
    if how in TEMPLATES:  # a named template (config/chat_templates.py), with the special tokens it writes
        named = TEMPLATES[how]
        if not named.end_of_turn and tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer.chat_template={how} ends answers with EOS; this tokenizer has none.")
        vocab = tokenizer.get_vocab()
        missing = [t for t in named.tokens if t not in vocab]
        if missing and tokenizer.add_tokens(missing, special_tokens=True):
            report.added_tokens += missing
        template = named.text
    elif how.endswith(".jinja") or Path(how).expanduser().is_file():
        path = Path(how).expanduser()
        if not path.is_file():
            raise ConfigError(f"tokenizer.chat_template={how!r}: file not found.")
        template = path.read_text()
    else:
        template = how
    tokenizer.chat_template = template
    # A name or a file is named whatever its length; a template written inline is too long to quote.
    named_how = how if template is not how or len(how) < 80 else "(inline template)"
    _TEMPLATE_SOURCES[template] = f"tokenizer.chat_template={named_how}"
    report.fixes.append(f"chat_template set ({how if len(how) < 40 else 'inline template'})")


# Where each template set by _set_chat_template came from, by its text: an error found while rendering rows
# (data/render.py) names the file the user gave, not only "the chat template".
_TEMPLATE_SOURCES: dict[str, str] = {}
# Conversations the sandbox probe renders: with and without a system turn, since a template may refuse one.
_PROBES = ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
           [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}])


def template_source(tokenizer: PreTrainedTokenizerBase) -> str:
    """Where the tokenizer's chat template came from, for messages."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return _TEMPLATE_SOURCES.get(template) or f"the chat template of {getattr(tokenizer, 'name_or_path', '?')}"


def sandbox_refused(exc: BaseException) -> bool:
    """True when Jinja's sandbox stopped a template reaching outside it (`''.__class__.__mro__...`): a
    SecurityError, or an AttributeError raised by the sandbox's own attribute lookup."""
    from jinja2.exceptions import SecurityError

    if isinstance(exc, SecurityError):
        return True
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return isinstance(exc, AttributeError) and last is not None and \
        Path(last.tb_frame.f_code.co_filename).as_posix().endswith("jinja2/sandbox.py")


def sandbox_refusal(tokenizer: PreTrainedTokenizerBase, exc: BaseException) -> ConfigError:
    return ConfigError(f"{template_source(tokenizer)}: the template tried to reach outside the Jinja sandbox "
                       f"({_first_line(exc)}); tuneforge renders templates sandboxed and will not use it. A chat "
                       "template only needs messages, roles and contents: fix the template, or use "
                       "tokenizer.chat_template=chatml.")


def check_template_sandbox(tokenizer: PreTrainedTokenizerBase) -> None:
    """Render two sample conversations once, so a template that reaches outside the sandbox is refused here,
    naming where it came from, and not deep inside the data map. Any other error is left to the renders
    that follow (a template may legitimately refuse a system turn; the doctor reports what it can)."""
    if not tokenizer.chat_template:
        return
    for messages in _PROBES:
        for generation_prompt in (False, True):
            try:
                tokenizer.apply_chat_template(messages[:-1] if generation_prompt else messages, tokenize=False,
                                              add_generation_prompt=generation_prompt)
            except Exception as exc:  # noqa: BLE001 (only a sandbox refusal is this check's business)
                if sandbox_refused(exc):
                    raise sandbox_refusal(tokenizer, exc) from exc


def reset_call_state(tokenizer: PreTrainedTokenizerBase) -> None:
    """Clear the truncation/padding that an earlier `tokenizer(..., truncation=True)` call left on the Rust
    tokenizer. transformers sets both again on every call, so this changes no later call's result; it keeps
    them out of the tokenizer's content hash (a cache key) and lets `encode` use the Rust tokenizer directly."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()


def content_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what the tokenizer does (vocab, merges, specials, template), not of its name."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        reset_call_state(tokenizer)  # cheaper than re-serialising 3 MB of JSON without that state
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(json.dumps(
        {
            "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
            "added": sorted(str(t) for t in tokenizer.get_added_vocab()),
            "template": tokenizer.chat_template or "",
            "padding_side": tokenizer.padding_side,
            "truncation_side": tokenizer.truncation_side,
        },
        sort_keys=True,
    ).encode())
    return h.hexdigest()[:16]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS plus the chat template's end-of-turn token when it differs (e.g. <|im_end|>, <|eot_id|>)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    for tok in END_OF_TURN_TOKENS:
        if tok not in template:
            continue
        # One lookup per candidate: get_vocab() would copy the whole vocabulary (~50 ms at 50k tokens).
        tid = tokenizer.convert_tokens_to_ids(tok)
        if tid is not None and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token that ends an assistant turn: the chat template's end-of-turn token, else EOS."""
    ids = stop_token_ids(tokenizer)
    return ids[-1] if ids else None


def new_token_ids(tokenizer: PreTrainedTokenizerBase, report: TokenizerReport) -> list[int]:
    """Ids of the tokens the fixes added that carry meaning (a new PAD is never trained)."""
    return [tokenizer.convert_tokens_to_ids(t) for t in report.added_tokens if t != tokenizer.pad_token]
