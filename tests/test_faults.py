"""Bad inputs of every kind (issue 9), each run through the CLI in-process as a user would type it.

Every case must end with exit code 2 and one line `supportforge: error: ...` that names the problem, and
must leave every file it could reach as it was: the data folder, the config, the run and cache folders
all live under the test's folder, which is the working folder too, and is hashed before and after.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.cli import main
from files import snapshot

REPO = Path(__file__).parents[1]

CONFIG = """
name = "faults"
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
n_pairs = 2
finetune_steps = 3
max_test_supports = 2
[[arms]]
name = "real-only"
[[arms]]
name = "ddpm"
sources = ["ddpm"]
[run]
out = "{out}"
cache = "{cache}"
"""
ARMS = CONFIG[CONFIG.index("[[arms]]"): CONFIG.index("[run]")]


@dataclass(frozen=True)
class Case:
    """A folder for one bad input: the data (a phantom copy), a config, and where the run would write."""

    root: Path  # the working folder; nothing under it may change
    data: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def out(self) -> Path:
        return self.root / "run"

    def config(self, *edits: tuple[str, str]) -> str:
        """The config with each (old, new) replaced; an edit that matches nothing is a broken test."""
        text = CONFIG.format(data=self.data, out=self.out, cache=self.cache)
        for old, new in edits:
            assert old in text, old
            text = text.replace(old, new, 1)
        path = self.root / "exp.toml"
        path.write_text(text)
        return str(path)

    def run(self, *edits: tuple[str, str], extra: tuple[str, ...] = ()) -> list[str]:
        return ["run", self.config(*edits), *extra]


def _spec_name(c: Case, name: str) -> list[str]:
    spec = c.data / "dataset.toml"
    spec.write_text(spec.read_text().replace('name = "phantom"', f"name = {name!r}"))
    return c.run()


def _class_name_with_a_path(c: Case) -> list[str]:
    spec = c.data / "dataset.toml"
    spec.write_text(spec.read_text().replace('"spleen"', '"../spleen"'))
    return c.run()


def _non_utf8_name(c: Case) -> list[str]:
    with open(os.fsencode(c.data) + b"/image_\xff.nii.gz", "wb") as f:
        f.write((c.data / "image_1.nii.gz").read_bytes())
    return c.run()


def _phantom_config_with_data_folder(c: Case) -> list[str]:
    """The demo's shape (the phantom) pointed at a user's folder of volumes that has no dataset.toml."""
    (c.data / "dataset.toml").unlink()
    return c.run((f'path = "{c.data}"', "phantom = true\nphantom_volumes = 3"), extra=("--data", str(c.data)))


def _read_only_cache(c: Case) -> list[str]:
    c.cache.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):  # the cache folder refuses new entries, as a read-only folder would
        if Path(os.fsdecode(path)).is_relative_to(c.cache):
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_mkdir(path, *args, **kwargs)

    c.monkeypatch.setattr(os, "mkdir", mkdir)
    return c.run()


def _too_little_memory(c: Case) -> list[str]:
    c.monkeypatch.setattr("segment.data.slices.memory_budget", lambda: 100_000)
    return c.run()


def _gc_keep_missing_run(c: Case) -> list[str]:
    entry = c.cache / "stages" / "segmenter" / "0123456789abcdef0123"
    entry.mkdir(parents=True)
    (entry / "stage.json").write_text('{"stage": "segmenter"}')
    return ["cache", "gc", "--cache", str(c.cache), "--keep", str(c.root / "no_such_run")]


def _existing_file(c: Case) -> list[str]:
    (c.root / "notes.txt").write_text("mine")
    return ["phantom", str(c.root / "notes.txt")]


CASES: list[tuple[str, Callable[[Case], list[str]], str]] = [
    # item 1: a phantom config never writes into the folder --data names
    ("phantom config, --data without dataset.toml", _phantom_config_with_data_folder, r"data has no dataset\.toml"),
    ("phantom = true with a path", lambda c: c.run(("resolution = 32", "resolution = 32\nphantom = true")),
     r"\[data\] path = '.*' with phantom = true; the phantom is built under \[run\] cache"),
    ("no path, no phantom", lambda c: c.run((f'path = "{c.data}"\n', "")), r"\[data\] path = None; give the folder"),
    ("phantom_volumes = 1", lambda c: c.run((f'path = "{c.data}"', "phantom = true\nphantom_volumes = 1")),
     r"\[data\] phantom_volumes = 1; it must be in 2\.\.64"),
    ("phantom keys without phantom", lambda c: c.run(("resolution = 32", "resolution = 32\nphantom_size = 32")),
     r"\['phantom_size'\] are set but phantom is not true"),
    # item 3: repeats invent significance
    ("folds repeat", lambda c: c.run(("folds = [0]", "folds = [0, 0]")),
     r"\[protocol\] folds = \[0, 0\]; \[0\] repeat"),
    ("seeds repeat", lambda c: c.run(("seeds = [0]", "seeds = [3, 3]")),
     r"\[protocol\] seeds = \[3, 3\]; \[3\] repeat"),
    ("protocols repeat", lambda c: c.run(("[protocol]", '[protocol]\nprotocols = ["EP1", "EP1"]')),
     r"\[protocol\] protocols = \['EP1', 'EP1'\]; \['EP1'\] repeat"),
    ("classes repeat", lambda c: c.run(('classes = ["liver"]', 'classes = ["liver", "liver"]')),
     r"\[protocol\] classes = \['liver', 'liver'\]; \['liver'\] repeat"),
    ("models repeat", lambda c: c.run(('models = ["prototype"]', 'models = ["prototype", "prototype"]')),
     r"models = \['prototype', 'prototype'\]; \['prototype'\] repeat"),
    ("arm sources repeat", lambda c: c.run(('sources = ["ddpm"]', 'sources = ["ddpm", "ddpm"]')),
     r"\[arms.ddpm\] sources = \['ddpm', 'ddpm'\]; \['ddpm'\] repeat"),
    # item 4: intensities that cannot be normalised are rejected, never zeros (the 1e30 image: see below)
    # item 5: names and output folders
    ("spec name climbs out of the cache", lambda c: _spec_name(c, "../../../x"),
     r"name '\.\./\.\./\.\./x' is not allowed"),
    ("absolute spec name", lambda c: _spec_name(c, "/tmp/x"), r"name '/tmp/x' is not allowed"),
    ("class name with a path", _class_name_with_a_path, r"class name '\.\./spleen' is not allowed"),
    ("empty out", lambda c: c.run((f'out = "{c.root / "run"}"', 'out = ""')), r"\[run\] out = ''; give a folder"),
    ("cache = .", lambda c: c.run((f'cache = "{c.root / "cache"}"', 'cache = "."')),
     r"\[run\] cache = '\.' resolves to .*, the working folder or one above it"),
    ("out above the working folder", lambda c: c.run((f'out = "{c.root / "run"}"', 'out = ".."')),
     r"\[run\] out = '\.\.' resolves to .*, the working folder or one above it"),
    ("--out at the working folder", lambda c: c.run(extra=("--out", str(c.root))),
     r"\[run\] out = .* the working folder"),
    ("--cache at the working folder", lambda c: c.run(extra=("--cache", str(c.root))),
     r"\[run\] cache = .* the working folder"),
    ("--cache inside the data folder", lambda c: c.run(extra=("--cache", str(c.data / "c"))),
     r"\[run\] cache = .* lies inside the data folder"),
    ("cache inside the data folder",
     lambda c: c.run((f'cache = "{c.root / "cache"}"', f'cache = "{c.data / "c"}"')),
     r"\[run\] cache = .* lies inside the data folder"),
    # item 8: one line and exit 2, not a traceback
    ("resolution 100000", lambda c: c.run(("resolution = 32", "resolution = 100000")),
     r"\[data\] resolution = 100000; it must be a multiple of 8 from 16 to 1024"),
    ("prepare --resolution 100000",
     lambda c: ["prepare", str(c.data), "--resolution", "100000", "--cache", str(c.cache)],
     r"resolution must be a multiple of 8 from 16 to 1024, got 100000"),
    ("slices larger than memory", _too_little_memory,
     r"resolution 32: 96 slices need about 0\.000786 GB, more than the 0\.0001 GB allowed"),
    ("synthesis finetune_steps = -10", lambda c: c.run(("finetune_steps = 3", "finetune_steps = -10")),
     r"\[synthesis\] finetune_steps = -10; it must be >= 1"),
    ("generator finetune_steps = -10", lambda c: c.run(("finetune_steps = 2", "finetune_steps = -10")),
     r"\[generators.ddpm\] DDPMConfig.finetune_steps must be >= 0, got -10"),
    ("folds = []", lambda c: c.run(("folds = [0]", "folds = []")), r"\[protocol\] folds = \[\]; leave folds out"),
    ("seeds = [-1]", lambda c: c.run(("seeds = [0]", "seeds = [-1]")),
     r"\[protocol\] seeds = \[-1\]; \[-1\] are negative"),
    ("target_over_baseline = -3", lambda c: c.run(("seeds = [0]", "seeds = [0]\ntarget_over_baseline = -3")),
     r"\[protocol\] target_over_baseline = -3\.0; it is a gain in Dice points, in \[0, 100\]"),
    ("target_over_control = nan", lambda c: c.run(("seeds = [0]", "seeds = [0]\ntarget_over_control = nan")),
     r"\[protocol\] target_over_control = nan; it is a gain in Dice points, in \[0, 100\]"),
    ("--folds 7", lambda c: c.run(extra=("--folds", "7")), r"\[protocol\] folds: \[7\] out of range; spec 'phantom' has"),
    ("--folds 0 0", lambda c: c.run(extra=("--folds", "0", "0")), r"\[protocol\] folds = \[0, 0\]; .*repeat"),
    ("--seeds -1", lambda c: c.run(extra=("--seeds", "-1")), r"\[protocol\] seeds = \[-1\]; \[-1\] are negative"),
    ("arm source x", lambda c: c.run(('sources = ["ddpm"]', 'sources = ["x"]')),
     r"arm 'ddpm' names unknown generator 'x'"),
    ("arms = ['x']", lambda c: c.run(('name = "faults"', 'name = "faults"\narms = ["x"]'), (ARMS, "")),
     r"arms = \['x'\]; write each arm as an \[\[arms\]\] table"),
    ("phantom --volumes 0", lambda c: ["phantom", str(c.root / "p"), "--volumes", "0"],
     r"phantom volumes = 0; it must be in 1\.\.200"),
    ("phantom --size 8", lambda c: ["phantom", str(c.root / "p"), "--size", "8"],
     r"phantom size = 8; it must be in 16\.\.512"),
    ("phantom onto a file", _existing_file, r"notes\.txt exists and is not a folder"),
    ("phantom onto a non-empty folder", lambda c: ["phantom", str(c.data)], r"data is not empty; refusing to overwrite"),
    ("cache gc --keep on a missing folder", _gc_keep_missing_run,
     r"cache gc --keep .*no_such_run: cannot read the run's stages"),
    ("read-only cache", _read_only_cache, r"cache/slices: Permission denied"),
    ("non-UTF-8 volume file name", _non_utf8_name, r"file name b'image_\\xff\.nii\.gz' is not valid UTF-8"),
    # item 9: values accepted silently before
    ("pretrain_steps = -1", lambda c: c.run(("pretrain_steps = 3", "pretrain_steps = -1")),
     r"\[generators.ddpm\] DDPMConfig.pretrain_steps must be >= 0, got -1"),
    ("segment warmup = -1", lambda c: c.run(("steps = 6", "steps = 6\nwarmup = -1")),
     r"SegmenterConfig.warmup must be >= 0"),
    ("filter_dice = 2.0", lambda c: c.run(("max_test_supports = 2", "max_test_supports = 2\nfilter_dice = 2.0")),
     r"\[synthesis\] filter_dice = 2\.0; it is a Dice threshold in \[0, 1\]"),
    ("arm filter_dice = -0.5", lambda c: c.run(('sources = ["ddpm"]', 'sources = ["ddpm"]\nfilter_dice = -0.5')),
     r"\[arms.ddpm\] filter_dice = -0\.5; it is a Dice threshold in \[0, 1\]"),
    ("max_test_supports = -1", lambda c: c.run(("max_test_supports = 2", "max_test_supports = -1")),
     r"\[synthesis\] max_test_supports = -1; it must be >= 0"),
    ("jobs = 0", lambda c: c.run(("[run]", "[run]\njobs = 0")), r"\[run\] jobs = 0; it must be >= 1"),
    ("--jobs -3", lambda c: c.run(extra=("--jobs", "-3")), r"\[run\] jobs = -3; it must be >= 1"),
    ("threads = -1", lambda c: c.run(("[run]", "[run]\nthreads = -1")), r"\[run\] threads = -1; it must be >= 0"),
]


@pytest.mark.parametrize("make_argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_changes_nothing(phantom_dir, tmp_path, monkeypatch, capsys,
                                                             make_argv, message):
    data = Path(shutil.copytree(phantom_dir, tmp_path / "data"))
    monkeypatch.chdir(tmp_path)  # relative paths such as "." and ".." land here, under the snapshot
    argv = make_argv(Case(tmp_path, data, monkeypatch))
    before = snapshot(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()  # progress bars may come first; the error is one line, the last
    assert "Traceback" not in err, err
    assert [i for i, line in enumerate(lines) if "supportforge:" in line] == [len(lines) - 1], err
    assert lines[-1].startswith("supportforge: error: ") and re.search(message, lines[-1]), lines[-1]
    assert snapshot(tmp_path) == before


def test_a_1e30_image_gives_the_slices_of_the_original(phantom_dir, tmp_path):
    from segment.data.slices import prepare
    from segment.data.volumes import load_spec

    data = Path(shutil.copytree(phantom_dir, tmp_path / "data"))
    path = data / "image_2.nii.gz"
    image = nib.load(path)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32) * np.float32(1e30), image.affine), path)
    spec = load_spec(data / "dataset.toml")
    scaled = prepare(spec, data, resolution=32, cache_dir=tmp_path / "scaled").volume("2").images
    original = prepare(spec, phantom_dir, resolution=32, cache_dir=tmp_path / "original").volume("2").images
    assert np.abs(scaled).max() > 1.0  # z-scores, not the zeros an overflowing float32 std gave
    np.testing.assert_allclose(scaled, original, atol=1e-4)


def test_the_phantom_is_built_under_the_cache_and_data_folders_are_only_read(phantom_dir, tmp_path):
    from pipelines.config import parse
    from pipelines.runner import load_data

    raw = {"data": {"phantom": True, "phantom_volumes": 3, "phantom_size": 32, "resolution": 32},
           "run": {"out": str(tmp_path / "run"), "cache": str(tmp_path / "cache")}}
    data = load_data(parse(raw))
    built = data.source
    assert built.is_relative_to((tmp_path / "cache" / "phantom").resolve()) and data.ids == ("1", "2", "3")
    stamp = snapshot(built)
    assert load_data(parse(raw)).source == built and snapshot(built) == stamp  # built once, then reused

    copy = Path(shutil.copytree(phantom_dir, tmp_path / "data"))
    before = snapshot(copy)
    raw["data"] = {"path": str(copy), "resolution": 32}
    assert load_data(parse(raw)).source == copy.resolve()
    assert snapshot(copy) == before


def test_loading_a_config_imports_no_torch():
    code = ("import sys, pipelines.config as c\n"
            "for name in ('demo', 'abd_mri', 'abd_mri_pairs'):\n"
            "    c.load(f'configs/{name}.toml')\n"
            "sys.exit('torch' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr or "loading a config imported torch"
