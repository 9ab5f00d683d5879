"""Benchmark for issue 2: slice preparation of a dataset, cold (empty cache) and warm (cache read).

Times `segment.data.slices.prepare` in-process, and the whole `supportforge prepare` command (Python and torch
start-up included) for the warm case. Writes benchmarks/results/prepare_slices.json and .md.

    .venv/bin/python benchmarks/prepare_slices.py --data ../shared/data/chaos_t2 --spec abd_mri
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segment.data.slices import prepare  # noqa: E402
from segment.data.volumes import resolve_spec  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/chaos_t2", help="data folder (relative: to the repo root)")
    p.add_argument("--spec", default="abd_mri")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    args.data = str(ROOT / args.data) if not Path(args.data).is_absolute() else args.data
    spec = resolve_spec(args.data, args.spec)
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        data = prepare(spec, args.data, resolution=args.resolution, cache_dir=cache)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        prepare(spec, args.data, resolution=args.resolution, cache_dir=cache)
        warm = time.perf_counter() - t
        cli = [str(Path(sys.executable).parent / "supportforge"), "prepare", args.data, "--spec", args.spec,
               "--resolution", str(args.resolution), "--cache", cache]
        t = time.perf_counter()
        subprocess.run(cli, check=True, capture_output=True)
        warm_cli = time.perf_counter() - t
    result = {"dataset": spec.name, "data": os.path.relpath(args.data, ROOT), "resolution": args.resolution, "volumes": len(data.volumes),
              "slices": data.summary()["slices"], "cold_seconds": round(cold, 2), "warm_seconds": round(warm, 3),
              "warm_command_seconds": round(warm_cli, 2), "cpus": os.cpu_count(), "machine": platform.machine(),
              "load_average_1min": round(os.getloadavg()[0], 1),
              "targets": {"cold_seconds": 30, "warm_seconds": 3}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prepare_slices.json").write_text(json.dumps(result, indent=2))
    (out / "prepare_slices.md").write_text("\n".join([
        f"# Slice preparation: {spec.name}, {result['volumes']} volumes, {result['slices']} slices at {args.resolution}",
        "", "| case | seconds | target |", "|---|---|---|",
        f"| cold (read NIfTI, normalise, resize, write cache) | {result['cold_seconds']} | < 30 |",
        f"| warm (read the cache and check every file's SHA-256, in-process) | {result['warm_seconds']} | < 3 |",
        f"| warm, whole `supportforge prepare` command incl. start-up | {result['warm_command_seconds']} | < 3 |",
        "", f"{result['cpus']} CPUs ({result['machine']}), load average {result['load_average_1min']} while it ran. Command: `.venv/bin/python benchmarks/prepare_slices.py`", ""]))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
