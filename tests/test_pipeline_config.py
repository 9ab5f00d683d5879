"""Experiment configs: typed parsing and one clear error per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.config import Arm, ConfigError, load, parse


def _raw(**over) -> dict:
    raw = {"name": "t", "data": {"path": "somewhere", "resolution": 64},
           "generators": {"ddpm": {}}, "arms": [{"name": "real-only"}, {"name": "ddpm", "sources": ["ddpm"]}]}
    raw.update(over)
    return raw


def test_parse_gives_typed_frozen_config():
    cfg = parse(_raw(protocol={"setting": 2, "protocols": ["EP1", "EP2"], "folds": [0, 1], "seeds": [0, 1]}))
    assert cfg.data.resolution == 64 and cfg.protocol.setting == 2
    assert cfg.protocol.folds == (0, 1) and cfg.protocol.protocols == ("EP1", "EP2")
    assert cfg.arms == (Arm("real-only", role="baseline"), Arm("ddpm", ("ddpm",), role="augmented"))
    assert cfg.sources == ("ddpm",)
    with pytest.raises(AttributeError):
        cfg.data.resolution = 32  # frozen


@pytest.mark.parametrize("raw, message", [
    (_raw(extra=1), r"unknown section\(s\) or key\(s\) \['extra'\]; valid ones are"),
    (_raw(data={"path": "x", "resolutoin": 64}), r"\[data\] unknown key\(s\) \['resolutoin'\]; valid keys are .*'resolution'"),
    (_raw(data={"path": "x", "resolution": "big"}), r"\[data\] resolution = 'big'; expected int"),
    (_raw(protocol={"setting": 3}), r"\[protocol\] setting = 3; valid values are \[1, 2\]"),
    (_raw(protocol={"score_on": "test"}),
     r"\[protocol\] score_on = 'test'; valid values are \['queries', 'training'\]"),
    (_raw(protocol={"protocols": ["EP3"]}), r"protocols = \['EP3'\]; choose from \['EP1', 'EP2'\]"),
    (_raw(models=["unet"]), r"models = \['unet'\]; choose from \['prototype', 'conditional'\]"),
    (_raw(arms=[{"name": "real-only"}, {"name": "vae", "sources": ["vae"]}]),
     r"arm 'vae' names unknown generator 'vae'; known: \['classical', 'ddpm', 'oracle', 'propagated', 'registered'\]"),
    (_raw(arms=[{"name": "ddpm", "sources": ["ddpm"]}]), r"arms: 0 baseline arm\(s\) \[\]; exactly one arm has role"),
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


def _roles(*arms: dict, **protocol) -> dict[str, str]:
    cfg = parse(_raw(arms=list(arms), protocol=protocol))
    return {a.name: a.role for a in cfg.arms}


def test_roles_are_inferred_once_from_the_sources_when_left_out():
    assert _roles({"name": "baseline"}, {"name": "c", "sources": ["classical"]}, {"name": "d", "sources": ["ddpm"]},
                  {"name": "both", "sources": ["classical", "ddpm"]}) \
        == {"baseline": "baseline", "c": "control", "d": "augmented", "both": "augmented"}
    # a second arm without sources is no baseline once one is named: the name decides nothing
    assert _roles({"name": "real-only-copy"}, {"name": "x", "role": "baseline"}) \
        == {"real-only-copy": "augmented", "x": "baseline"}
    assert _roles({"name": "real-only", "sources": ["classical"], "role": "augmented"}, {"name": "b"}) \
        == {"real-only": "augmented", "b": "baseline"}
    assert _roles({"name": "b"}, {"name": "oracle", "sources": ["ddpm"], "role": "diagnostic"}, diagnostic=True) \
        == {"b": "baseline", "oracle": "diagnostic"}
    assert parse(_raw(protocol={"primary": "ddpm"})).protocol.primary == "ddpm"
    assert parse(_raw()).protocol.primary is None  # by default the best arm is named after the run


@pytest.mark.parametrize("arms, protocol, message", [
    ([{"name": "a"}, {"name": "a", "sources": ["ddpm"]}], {}, r"arm names repeat: \['a', 'a'\]"),
    ([{"name": "a"}, {"name": "b"}], {}, r"arms \['a', 'b'\] have no sources and no role; say which one is the "
                                         r"baseline"),
    ([{"name": "a", "role": "baseline"}, {"name": "b", "role": "baseline"}], {},
     r"arms: 2 baseline arm\(s\) \['a', 'b'\]; exactly one"),
    ([{"name": "d", "sources": ["ddpm"]}], {}, r"arms: 0 baseline arm\(s\) \[\]"),
    ([{"name": "a"}, {"name": "oracle", "sources": ["ddpm"], "role": "diagnostic"}], {},
     r"arms \['oracle'\] have role = \"diagnostic\" outside a diagnostic run; set \[protocol\] diagnostic = true"),
    ([{"name": "a"}, {"name": "d", "sources": ["ddpm"], "role": "treatment"}], {},
     r"\[arms.d\] role = 'treatment'; valid roles are \['baseline', 'control', 'augmented', 'diagnostic'\]"),
    ([{"name": "a", "sources": ["ddpm"], "role": "baseline"}], {},
     r"\[arms.a\] role = 'baseline' with sources = \['ddpm'\]; the baseline uses the real supports alone"),
    ([{"name": "a"}, {"name": "c", "sources": ["classical"]}, {"name": "d", "sources": ["ddpm"]}],
     {"primary": "c"}, r"\[protocol\] primary = 'c' is not an augmented arm of this config; choose one of \['d'\]"),
    ([{"name": "a"}, {"name": "d", "sources": ["ddpm"]}], {"primary": "e"},
     r"\[protocol\] primary = 'e' is not an augmented arm of this config; choose one of \['d'\]"),
    ([{"name": "a"}, {"name": "c", "sources": ["classical"]}], {"primary": "c"},
     r"\[protocol\] primary = 'c', but this config has no augmented arm to declare"),
])
def test_bad_roles_are_config_errors(arms, protocol, message):
    with pytest.raises(ConfigError, match=message):
        parse(_raw(arms=arms, protocol=protocol))


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_config_loads_and_names_the_command_that_runs_it(path):
    config = load(path)  # reads no data: the CHAOS configs load on a machine without ../shared
    assert config.arms and config.name == path.stem
    assert f"supportforge run configs/{path.name}" in path.read_text(), "its header must name the command"


def _taught(*arms: dict, diagnostic: bool = False) -> dict:
    """A config with a baseline, the registered source (relabelled) and `arms`."""
    return _raw(generators={"learned": {}, "ddpm": {}}, protocol={"diagnostic": diagnostic},
                arms=[{"name": "real-only"}, {"name": "reg", "sources": ["registered"]}, *arms])


def test_an_arm_may_name_the_arm_whose_model_relabels_its_pairs():
    cfg = parse(_taught({"name": "reg 2", "sources": ["registered"], "teacher": "reg"},
                        {"name": "reg 3", "sources": ["propagated", "registered"], "teacher": "reg 2"}))
    assert [a.teacher for a in cfg.arms] == [None, None, "reg", "reg 2"]   # None: the baseline arm's model


@pytest.mark.parametrize("arms, diagnostic, message", [
    ([{"name": "r2", "sources": ["registered"], "teacher": "nobody"}], False,
     r"\[arms.r2\] teacher = 'nobody' is not an arm of this config; choose one of \['real-only', 'reg'\]"),
    ([{"name": "o", "sources": ["oracle"], "role": "diagnostic"},
      {"name": "r2", "sources": ["registered"], "teacher": "o"}], True,
     r"\[arms.r2\] teacher = 'o' is a diagnostic arm: its model learned the training volumes' true labels"),
    ([{"name": "p", "sources": ["propagated"], "teacher": "reg"}], False,
     r"\[arms.p\] teacher = 'reg', but its sources \['propagated'\] hold no relabelled source \(\['registered'\]\)"),
    ([{"name": "r2", "sources": ["registered"], "teacher": "r2"}], False,
     r"\[arms.r2\] teacher = 'r2': the teachers form a loop r2 -> r2; a model cannot relabel the pairs it is"),
    ([{"name": "r2", "sources": ["registered"], "teacher": "r3"},
      {"name": "r3", "sources": ["registered"], "teacher": "r2"}], False,
     r"\[arms.r2\] teacher = 'r3': the teachers form a loop r2 -> r3 -> r2"),
    ([{"name": "r2", "sources": ["registered"], "teacher": "r3"},
      {"name": "r3", "sources": ["registered"], "teacher": "nobody"}], False,
     r"\[arms.r3\] teacher = 'nobody' is not an arm of this config"),   # a chain that ends at an unknown arm
])
def test_a_bad_teacher_is_a_config_error(arms, diagnostic, message):
    with pytest.raises(ConfigError, match=message):
        parse(_taught(*arms, diagnostic=diagnostic))
