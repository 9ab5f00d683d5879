"""Test helpers about files: what "nothing was written" is checked against (every folder and file under some
folders, with file hashes), and the benchmark scripts loaded as modules."""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path


def snapshot(*folders: Path) -> dict[str, str]:
    """Every folder and file under `folders` (a missing folder has none), files with their SHA-256."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for f in map(Path, folders) if f.exists() for p in sorted(f.rglob("*"))}


def benchmark_module(name: str):
    """The script benchmarks/NAME.py imported as a module (benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
