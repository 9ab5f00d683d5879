"""The runner end to end on a tiny phantom experiment: caching, invalidation, kill -9, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.cli import main

TINY = """
name = "tiny"
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
steps = 6
batch = 2
[generators.ddpm]
block_channels = [8, 16]
norm_groups = 4
pretrain_steps = 3
finetune_steps = 2
batch_size = 2
sample_steps = 2
[synthesis]
n_pairs = {n_pairs}
finetune_steps = 3
max_test_supports = 2
[[arms]]
name = "real-only"
[[arms]]
name = "classical"
sources = ["classical"]
[[arms]]
name = "ddpm"
sources = ["ddpm"]
[run]
out = "{out}"
cache = "{cache}"
"""


def _config(tmp: Path, data: Path, *, name: str, cache: Path, n_pairs: int = 2) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(TINY.format(data=data, out=tmp / name, cache=cache, n_pairs=n_pairs))
    return path


def _stages(run_dir: Path) -> dict[str, list[bool]]:
    out: dict[str, list[bool]] = {}
    for r in json.loads((run_dir / "stages.json").read_text())["records"]:
        out.setdefault(r["stage"], []).append(r["ran"])
    return out


def _rows(run_dir: Path) -> list[tuple]:
    rows = json.loads((run_dir / "results.json").read_text())["rows"]
    return sorted((r["arm"], r["class"], r["query"], round(r["dice"], 6)) for r in rows)


@pytest.fixture(scope="module")
def first_run(phantom_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cache = tmp / "cache"
    cfg = _config(tmp, phantom_dir, name="a", cache=cache)
    assert main(["run", str(cfg)]) == 0
    return tmp, cache, cfg


def test_run_writes_report_figures_and_rows(first_run):
    tmp, _, _ = first_run
    out = tmp / "a"
    for name in ("report.md", "results.json", "run.log", "stages.json", "dice_EP1.png", "pairs_liver.png",
                 "overlays_prototype_EP1.png"):
        assert (out / name).is_file(), name
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["arm"] for r in rows} == {"real-only", "classical", "ddpm"}
    assert {r["query"] for r in rows} == {"1", "2", "3"} and all(0.0 <= r["dice"] <= 1.0 for r in rows)
    pools = {r["arm"]: r["synthetic_pairs"] for r in rows}  # the fine-tune pool's kept synthetic pairs
    assert pools == {"real-only": None, "classical": 2, "ddpm": 2}  # n_pairs = 2, no filter
    report = (out / "report.md").read_text()
    assert "## Verdict" in report and "Wilcoxon" in report
    assert "**ddpm** is not significantly different from real-only after the Holm adjustment" in report or "**ddpm** beats real-only" in report \
        or "**ddpm** is worse than real-only" in report  # each augmented arm is judged against the baseline
    assert "## Synthetic pair quality" in report and "| ddpm | liver |" in report
    quality = json.loads((out / "results.json").read_text())["quality"]
    assert {q["source"] for q in quality} == {"classical", "ddpm"}
    assert all(0.0 <= q["mask_consistency"] <= 1.0 and 0.0 <= q["histogram_distance"] <= 1.0 for q in quality)


def test_a_rebuilt_report_captions_the_run_s_figures_as_the_run_did(first_run, tmp_path):
    tmp, _, _ = first_run
    figures = [line for line in (tmp / "a" / "report.md").read_text().splitlines() if line.startswith("![")]
    assert "![Query overlays, prototype, EP1: truth green, prediction red](overlays_prototype_EP1.png)" in figures
    assert "![Synthetic pairs, liver](pairs_liver.png)" in figures
    out = tmp_path / "rebuilt"
    out.mkdir()
    for f in (tmp / "a").glob("*.png"):
        shutil.copy(f, out)
    assert main(["report", str(tmp / "a" / "results.json"), "--out", str(out)]) == 0
    rebuilt = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("![")]
    assert sorted(rebuilt) == sorted(figures)


def test_second_run_is_all_cached(first_run):
    tmp, _, cfg = first_run
    before = _rows(tmp / "a")
    assert main(["run", str(cfg)]) == 0
    assert all(not ran for runs in _stages(tmp / "a").values() for ran in runs if ran is not None)
    assert _rows(tmp / "a") == before


def test_cache_on_the_command_line_replaces_the_config_s_so_a_fresh_clone_reuses_an_outside_cache(first_run,
                                                                                                 phantom_dir):
    tmp, cache, _ = first_run
    other = _config(tmp, phantom_dir, name="clone", cache=tmp / "clone_cache")  # a clone's config, its own cache
    assert main(["run", str(other), "--cache", str(cache)]) == 0
    ran = {stage: any(runs) for stage, runs in _stages(tmp / "clone").items()}
    assert ran.pop("report") and not any(ran.values())  # only the report is new: it names the experiment
    assert _rows(tmp / "clone") == _rows(tmp / "a") and not (tmp / "clone_cache").exists()
    recorded = json.loads((tmp / "clone" / "results.json").read_text())["context"]["config"]["run"]["cache"]
    assert recorded == str(cache)


def test_a_fully_cached_run_loads_no_torch_scipy_or_nibabel(first_run):
    """What keeps a cached rerun near half a second: every heavy import waits for a stage that computes."""
    tmp, _, cfg = first_run
    code = ("import sys\nfrom pipelines.cli import main\ncode = main(['run', sys.argv[1]])\n"
            "heavy = sorted(m for m in ('torch', 'scipy', 'nibabel', 'skimage', 'matplotlib') if m in sys.modules)\n"
            "print('HEAVY', heavy)\nsys.exit(code)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HEAVY []" in result.stdout, result.stdout
    assert all(not ran for runs in _stages(tmp / "a").values() for ran in runs if ran is not None)


def test_config_change_reruns_exactly_the_downstream_stages(first_run, phantom_dir):
    tmp, cache, _ = first_run
    cfg = _config(tmp, phantom_dir, name="b", cache=cache, n_pairs=3)  # more synthetic pairs, same cache
    assert main(["run", str(cfg)]) == 0
    stages = _stages(tmp / "b")
    for cached in ("superpixels", "generator-pretrain", "generator", "segmenter"):
        assert not any(stages[cached]), cached
    assert all(stages["synthesis"]) and len(stages["synthesis"]) == 2  # classical and ddpm
    assert all(stages["quality"]) and len(stages["quality"]) == 2
    assert stages["finetune"].count(True) == 2 and stages["finetune"].count(False) == 1  # real-only cached
    assert stages["evaluate"].count(True) == 2 and stages["evaluate"].count(False) == 1
    assert stages["report"] == [True]


def test_killed_run_reruns_to_the_same_results(first_run, phantom_dir, tmp_path):
    reference, _, _ = first_run
    cfg = _config(tmp_path, phantom_dir, name="k", cache=tmp_path / "cache")
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[1])
    deadline = time.time() + 300
    while not list((tmp_path / "cache" / "stages").glob("segmenter/.tmp-*")):  # mid-stage: segmenter training
        assert proc.poll() is None and time.time() < deadline, "the run ended before the segmenter stage"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list((tmp_path / "cache" / "stages").glob("segmenter/*/stage.json"))
    assert main(["run", str(cfg)]) == 0
    stages = _stages(tmp_path / "k")
    assert not any(stages["generator"]) and all(stages["segmenter"])  # done before the kill / redone after
    assert _rows(tmp_path / "k") == _rows(reference / "a")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("[run]", "[run]\ncolour = 1"), r"\[run\] unknown key\(s\) \['colour'\]"),
    (lambda t: t.replace('sources = ["ddpm"]', 'sources = ["vae"]'), r"arm 'ddpm' names unknown generator 'vae'"),
    (lambda t: t.replace('classes = ["liver"]', 'classes = ["pancreas"]'), r"classes: \['pancreas'\] are not classes"),
    (lambda t: t.replace("steps = 6", "stepz = 6"), r"\[segment\] unknown key\(s\) \['stepz'\]"),
    (lambda t: t.replace('name = "classical"', 'name = "real-only"'), r"arm names repeat: \['real-only', 'real-only'"),
    (lambda t: t.replace('name = "real-only"', 'name = "real-only"\nrole = "baseline"')
     .replace('name = "classical"\nsources = ["classical"]', 'name = "classical"\nrole = "baseline"'),
     r"arms: 2 baseline arm\(s\) \['real-only', 'classical'\]"),
    (lambda t: t.replace('sources = ["ddpm"]', 'sources = ["ddpm"]\nrole = "diagnostic"'),
     r"arms \['ddpm'\] have role = \"diagnostic\" outside a diagnostic run"),
])
def test_bad_config_exits_2_with_one_line_and_writes_nothing(phantom_dir, tmp_path, capsys, edit, message):
    cfg = _config(tmp_path, phantom_dir, name="bad", cache=tmp_path / "cache")
    cfg.write_text(edit(cfg.read_text()))
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("supportforge: error:")
    import re
    assert re.search(message, err[0])
    assert not (tmp_path / "cache").exists() and not (tmp_path / "bad").exists()


def test_missing_data_folder_exits_2(phantom_dir, tmp_path, capsys):
    cfg = _config(tmp_path, tmp_path / "no_such_data", name="bad", cache=tmp_path / "cache")
    assert main(["run", str(cfg)]) == 2
    assert "no_such_data does not exist" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_cache_ls_and_gc(first_run, phantom_dir, tmp_path, capsys):
    from pipelines.cache import StageCache
    from segment.data.integrity import lock
    tmp, cache, _ = first_run
    copy = Path(shutil.copytree(cache, tmp_path / "cache"))  # gc must not disturb the other tests' cache
    assert main(["cache", "ls", "--cache", str(copy)]) == 0
    listing = capsys.readouterr().out
    assert "segmenter" in listing and "entries" in listing and "BAD" not in listing
    used = json.loads((tmp / "a" / "stages.json").read_text())
    unused = StageCache(copy).run("evaluate", "unused", lambda f: (f / "rows.json").write_text("{}")).path
    leftovers = [copy / "stages" / "segmenter" / ".tmp-0123-abcdefgh",  # killed stage
                 copy / "slices" / ".tmp-phantom-32-0123-abcdefgh",  # killed prepare
                 copy / "slices" / ".phantom-32-0123.abcdefgh",  # killed prepare of an older version
                 copy / "slices" / "phantom-32-unused", copy / "superpixels" / "phantom-32-unused",  # no kept run's
                 copy / "quarantine" / "stages" / "evaluate" / "k.abcdefgh" / "k"]
    for folder in leftovers:
        folder.mkdir(parents=True)
        (folder / "volume_1.npz").write_bytes(b"half")
    (copy / "locks" / "stages~segmenter~0123.lock").write_text("")  # left by a killed run
    live = copy / "slices" / ".tmp-phantom-32-live-abcdefgh"  # a prepare writing now, under its lock
    live.mkdir()
    with lock(copy, copy / "slices" / "phantom-32-live"):
        assert main(["cache", "gc", "--cache", str(copy), "--keep", str(tmp / "a")]) == 0
    assert live.is_dir() and not unused.exists() and not any(p.exists() for p in leftovers)
    assert not (copy / "quarantine").exists() and not list((copy / "locks").iterdir())
    assert {(r["stage"], r["key"]) for r in StageCache(copy).ls() if r["entry"]} \
        == {(r["stage"], r["key"]) for r in used["records"] if r["stage"] != "prepare"}
    assert sorted(f"{p.parent.name}/{p.name}" for p in (copy / "slices").glob("[!.]*")) \
        + sorted(f"{p.parent.name}/{p.name}" for p in (copy / "superpixels").glob("[!.]*")) == used["folders"]
    cfg = _config(tmp_path, phantom_dir, name="again", cache=copy)
    assert main(["run", str(cfg)]) == 0  # what the kept run needs is all still there
    again = _stages(tmp_path / "again")
    assert again.pop("report") == [True]  # its key holds the run folder, which is new
    assert not any(ran for runs in again.values() for ran in runs)


RENAMED_ARMS = """[[arms]]
name = "baseline"
role = "baseline"
[[arms]]
name = "real-only-copy"
role = "control"
[[arms]]
name = "ddpm-renamed"
sources = ["ddpm"]
[run]"""


@pytest.fixture(scope="module")
def renamed_run(first_run, phantom_dir):
    """The first run's experiment on its warm cache, its arms renamed: the real-only arm is `baseline`, a copy
    of it with identical settings is `real-only-copy`, and `ddpm` is `ddpm-renamed`."""
    tmp, cache, _ = first_run
    cfg = _config(tmp, phantom_dir, name="renamed", cache=cache)
    text = cfg.read_text()
    cfg.write_text(text[:text.index("[[arms]]")] + RENAMED_ARMS + text[text.index("[run]") + len("[run]"):])
    code = main(["run", str(cfg)])
    return code, tmp / "renamed"


def test_renaming_an_arm_on_a_warm_cache_reports_the_new_names(renamed_run):
    code, out = renamed_run
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["arm"] for r in rows} == {"baseline", "real-only-copy", "ddpm-renamed"}
    stages = _stages(out)
    assert not any(stages["generator"]) and not any(stages["synthesis"])  # the warm cache served the generators


def test_two_arms_with_identical_settings_get_their_own_evaluate_entries_and_rows(renamed_run):
    _, out = renamed_run
    records = json.loads((out / "stages.json").read_text())["records"]
    evals = {r["label"].split()[1]: r["key"] for r in records if r["stage"] == "evaluate"}
    assert len(set(evals.values())) == 3, evals
    rows = json.loads((out / "results.json").read_text())["rows"]
    scores = {a: sorted((r["query"], r["dice"]) for r in rows if r["arm"] == a) for a in ("baseline", "real-only-copy")}
    assert len(scores["baseline"]) == 3 and scores["baseline"] == scores["real-only-copy"]


def test_a_real_only_arm_named_baseline_is_the_reference_of_every_test(renamed_run):
    _, out = renamed_run
    results = json.loads((out / "results.json").read_text())
    tests = results["tests"]
    assert not any(t["arm"] == "baseline" for t in tests)  # the real arm is never tested as an augmentation
    against = {(t["arm"], t["vs"]) for t in tests}
    assert against == {("real-only-copy", "baseline"), ("ddpm-renamed", "baseline"), ("ddpm-renamed", "real-only-copy")}
    assert all(t["units"] == 3 for t in tests)  # every query volume of the fold is a unit of every test
    assert next(t for t in tests if t["arm"] == "ddpm-renamed" and t["vs"] == "baseline")["n"] > 0


def test_mask_consistency_filter_keeps_only_pairs_the_real_segmenter_recovers(first_run, phantom_data):
    _, cache, _ = first_run
    from pipelines.stages.base import StageEntry
    from pipelines.stages.inputs import synthetic_pairs
    from segment.data.protocol import make_folds
    # the first run was at resolution 32 on the same phantom, like the session's prepared data
    fold = make_folds(phantom_data.ids, phantom_data.spec.n_folds)[0]
    base = StageEntry(next((cache / "stages" / "segmenter").glob("*/model.pt")).parent, "k")
    synth = (StageEntry(next(p.parent for p in (cache / "stages" / "synthesis").glob("*/set")  # first run's: n = 2
                             if json.loads((p / "manifest.json").read_text())["generator"] == "classical"
                             and json.loads((p / "manifest.json").read_text())["n"] == 2), "k"),)
    everything = synthetic_pairs(phantom_data, fold, "liver", synth, base_model=base, min_dice=0.0)
    none = synthetic_pairs(phantom_data, fold, "liver", synth, base_model=base, min_dice=1.01)
    from augment.quality import mask_consistency
    from segment import train as seg_train
    from segment.predict import make_predictor
    from pipelines.stages.inputs import support_pairs
    real_i, real_m, _ = support_pairs(phantom_data, fold, "liver")
    scores = mask_consistency(make_predictor(seg_train.load(base.path / "model.pt")), real_i, real_m, *everything)
    threshold = sorted(scores["per_pair"])[-1]  # the best pair's Dice: the filter keeps exactly the pairs that reach it
    some = synthetic_pairs(phantom_data, fold, "liver", synth, base_model=base, min_dice=threshold)
    assert len(everything[0]) == 2 and len(none[0]) == 0
    assert len(some[0]) == sum(d >= threshold for d in scores["per_pair"]) >= 1
    assert everything[0].shape[1:] == (1, 32, 32)


def test_jobs_run_units_in_parallel_processes_on_a_shared_cache(first_run, phantom_dir):
    tmp, cache, _ = first_run
    cfg = _config(tmp, phantom_dir, name="j", cache=cache, n_pairs=4)  # new synthesis: both units have work
    cfg.write_text(cfg.read_text().replace("folds = [0]", "folds = [0, 1]"))
    assert main(["run", str(cfg), "--jobs", "2"]) == 0
    rows = json.loads((tmp / "j" / "results.json").read_text())["rows"]
    assert {r["fold"] for r in rows} == {0, 1}
    records = json.loads((tmp / "j" / "stages.json").read_text())["records"]
    unit_pids = {r["pid"] for r in records if r["stage"] not in ("prepare", "superpixels", "report")}
    assert unit_pids and os.getpid() not in unit_pids  # every unit ran in a worker process
    segmenters = sorted((r["label"], r["ran"]) for r in records if r["stage"] == "segmenter")
    assert segmenters == [("prototype fold0 s0", False), ("prototype fold1 s0", True)]  # fold 0's from the cache
    real_only = sorted((r["query"], round(r["dice"], 6)) for r in rows if r["fold"] == 0 and r["arm"] == "real-only")
    assert real_only == sorted((q, d) for a, _, q, d in _rows(tmp / "a") if a == "real-only")


def test_spec_class_missing_from_the_labels_exits_2_and_writes_nothing(phantom_copy, tmp_path, capsys):
    spec = phantom_copy / "dataset.toml"
    spec.write_text(spec.read_text().replace('4 = "spleen"', '4 = "spleen"\n9 = "pancreas"'))
    cfg = _config(tmp_path, phantom_copy, name="bad", cache=tmp_path / "cache")
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # progress bars of the volume reading may come first
    assert [line for line in err if "error" in line] == [err[-1]]
    assert err[-1].startswith("supportforge: error:") and "class(es) 'pancreas' (raw value 9) appear in no label" in err[-1]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "bad").exists()


def test_setting_1_with_supervised_episodes_trains_one_base_per_class_group(phantom_dir, tmp_path):
    """Supervised episodes in Setting 1: each class group's base segmenter learns from the other groups' labels
    only (as in the few-shot benchmark), and each class is fine-tuned from its own group's base."""
    cfg = _config(tmp_path, phantom_dir, name="sup", cache=tmp_path / "cache")
    text = cfg.read_text().replace('classes = ["liver"]', 'classes = ["liver", "right_kidney"]')
    text = text.replace("resolution = 32", "resolution = 64")  # the phantom's kidneys: >= 16 px on 3 slices
    text = text.replace("batch = 2\n[generators.ddpm]", "batch = 2\nmix_supervised = 1.0\n[generators.ddpm]")
    cfg.write_text(text.split("[[arms]]")[0] + '[[arms]]\nname = "real-only"\n[run]' + text.split("[run]")[1])
    assert main(["run", str(cfg)]) == 0
    records = json.loads((tmp_path / "sup" / "stages.json").read_text())["records"]
    stages = tmp_path / "cache" / "stages"

    def meta(stage: str, key: str) -> dict:
        return json.loads((stages / stage / key / "config.json").read_text())

    bases = {tuple(meta("segmenter", r["key"])["test_class_ids"]): meta("segmenter", r["key"])
             for r in records if r["stage"] == "segmenter"}
    assert sorted(bases) == [(1, 4), (2, 3)]  # (liver, spleen) and (right, left kidney): never their own labels
    assert all(b["setting"] == 1 and "supervised" in b["episode_sources"] for b in bases.values())
    for r in records:
        if r["stage"] == "finetune":
            base_key = Path(meta("finetune", r["key"])["base_checkpoint"]).parent.name
            excluded = tuple(meta("segmenter", base_key)["test_class_ids"])
            assert excluded == ((1, 4) if r["label"].endswith("liver") else (2, 3)), r["label"]
