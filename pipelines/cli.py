"""The `supportforge` command: a thin layer of argument parsing over the typed stage functions.

Each command imports what it computes with (torch, scipy, nibabel) when it runs, so that `--help`, a
config error and a fully cached run start without them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipelines.cache import StageCache
from pipelines.config import ConfigError, load
from segment.config import GRIDS, PROTOCOLS
from segment.data.volumes import DataError, resolve_spec

DEFAULT_CACHE = Path(".cache/supportforge")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, help="folder with image_N / label_N .nii.gz volumes")
    p.add_argument("--spec", default=None, help="built-in spec name or spec .toml (default: DATA/dataset.toml)")
    p.add_argument("--resolution", type=int, default=128, help="working resolution of the slices (default 128)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"cache folder (default {DEFAULT_CACHE})")


def cmd_phantom(args: argparse.Namespace) -> None:
    """Write the phantom into a new or empty folder (write_phantom refuses anything else)."""
    from segment.data.phantom import write_phantom

    paths = write_phantom(args.out, n_volumes=args.volumes, size=args.size, depth=args.depth, seed=args.seed)
    print(f"wrote {len(paths)} files to {args.out}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from segment.data.protocol import make_folds
    from segment.data.slices import prepare

    spec = resolve_spec(args.data, args.spec)
    start = time.perf_counter()
    data = prepare(spec, args.data, resolution=args.resolution, cache_dir=args.cache)
    summary = data.summary() | {"seconds": round(time.perf_counter() - start, 2)}
    summary["folds"] = [{"fold": f.index, "support": f.support, "queries": list(f.queries), "train": list(f.train)}
                        for f in make_folds(data.ids, spec.n_folds)]
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{spec.name}: {summary['volumes']} volumes, {summary['slices']} slices at {data.resolution} px "
          f"({summary['seconds']} s; cache {data.path})")
    for name, n in summary["slices_per_class"].items():
        print(f"  {name:<16} {n:>5} slices")
    for f in summary["folds"]:
        print(f"  fold {f['fold']}: support {f['support']}, queries {', '.join(f['queries'])}; "
              f"{len(f['train'])} training volumes")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from segment.data.protocol import empty_predictor, evaluate, make_folds, oracle_predictor
    from segment.data.slices import prepare

    spec = resolve_spec(args.data, args.spec)
    data = prepare(spec, args.data, resolution=args.resolution, cache_dir=args.cache)
    predictor = oracle_predictor(data) if args.predictor == "oracle" else empty_predictor
    folds = make_folds(data.ids, spec.n_folds)
    results = {p: evaluate(predictor, data, folds, classes=spec.classes, protocol=p, dice_grid=args.dice_grid)
               for p in args.protocol}
    for protocol, res in results.items():
        cells = "  ".join(f"{c} {100 * d:.1f}" for c, d in res["per_class"].items())
        print(f"{protocol} {args.predictor}: mean Dice {100 * res['mean']:.1f} on the {args.dice_grid} grid, "
              f"{100 * res['mean_post']:.1f} with the 3D largest component  ({cells})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")


def cmd_run(args: argparse.Namespace) -> int:
    """Run an experiment; exit 1 when some units failed for good (the report marks the gap)."""
    from pipelines.runner import UnitsFailed, run_experiment  # the heavy stage imports load only for a run

    given = {"protocol": {"folds": args.folds, "seeds": args.seeds},
             "run": {"jobs": args.jobs, "out": args.out, "cache": args.cache}}
    cfg = load(args.config, data=args.data,
               overrides={section: {k: v for k, v in keys.items() if v is not None} for section, keys in given.items()})
    start = time.perf_counter()
    try:
        result = run_experiment(cfg, force=tuple(args.force))
    except UnitsFailed as err:
        print(f"supportforge: error: {err}", file=sys.stderr)
        return 1
    ran = sum(c["ran"] for c in result["summary"].values())
    print(f"{cfg.name}: {ran} stage run(s), report in {result['out'] / 'report.md'} "
          f"({time.perf_counter() - start:.1f} s)")
    if result["failed_units"]:
        units = ", ".join(f"fold {f['fold']} seed {f['seed']}" for f in result["failed_units"])
        print(f"supportforge: error: {len(result['failed_units'])} unit(s) failed ({units}); the report marks "
              f"the gap; see {result['out'] / 'run.log'}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> None:
    from pipelines.report import rebuild  # matplotlib loads only for a report

    print(f"wrote {rebuild(args.results, args.out)}")


def cmd_cache(args: argparse.Namespace) -> None:
    """`ls`: every folder with its cheap check (sizes, times); `verify`: every file's SHA-256, exit 1 when
    any folder is bad; `gc`: remove leftovers, quarantine and stale locks (with --keep, unused folders)."""
    cache = StageCache(args.cache)
    if args.action == "ls":
        rows = cache.ls()
        for r in rows:
            state = f"BAD: {r['problem']}" if r["problem"] else "ok"
            where = f"{r['stage']:<20} {r['key']}" if r["entry"] else f"{r['stage'] + '/':<20} {r['key']}"
            print(f"{where}  {r['bytes'] / 1e6:8.2f} MB  {r['created']}  {state}")
        print(f"{len(rows)} entries, {sum(r['bytes'] for r in rows) / 1e6:.1f} MB in {cache.root}")
        return
    if args.action == "verify":
        results = cache.verify()
        bad = [(s, p) for s, p in results if p]
        for s, p in bad:
            print(f"BAD {s.name}: {p}")
        print(f"{len(results)} entries checked, {len(bad)} bad in {cache.root}"
              + ("; a run that uses a bad one moves it to quarantine/ and rebuilds it" if bad else ""))
        if bad:
            raise SystemExit(1)
        return
    keep, folders = _kept_entries(args.keep) if args.keep else (None, None)  # all read before anything goes
    if args.keep and folders is None:
        print("a kept run does not list its slice and superpixel folders (run it again): keeping them all")
    removed = cache.gc(keep, folders)
    for path in removed:
        print(f"removed {path.relative_to(cache.root)}")
    print(f"removed {len(removed)} entries or leftovers from {cache.root}")


def _kept_entries(run_dirs: list[str]) -> tuple[set[tuple[str, str]], set[str] | None]:
    """The (stage, key) pairs and the slice and superpixel folders the given run folders used, from their
    stages.json; folders are None when a run predates that record (gc then keeps them all)."""
    keep: set[tuple[str, str]] = set()
    folders: set[str] | None = set()
    for run_dir in run_dirs:
        path = Path(run_dir) / "stages.json"
        try:
            used = json.loads(path.read_text())
            keep |= {(r["stage"], r["key"]) for r in used["records"]}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"cache gc --keep {run_dir}: cannot read the run's stages from {path} "
                              f"({type(err).__name__}: {err}); give run folders of `supportforge run`") from None
        folders = None if folders is None or "folders" not in used else folders | set(used["folders"])
    return keep, folders


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="supportforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write the built-in abdominal phantom as NIfTI volumes")
    p.add_argument("out", type=Path)
    p.add_argument("--volumes", type=int, default=8)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("prepare", help="prepare and cache slices, print volumes, slices per class and folds")
    _add_data_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("evaluate", help="score a reference predictor (oracle or empty) under EP1/EP2")
    _add_data_args(p)
    p.add_argument("--predictor", choices=("oracle", "empty"), default="oracle")
    p.add_argument("--protocol", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    p.add_argument("--dice-grid", choices=GRIDS, default="native", help="score on the label files' grid or the working one")
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("run", help="run an experiment TOML: every stage, cached, then the ablation report")
    p.add_argument("config", type=Path)
    p.add_argument("--data", default=None, help="data folder (overrides [data] path)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE", help="re-run this stage (repeatable)")
    p.add_argument("--jobs", type=int, default=None, help="parallel processes over folds and seeds")
    p.add_argument("--folds", type=int, nargs="+", default=None, metavar="K",
                   help="run these folds only (overrides [protocol] folds), e.g. to split a long run over sessions: "
                        "the cache keeps each part and a later run over every fold reads them")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                   help="run these seeds only (overrides [protocol] seeds)")
    p.add_argument("--out", default=None, help="run folder (overrides [run] out)")
    p.add_argument("--cache", default=None, help="cache folder (overrides [run] cache), e.g. one kept outside the "
                                                 "clone so that a fresh clone reuses what was trained")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="rebuild report.md, results.json and the Dice charts from a results.json")
    p.add_argument("results", type=Path, help="results.json of a run")
    p.add_argument("--out", type=Path, required=True, help="folder for the rebuilt report")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("cache", help="list or verify the cache, or remove leftovers and unused entries",
                       description="ls: every entry with a cheap check (sizes and times against its record); "
                                   "verify: every file's SHA-256, exit 1 when an entry is bad; gc: remove "
                                   "leftovers of killed runs, quarantined entries and unused lock files")
    p.add_argument("action", choices=("ls", "verify", "gc"))
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--keep", nargs="*", default=None, metavar="RUN_DIR",
                   help="with gc: keep only the entries, slices and superpixels these run folders used")
    p.set_defaults(func=cmd_cache)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (DataError, ConfigError) as err:
        print(f"supportforge: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a folder that cannot be written or read: one line naming it, not a traceback
        where = f"{err.filename}: " if err.filename else ""
        print(f"supportforge: error: {where}{err.strerror or err}; check that the path exists and may be written",
              file=sys.stderr)
        return 2
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
