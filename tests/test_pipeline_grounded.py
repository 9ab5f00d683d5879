"""Generators grounded in learned pairs (issue 12 item 3) in the pipeline: a DDPM fine-tuned on the learned
source's pairs plus the supports, and SDEdit of the warped supports, end to end on the phantom; the config
keys they add and their bad values."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipelines.cli import main
from files import snapshot
from pipelines.config import ConfigError, load
from segment.data.protocol import make_folds

REPO = Path(__file__).resolve().parents[1]

GROUNDED = """
name = "grounded"
models = ["prototype"]
[data]
path = "{data}"
resolution = 32
[protocol]
folds = [0]
classes = ["liver"]
seeds = [0]
[segment]
width = 8
embed_dim = 16
steps = 4
batch = 2
[generators.learned]
channels = [8, 16, 16, 8]
final_channels = [8]
integration_steps = 2
steps = 2
batch_size = 2
pool_size = 4
candidates = 2
[generators.ddpm]
block_channels = [8, 16]
norm_groups = 4
pretrain_steps = 2
finetune_steps = 2
batch_size = 2
sample_steps = 2
finetune_on = "learned"
finetune_pairs = 4
[generators.sdedit]
strength = 0.5
[synthesis]
n_pairs = 2
finetune_steps = 2
[[arms]]
name = "real-only"
role = "baseline"
[[arms]]
name = "ddpm-on-learned"
sources = ["ddpm"]
role = "augmented"
[[arms]]
name = "sdedit"
sources = ["sdedit"]
role = "augmented"
[run]
out = "{out}"
cache = "{cache}"
"""


def _config(tmp: Path, data: Path, *, name: str) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(GROUNDED.format(data=data, out=tmp / name, cache=tmp / "cache"))
    return path


def _without_learned(text: str) -> str:
    """The config without its [generators.learned] section."""
    return text[:text.index("[generators.learned]")] + text[text.index("[generators.ddpm]"):]


def _fields(cache: Path, stage: str) -> list[dict]:
    return [json.loads(p.read_text())["fields"] for p in (cache / "stages" / stage).glob("*/stage.json")]


@pytest.fixture(scope="module")
def grounded_run(phantom_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grounded")
    assert main(["run", str(_config(tmp, phantom_dir, name="a"))]) == 0
    return tmp / "a", tmp / "cache"


def test_grounded_arms_run_end_to_end_and_show_in_the_report(grounded_run):
    out, _ = grounded_run
    results = json.loads((out / "results.json").read_text())
    assert {r["arm"]: r["role"] for r in results["rows"]} == {"real-only": "baseline", "ddpm-on-learned": "augmented",
                                                              "sdedit": "augmented"}
    assert {r["arm"]: r["synthetic_pairs"] for r in results["rows"]} == {"real-only": None, "ddpm-on-learned": 2,
                                                                         "sdedit": 2}
    assert {q["source"] for q in results["quality"]} == {"ddpm", "sdedit"}
    report = (out / "report.md").read_text()
    verdict = report.split("## Verdict")[1].split("## ")[0]
    assert "**ddpm-on-learned**" in verdict and "**sdedit**" in verdict  # each judged against real-only
    assert "| prototype | ddpm-on-learned |" in report and "| prototype | sdedit |" in report
    assert "| ddpm | liver |" in report and "| sdedit | liver |" in report  # pair quality of both sets
    assert (out / "pairs_liver.png").is_file()


def test_the_finetune_reads_the_learned_set_of_its_class_as_a_keyed_input(grounded_run, phantom_data):
    _, cache = grounded_run
    fold = make_folds(phantom_data.ids, phantom_data.spec.n_folds)[0]
    synthesis = {(f["source"], f["n"]): f for f in _fields(cache, "synthesis")}
    assert set(synthesis) == {("learned", 4), ("learned", 2), ("ddpm", 2)}  # 4: finetune_pairs, 2: n_pairs
    [finetune] = _fields(cache, "generator")
    entries = {p.parent.name: json.loads(p.read_text()) for p in (cache / "stages" / "synthesis").glob("*/stage.json")}
    learned_key = next(k for k, e in entries.items() if e["fields"]["source"] == "learned" and e["fields"]["n"] == 4)
    assert finetune["pairs"] == {"key": learned_key} and finetune["config"]["finetune_on"] == "learned"
    meta = json.loads(next((cache / "stages" / "generator").glob("*/config.json")).read_text())
    prov = meta["provenance"]
    assert prov["finetune_source"] == ["support"] * 3 + ["learned"] * 4
    assert [r["volume"] for r in prov["finetune"][:3]] == [fold.support] * 3
    assert {r["volume"] for r in prov["finetune"][3:]} <= set(fold.train)  # warped onto training volumes
    derived = {r["volume"] for r in prov["derived"]}
    assert derived == {fold.support, *fold.train} and not derived & set(fold.queries)  # no query volume


def test_sdedit_set_refines_the_learned_pairs_with_the_fine_tuned_ddpm(grounded_run, phantom_data):
    _, cache = grounded_run
    fold = make_folds(phantom_data.ids, phantom_data.spec.n_folds)[0]
    [refine] = _fields(cache, "refine")
    assert refine["options"] == {"strength": 0.5, "sampler": "dpmsolver++", "steps": 2, "batch_size": 16}
    entry = next((cache / "stages" / "refine").glob("*/set"))
    manifest = json.loads((entry / "manifest.json").read_text())
    learned = [json.loads(p.read_text()) for p in (cache / "stages" / "synthesis").glob("*/set/manifest.json")]
    [source] = [m for m in learned if m["generator"] == "learned" and m["n"] == 2]
    assert manifest["generator"] == "sdedit" and manifest["strength"] == 0.5 and manifest["denoising_steps"] == 1
    assert manifest["pairs"] == source["pairs"] and manifest["pairs_from"]["generator"] == "learned"
    assert manifest["training"]["finetune_source"][-4:] == ["learned"] * 4  # the DDPM fine-tuned on learned pairs
    assert not {r["volume"] for r in manifest["training"]["derived"]} & set(fold.queries)
    import numpy as np
    with np.load(entry / "pairs.npz") as refined, \
            np.load(next(p for p in (cache / "stages" / "synthesis").glob("*/set")
                         if json.loads((p / "manifest.json").read_text()) == source) / "pairs.npz") as warped:
        assert np.array_equal(refined["masks"], warped["masks"])  # the masks are kept
        assert not np.allclose(refined["images"], warped["images"])  # the images are remade


def test_changing_the_strength_reruns_only_the_refined_set_and_what_follows(grounded_run, phantom_dir):
    out, cache = grounded_run
    path = _config(out.parent, phantom_dir, name="b")
    path.write_text(path.read_text().replace("strength = 0.5", "strength = 0.25"))
    assert main(["run", str(path)]) == 0
    ran = {}
    for r in json.loads((out.parent / "b" / "stages.json").read_text())["records"]:
        ran.setdefault(r["stage"], set()).add(r["ran"])
    for cached in ("source-train", "synthesis", "generator-pretrain", "generator", "segmenter"):
        assert ran[cached] == {False}, cached
    assert ran["refine"] == {True}


def test_shipped_grounded_config_loads_with_both_arms():
    cfg = load(REPO / "configs" / "demo_grounded.toml")
    assert cfg.data.phantom and cfg.generators["ddpm"]["finetune_on"] == "learned"
    assert {a.name: a.sources for a in cfg.arms}["sdedit"] == ("sdedit",)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('finetune_on = "learned"', 'finetune_on = "oracle"'),
     r"\[generators.ddpm\] DDPMConfig.finetune_on='oracle'; valid: \['supports', 'learned'\]"),
    (lambda t: t.replace("finetune_pairs = 4", "finetune_pairs = 0"),
     r"\[generators.ddpm\] DDPMConfig.finetune_pairs must be >= 1"),
    (lambda t: t.replace("strength = 0.5", "strength = 1.5"),
     r"\[generators.sdedit\] SDEditConfig.strength=1.5; it is the fraction of the diffusion trajectory, in \[0, 1\]"),
    (lambda t: t.replace("[generators.sdedit]\nstrength = 0.5\n", ""),
     r"arm 'sdedit' names unknown generator 'sdedit'.*needs a \[generators.sdedit\] section"),
    (lambda t: _without_learned(t).replace("[generators.sdedit]\nstrength = 0.5\n", "")
     .replace('name = "sdedit"\nsources = ["sdedit"]', 'name = "sdedit"\nsources = ["classical"]'),
     r"\[generators.ddpm\] finetune_on = 'learned', but there is no \[generators.learned\] section"),
    (lambda t: _without_learned(t).replace('finetune_on = "learned"', ""),
     r"\[generators.sdedit\] it refines 'learned' pairs, but there is no \[generators.learned\] section"),
    (lambda t: t.replace("finetune_pairs = 4", "finetune_pairs = 4\njoint = true"),
     r"\[generators.sdedit\] sdedit keeps the masks, but ddpm joint = true redraws them"),
])
def test_bad_grounded_config_exits_2_in_one_line_and_writes_nothing(phantom_copy, tmp_path, capsys, edit, message):
    cfg = _config(tmp_path, phantom_copy, name="bad")
    cfg.write_text(edit(cfg.read_text()))
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load(cfg)
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("supportforge: error:") and re.search(message, err[0])
    assert snapshot(tmp_path) == before  # the data folder untouched, no cache, no run folder
    assert not (tmp_path / "cache").exists() and not (tmp_path / "bad").exists()
