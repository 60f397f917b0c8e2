"""Collator/packing config: every shipped option composes; illegal combinations fail at config time,
naming both keys and the fix."""

from __future__ import annotations

import dataclasses

import pytest

from tuneforge.config.compose import group_options, load_config
from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import TuneforgeConfig
from tuneforge.config.validation import validate_collator_packing


def test_shipped_collators_and_packings_compose():
    assert {"completion_only", "assistant_only", "lm", "padding"} <= set(group_options("collator"))
    assert {"none", "wrapped", "bfd", "padding_free"} <= set(group_options("packing"))
    for packing in group_options("packing"):
        # auto is decided on the device: no packing on this CPU (tests/test_device_defaults.py)
        assert load_config([f"packing={packing}"]).packing.mode == {"auto": "none"}.get(packing, packing)
    assert load_config(["collator=padding", "task=classification"]).collator.name == "padding"


def test_templates_as_strings_or_ids_from_the_command_line():
    cfg = load_config(["collator.response_template='### Assistant:'", "collator.instruction_template=[2277,29937]"])
    assert cfg.collator.response_template == "### Assistant:"
    assert list(cfg.collator.instruction_template) == [2277, 29937]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["collator=padding", "packing=bfd"], r"packing.mode=bfd with collator=padding.*use packing=none"),
        (["collator=lm", "collator.response_template=x"], r"collator.response_template is only used by collator=completion_only"),
        (["collator.instruction_template='### Human:'"], r"collator.instruction_template needs collator.response_template"),
        (["collator.response_template=''"], r"collator.response_template='': give a non-empty string or a list of token ids"),
        (["collator.pad_to_multiple_of=0"], r"collator.pad_to_multiple_of=0 must be > 0"),
        (["collator=padding"], r"collator=padding builds no language-model labels"),
    ],
)
def test_illegal_combination_names_both_keys(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(overrides)


def _cfg(**sections) -> TuneforgeConfig:
    cfg = TuneforgeConfig()
    for name, changes in sections.items():
        setattr(cfg, name, dataclasses.replace(getattr(cfg, name), **changes))
    return cfg


def test_packing_needs_an_attention_implementation_that_honours_position_ids():
    # transformers' paged attention has no packed-sequence mask: sequences would attend to each other.
    with pytest.raises(ConfigError, match=r"packing.mode=bfd with model.attn_implementation=paged\|eager.*sdpa"):
        validate_collator_packing(_cfg(packing={"mode": "bfd"}, model={"attn_implementation": "paged|eager"}))
    validate_collator_packing(_cfg(packing={"mode": "none"}, model={"attn_implementation": "paged|eager"}))
    for attn in ("sdpa", "eager", "flex_attention", "flash_attention_2"):
        validate_collator_packing(_cfg(packing={"mode": "padding_free"}, model={"attn_implementation": attn}))


def test_format_and_collator_must_agree():
    with pytest.raises(ConfigError, match=r"collator=assistant_only.*format.strategy=text.*collator=completion_only"):
        validate_collator_packing(_cfg(collator={"name": "assistant_only"}, format={"strategy": "text"}))
    with pytest.raises(ConfigError, match=r"format.strategy=text with collator=completion_only.*collator.response_template"):
        validate_collator_packing(_cfg(format={"strategy": "text"}))
    validate_collator_packing(_cfg(format={"strategy": "text"}, collator={"response_template": "### Answer:"}))
    validate_collator_packing(_cfg(format={"strategy": "text"}, collator={"name": "lm"}))
