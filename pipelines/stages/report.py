"""The report stage: statistics, figures and report.md of the whole experiment, and what the run used
(code commit, device) recorded beside them."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipelines.stages.base import Stage, StageEntry
from pipelines.stages.evaluate import EvalRef
from pipelines.stages.inputs import support_pairs
from segment.data.protocol import Fold
from segment.data.slices import PreparedData
from segment.data.volumes import DataError


def code_commit(root: Path = Path(__file__).resolve().parents[2]) -> dict:
    """The project's git commit and whether the tree differs from it; "unknown" outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit or "unknown", "dirty": None if status is None else bool(status)}


SIMD = ("avx512f", "avx2", "avx", "sse4_2", "asimd")  # widest first; asimd: 64-bit ARM


def cpu_kind(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """The CPU's model name and widest vector instruction set (None where `cpuinfo` cannot be read): the same
    stage keys give other floats where torch's kernels differ, so a run records which kind computed it."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return {"cpu_model": None, "simd": None}
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}
    flags = set(fields.get("flags", fields.get("Features", "")).split())
    return {"cpu_model": fields.get("model name"), "simd": next((s for s in SIMD if s in flags), None)}


def device_info(cpu: bool) -> dict:
    """The device stages compute on (accelerate's choice for the `cpu` flag) and the machine's CPU; torch
    is asked only when the flag lets a GPU be used."""
    device, name = "cpu", None
    if not cpu:
        import torch

        if torch.cuda.is_available():
            device, name = "cuda", torch.cuda.get_device_name(0)
    return {"device": device, "accelerator": name, "cpu": platform.processor() or platform.machine(),
            "platform": platform.platform()} | cpu_kind()


def provenance(cpu: bool) -> dict:
    """Commit and device of this run: written to stages.json and to the report's context."""
    return code_commit() | device_info(cpu)


def overlay_panels(evals: tuple[EvalRef, ...], model: str, protocol: str) -> list[dict]:
    """Overlay panels of the first (fold, seed) unit: one row per arm, one panel per class and slice."""
    panels = []
    first = (evals[0].fold, evals[0].seed) if evals else None
    for e in (e for e in evals if e.model == model and e.protocol == protocol and (e.fold, e.seed) == first):
        meta = json.loads((e.entry.path / "overlays.json").read_text())
        with np.load(e.entry.path / "overlays.npz") as z:
            for i, m in enumerate(meta):
                panels.append({"image": z[f"image_{i}"], "truth": z[f"truth_{i}"], "pred": z[f"pred_{i}"],
                               "title": f"{e.arm} · {m['class']} · vol {m['query']} z{m['slice']}"})
    return panels


def dice_scoring(rows: tuple[dict, ...], evals: tuple[EvalRef, ...], postprocess_default: bool, score_on: str):
    """How the rows' headline `dice` was scored, from the rows or their rows.json; working grid by default.

    Rows that carry `dice_post` have a headline without post-processing; older rows were scored with
    `[protocol] postprocess`.
    """
    from pipelines.report import DiceScoring
    metas = [json.loads((e.entry.path / "rows.json").read_text()) for e in evals]
    grids = {r["dice_grid"] for r in rows if "dice_grid" in r} | {m["dice_grid"] for m in metas if "dice_grid" in m}
    if len(grids) > 1:
        raise DataError(f"rows scored on different Dice grids {sorted(grids)}: one report cannot mix them")
    posts = {m["postprocess"] for m in metas if "postprocess" in m}
    if any("dice_post" in r for r in rows):
        posts = {False}
    postprocess = posts.pop() if len(posts) == 1 else postprocess_default
    return DiceScoring(grid=grids.pop() if grids else "working", postprocess=postprocess, score_on=score_on)


COMPUTING = ("torch", "numpy", "scipy", "scikit-image", "scikit-learn", "albumentations", "albucore",
             "opencv-python-headless", "monai", "diffusers", "accelerate", "nibabel")


def package_versions(names: tuple[str, ...] = COMPUTING) -> dict:
    """Installed version of each package that computes a stage (None where absent), read without importing
    it: constraints.txt pins them, and the report says what actually ran."""
    from importlib.metadata import PackageNotFoundError, version

    def one(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    return {name: one(name) for name in names}


@dataclass(frozen=True, kw_only=True)
class Report(Stage):
    """Statistics, figures and report.md of the whole experiment. `failed_units` (fold, seed, log tail)
    have no rows: results.json lists them; nothing is averaged over them."""

    name: ClassVar[str] = "report"
    version: ClassVar[str] = "8"
    experiment: str
    config: dict[str, Any]  # the resolved config, recorded in the report's context
    data: PreparedData
    arms: tuple[str, ...]  # display order
    protocols: tuple[str, ...]
    models: tuple[str, ...]
    overlays: int
    filter_dice: float  # the threshold the quality table counts pairs against
    postprocess: bool  # how rows without a record of it were scored
    rows: tuple[dict, ...]
    evals: tuple[EvalRef, ...]
    quality: tuple[StageEntry, ...]
    pairs: dict[str, dict[str, StageEntry]]  # class -> source -> synthetic set of the first unit
    first_fold: Fold
    units: tuple[tuple[int, int], ...]
    failed_units: tuple[dict, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)  # commit and device of the run that wrote it

    @property
    def label(self) -> str:
        return self.experiment

    def produce(self, folder: Path) -> None:
        from augment.synthesis import load_set, save_grid
        from pipelines import report
        from segment.data.volumes import radiological_flips
        # display only, read from the data's first volume (its files are in the data's key)
        flips = radiological_flips(self.data.source / self.data.spec.image_pattern.format(id=self.data.ids[0]))
        figures = {}
        for protocol in self.protocols:
            for model in self.models:
                name = f"overlays_{model}_{protocol}.png"
                classes = list(dict.fromkeys(r["class"] for r in self.rows))
                report.overlay_figure(overlay_panels(self.evals, model, protocol), folder / name,
                                      cols=len(classes) * self.overlays, flips=flips)
                figures[report.figure_caption(name)] = name
        for c, sets in self.pairs.items():
            images, masks, _ = support_pairs(self.data, self.first_fold, c)
            grid = {"real supports": (images, masks)} | {s: load_set(e.path / "set") for s, e in sets.items()}
            name = f"pairs_{c}.png"
            save_grid(grid, folder / name, title=f"{c}: real supports and synthetic pairs (fold {self.first_fold.index})",
                      flips=flips)
            figures[report.figure_caption(name)] = name
        context = {"experiment": self.experiment, "dataset": self.data.spec.to_dict(), "data": os.path.relpath(self.data.source),
                   "data_key": self.data.key, "resolution": self.data.resolution, "config": self.config,
                   "versions": package_versions(), "provenance": self.provenance, "units": [list(u) for u in self.units],
                   "failed_units": list(self.failed_units)}
        quality = [json.loads((e.path / "quality.json").read_text()) for e in self.quality]
        report.build_report(folder, title=f"SupportForge ablation: {self.experiment}", rows=list(self.rows),
                            arms=list(self.arms), context=context, quality=quality, figures=figures,
                            scoring=dice_scoring(self.rows, self.evals, self.postprocess,
                                                 self.config["protocol"]["score_on"]),
                            filter_dice=self.filter_dice, primary=self.config["protocol"].get("primary"),
                            target_over_baseline=self.config["protocol"].get("target_over_baseline"),
                            target_over_control=self.config["protocol"].get("target_over_control"))


def publish(report_dir: Path, out: Path) -> None:
    """Copy the report's files into the run folder (the cache keeps the original)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in report_dir.iterdir():
        if f.is_file() and f.name != "stage.json":
            shutil.copy2(f, out / f.name)
