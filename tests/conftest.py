"""Shared fixtures: a small phantom written once per test session, and its prepared slices."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny test models: more threads only add contention

import shutil
from pathlib import Path

import pytest
import torch

from segment.data.phantom import write_phantom
from segment.data.slices import prepare
from segment.data.volumes import load_spec


torch.set_num_threads(1)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    write_phantom(out, n_volumes=6, size=48, depth=16, seed=0, n_folds=2)
    return out


@pytest.fixture()
def phantom_copy(phantom_dir, tmp_path) -> Path:
    """A private copy of the phantom that a test may damage."""
    return Path(shutil.copytree(phantom_dir, tmp_path / "data"))


@pytest.fixture(scope="session")
def phantom_data(phantom_dir, tmp_path_factory):
    spec = load_spec(phantom_dir / "dataset.toml")
    return prepare(spec, phantom_dir, resolution=32, cache_dir=tmp_path_factory.mktemp("cache"))
