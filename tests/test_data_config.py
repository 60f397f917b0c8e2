"""Data/format config rules: strict keys in mix sources, weights for all or none, template checks."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tuneforge.config.compose import load_config
from tuneforge.config.errors import ConfigError
from tuneforge.config.schemas import DataConfig, FormatConfig, MixSourceConfig, TuneforgeConfig
from tuneforge.config.validation import validate


def test_mix_config_composes_with_a_format_per_source():
    cfg = load_config(["data=mix_dates"])
    assert [s.weight for s in cfg.data.mix] == [0.5, 0.5]
    assert cfg.data.mix[0].format is None and cfg.data.mix[1].format.strategy == "template"


def _mix(*sources, **data) -> TuneforgeConfig:
    return TuneforgeConfig(data=DataConfig(mix=list(sources), **data))


TEMPLATE = FormatConfig(strategy="template", template="Q: {prompt} A: {completion}", response_template="A:")


@pytest.mark.parametrize("cfg, expected", [
    (_mix(MixSourceConfig(path="a", weight=1.0), MixSourceConfig(path="b")), "set weight on every source or on none"),
    (_mix(MixSourceConfig(path="a", weight=1.0), MixSourceConfig(path="b", weight=-1.0)),
     r"data.mix\[1\].weight=-1.0 must be > 0"),
    (_mix(MixSourceConfig(path="a"), path="x.jsonl"), "data.mix is set, so data.path would be ignored"),
    (_mix(MixSourceConfig(path="a", format=FormatConfig(strategy="template", template="Q: {prompt} A: {completion}",
                                                         response_template="Answer:"))),
     r"data.mix\[0\].format.response_template='Answer:' does not occur in data.mix\[0\].format.template"),
    (_mix(MixSourceConfig(path="a", format=FormatConfig(strategy="templte"))), "Did you mean 'template'"),
    (_mix(MixSourceConfig(path="a", max_samples=0)), r"data.mix\[0\].max_samples=0 must be > 0"),
])
def test_bad_mixes_name_the_key(cfg, expected):
    with pytest.raises(ConfigError, match=expected):
        validate(cfg)


def test_good_mix_validates():
    validate(_mix(MixSourceConfig(path="a", weight=2.0), MixSourceConfig(path="b", weight=1.0, format=TEMPLATE)))


def test_unknown_keys_inside_a_mix_source_fail_at_composition():
    schema = OmegaConf.structured(TuneforgeConfig)
    with pytest.raises(Exception, match="wieght"):
        OmegaConf.merge(schema, {"data": {"mix": [{"path": "a", "wieght": 1}]}})
    with pytest.raises(Exception, match="strategyy"):
        OmegaConf.merge(schema, {"data": {"mix": [{"path": "a", "format": {"strategyy": "text"}}]}})


@pytest.mark.parametrize("overrides, expected", [
    (["format=template", "format.template='Q: {prompt} A: {completion}'", "format.response_template=Answer:"],
     "does not occur in format.template"),
    (["format.alpaca_style=modern"], "format.alpaca_style='modern' is not valid"),
    (["data.max_samples=0"], "data.max_samples=0 must be > 0"),
    (["data.on_bad_row=skip"], "data.on_bad_row='skip' is not valid"),
    (["preview.split=test"], "preview.split='test' is not valid"),
])
def test_bad_data_overrides_name_the_key(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(overrides)
