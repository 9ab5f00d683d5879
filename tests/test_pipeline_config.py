"""Experiment configs: typed parsing and one clear error per mistake."""

from __future__ import annotations

import pytest

from pipelines.config import Arm, ConfigError, parse


def _raw(**over) -> dict:
    raw = {"name": "t", "data": {"path": "somewhere", "resolution": 64},
           "generators": {"ddpm": {}}, "arms": [{"name": "real-only"}, {"name": "ddpm", "sources": ["ddpm"]}]}
    raw.update(over)
    return raw


def test_parse_gives_typed_frozen_config():
    cfg = parse(_raw(protocol={"setting": 2, "protocols": ["EP1", "EP2"], "folds": [0, 1], "seeds": [0, 1]}))
    assert cfg.data.resolution == 64 and cfg.protocol.setting == 2
    assert cfg.protocol.folds == (0, 1) and cfg.protocol.protocols == ("EP1", "EP2")
    assert cfg.arms == (Arm("real-only"), Arm("ddpm", ("ddpm",))) and cfg.sources == ("ddpm",)
    with pytest.raises(AttributeError):
        cfg.data.resolution = 32  # frozen


@pytest.mark.parametrize("raw, message", [
    (_raw(extra=1), r"unknown section\(s\) or key\(s\) \['extra'\]; valid ones are"),
    (_raw(data={"path": "x", "resolutoin": 64}), r"\[data\] unknown key\(s\) \['resolutoin'\]; valid keys are .*'resolution'"),
    (_raw(data={"path": "x", "resolution": "big"}), r"\[data\] resolution = 'big'; expected int"),
    (_raw(protocol={"setting": 3}), r"\[protocol\] setting = 3; valid values are \[1, 2\]"),
    (_raw(protocol={"protocols": ["EP3"]}), r"protocols = \['EP3'\]; choose from \['EP1', 'EP2'\]"),
    (_raw(models=["unet"]), r"models = \['unet'\]; choose from \['prototype', 'conditional'\]"),
    (_raw(arms=[{"name": "real-only"}, {"name": "vae", "sources": ["vae"]}]),
     r"arm 'vae' names unknown generator 'vae'; known: \['classical', 'ddpm'\]"),
    (_raw(arms=[{"name": "ddpm", "sources": ["ddpm"]}]), r"no real-only arm"),
    ({"name": "t"}, r"missing \[data\] section"),
])
def test_bad_config_names_the_problem(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse(raw)


def test_an_arm_is_a_named_override_of_the_synthesis_settings():
    cfg = parse(_raw(synthesis={"filter_dice": 0.0, "at_test": True},
                     arms=[{"name": "real-only"}, {"name": "ddpm-filtered", "sources": ["ddpm"], "filter_dice": 0.6,
                                                   "at_test": False}]))
    arm = cfg.arms[1]
    assert arm.synthesis(cfg.synthesis).filter_dice == 0.6 and arm.synthesis(cfg.synthesis).at_test is False
    assert cfg.arms[0].synthesis(cfg.synthesis) == cfg.synthesis
    with pytest.raises(ConfigError, match=r"\[arms.x\] filter_dice = 'high'; expected float"):
        parse(_raw(arms=[{"name": "real-only"}, {"name": "x", "filter_dice": "high"}]))
