"""Dataset specs and NIfTI volume loading.

A `DatasetSpec` says where a dataset's files are, which raw label values are which class, how to
normalise intensities and how to form folds. Specs for the benchmark datasets ship with the package
(`segment/data/specs/*.toml`); users describe their own data in a TOML file of the same form.
Every problem with the files raises `DataError` naming the file and what was wrong.
"""

from __future__ import annotations

import gzip
import os
import re
import tomllib
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPEC_DIR = Path(__file__).parent / "specs"
NORMALISATIONS = ("zscore", "window_zscore")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # spec and class names
_SPEC_KEYS = ("name", "image_pattern", "label_pattern", "labels", "normalisation", "window", "groups", "n_folds")


class DataError(ValueError):
    """A dataset file or spec that cannot be used as it is."""


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset holds and how to read it. Class id = position in `classes` + 1; 0 is background."""

    name: str
    labels: dict[int, str]  # raw label value in the files -> class name
    normalisation: str = "zscore"  # "zscore" (per volume, MRI) | "window_zscore" (window, then global z-score, CT)
    window: tuple[float, float] | None = None
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # Setting 2 exclusion groups
    n_folds: int = 5
    image_pattern: str = "image_{id}.nii.gz"
    label_pattern: str = "label_{id}.nii.gz"

    def __post_init__(self) -> None:
        # the name and the class names become parts of cache and report file names: no paths, no '..'
        for what, value in (("name", self.name), *(("class name", c) for c in self.labels.values())):
            if not SAFE_NAME.fullmatch(value) or ".." in value:
                raise DataError(f"spec {self.name!r}: {what} {value!r} is not allowed; use letters, digits, '_', "
                                f"'-' and '.', starting with a letter or digit, without '..'")
        if self.normalisation not in NORMALISATIONS:
            raise DataError(f"spec {self.name!r}: normalisation {self.normalisation!r} is not one of {NORMALISATIONS}")
        if self.normalisation == "window_zscore" and (self.window is None or self.window[0] >= self.window[1]):
            raise DataError(f"spec {self.name!r}: window_zscore needs window = [low, high] with low < high, got {self.window}")
        if not self.labels:
            raise DataError(f"spec {self.name!r}: [labels] is empty; map raw label values to class names")
        if 0 in self.labels:
            raise DataError(f"spec {self.name!r}: raw label 0 is background and cannot name a class")
        if len(set(self.labels.values())) != len(self.labels):
            raise DataError(f"spec {self.name!r}: class names in [labels] repeat: {sorted(self.labels.values())}")
        for group, members in self.groups.items():
            unknown = sorted(set(members) - set(self.labels.values()))
            if unknown:
                raise DataError(f"spec {self.name!r}: group {group!r} names unknown classes {unknown}; "
                                f"classes are {list(self.classes)}")
        if self.n_folds < 1:
            raise DataError(f"spec {self.name!r}: n_folds must be >= 1, got {self.n_folds}")
        for pattern in (self.image_pattern, self.label_pattern):
            if "{id}" not in pattern:
                raise DataError(f"spec {self.name!r}: file pattern {pattern!r} must contain '{{id}}'")

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in class-id order (raw values sorted)."""
        return tuple(self.labels[raw] for raw in sorted(self.labels))

    def class_id(self, name: str) -> int:
        if name not in self.classes:
            raise DataError(f"spec {self.name!r} has no class {name!r}; classes are {list(self.classes)}")
        return self.classes.index(name) + 1

    def group_of(self, name: str) -> tuple[str, ...]:
        """The Setting 2 exclusion group that holds class `name` (the class alone if no group does)."""
        for members in self.groups.values():
            if name in members:
                return tuple(members)
        return (name,)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "labels": {str(k): v for k, v in sorted(self.labels.items())},
            "normalisation": self.normalisation, "window": list(self.window) if self.window else None,
            "groups": {k: list(v) for k, v in sorted(self.groups.items())}, "n_folds": self.n_folds,
            "image_pattern": self.image_pattern, "label_pattern": self.label_pattern,
        }


def spec_from_dict(raw: dict, *, source: str) -> DatasetSpec:
    """Build a spec from parsed TOML, failing on unknown keys with the list of valid ones."""
    unknown = sorted(set(raw) - set(_SPEC_KEYS))
    if unknown:
        raise DataError(f"{source}: unknown key(s) {unknown}; valid keys are {list(_SPEC_KEYS)}")
    for key in ("name", "labels"):
        if key not in raw:
            raise DataError(f"{source}: missing key {key!r}")
    try:
        labels = {int(k): str(v) for k, v in raw["labels"].items()}
    except (ValueError, AttributeError) as err:
        raise DataError(f"{source}: [labels] must map integer raw values to class names ({err})") from None
    window = raw.get("window")
    return DatasetSpec(
        name=str(raw["name"]), labels=labels, normalisation=raw.get("normalisation", "zscore"),
        window=tuple(float(w) for w in window) if window is not None else None,
        groups={str(k): tuple(v) for k, v in raw.get("groups", {}).items()},
        n_folds=int(raw.get("n_folds", 5)),
        image_pattern=raw.get("image_pattern", "image_{id}.nii.gz"),
        label_pattern=raw.get("label_pattern", "label_{id}.nii.gz"),
    )


def builtin_specs() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in SPEC_DIR.glob("*.toml")))


def load_spec(name_or_path: str | Path) -> DatasetSpec:
    """A built-in spec by name (`abd_mri`, `abd_ct`, `card_mri`) or a user's spec TOML by path."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        if str(name_or_path) not in builtin_specs():
            raise DataError(f"unknown dataset spec {str(name_or_path)!r}: use one of {list(builtin_specs())} "
                            f"or the path of a spec .toml file")
        path = SPEC_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise DataError(f"dataset spec file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise DataError(f"{path}: not valid TOML ({err})") from None
    return spec_from_dict(raw, source=str(path))


def find_volume_ids(spec: DatasetSpec, data_dir: Path) -> list[str]:
    """Ids of every image file that matches the spec's pattern, sorted numerically where they are numbers."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist")
    prefix, suffix = spec.image_pattern.split("{id}")
    names = [p.name for p in data_dir.iterdir()]
    names = [n for n in names if n.startswith(prefix) and n.endswith(suffix) and len(n) > len(prefix) + len(suffix)]
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes arrive as surrogate escapes
            raise DataError(f"{data_dir}: file name {os.fsencode(name)!r} is not valid UTF-8; rename the file "
                            f"or move it out of the data folder") from None
    ids = [n[len(prefix): len(n) - len(suffix)] for n in names]
    if not ids:
        raise DataError(f"data folder {data_dir} has no files matching {spec.image_pattern!r}")
    return sorted(ids, key=lambda i: (0, int(i), "") if i.isdigit() else (1, 0, i))


def _read_nifti(path: Path) -> np.ndarray:
    import nibabel  # loads only where volumes are read, so a cached run starts without it

    if not path.is_file():
        raise DataError(f"{path}: file is missing")
    try:
        return np.asarray(nibabel.load(path).dataobj)
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile, nibabel.filebasedimages.ImageFileError) as err:
        raise DataError(f"{path}: cannot be read as NIfTI ({type(err).__name__}: {err})") from None


def load_raw_volume(spec: DatasetSpec, data_dir: Path, volume_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Image (Z, H, W) float32 as stored and labels (Z, H, W) uint8 remapped to class ids, both checked."""
    image_path = Path(data_dir) / spec.image_pattern.format(id=volume_id)
    label_path = Path(data_dir) / spec.label_pattern.format(id=volume_id)
    image, raw_label = _read_nifti(image_path), _read_nifti(label_path)
    if image.ndim != 3:
        raise DataError(f"{image_path}: expected a 3D volume, got shape {image.shape}")
    if image.shape != raw_label.shape:
        raise DataError(f"{label_path}: shape {raw_label.shape} does not match its image {image_path.name} {image.shape}")
    image = image.astype(np.float32)
    if not np.isfinite(image).all():
        raise DataError(f"{image_path}: contains NaN or infinite intensities")
    if float(image.max() - image.min()) == 0.0:
        raise DataError(f"{image_path}: intensity is constant ({float(image.min())}); nothing to normalise")
    label = _remap_labels(spec, raw_label, label_path)
    # NIfTI stores (X, Y, Z); slices are axial, so the slice axis goes first: (Z, H, W).
    return np.ascontiguousarray(image.transpose(2, 1, 0)), np.ascontiguousarray(label.transpose(2, 1, 0))


def _remap_labels(spec: DatasetSpec, raw: np.ndarray, path: Path) -> np.ndarray:
    values = np.unique(raw)
    unknown = [v.item() for v in values if v != 0 and (v != np.round(v) or int(v) not in spec.labels)]
    if unknown:
        raise DataError(f"{path}: label value(s) {unknown[:10]} are not in spec {spec.name!r} "
                        f"(known: 0 and {sorted(spec.labels)})")
    out = np.zeros(raw.shape, dtype=np.uint8)
    for raw_value in sorted(spec.labels):
        out[raw == raw_value] = spec.class_id(spec.labels[raw_value])
    return out


def resolve_spec(data_dir: str | Path, spec: str | Path | None) -> DatasetSpec:
    """The spec named by `spec`, or else the `dataset.toml` that sits in the data folder."""
    if not Path(data_dir).is_dir():
        raise DataError(f"data folder {data_dir} does not exist")
    if spec is not None:
        return load_spec(spec)
    beside = Path(data_dir) / "dataset.toml"
    if beside.is_file():
        return load_spec(beside)
    raise DataError(f"{data_dir} has no dataset.toml; name a spec ({', '.join(builtin_specs())}) "
                    f"or a spec .toml file")


def radiological_flips(path: Path) -> tuple[bool, bool]:
    """(flip rows, flip columns) that show an axial slice `(H, W)` of the volume at `path` in radiological
    orientation: anterior at the top (spine at the bottom), the patient's right on the image's left.

    A display step only: slices are stored as the file holds them, (Z, j, i). Read from the header's
    affine; a volume whose first two axes are not left-right and anterior-posterior is not flipped.
    """
    import nibabel

    codes = nibabel.aff2axcodes(nibabel.load(path).affine)  # e.g. ('L', 'A', 'S'): direction each voxel axis increases to
    if {codes[0], codes[1]} not in ({"L", "A"}, {"L", "P"}, {"R", "A"}, {"R", "P"}) or codes[0] not in "LR":
        return False, False
    return codes[1] == "A", codes[0] == "R"  # rows run top to bottom, columns left to right
