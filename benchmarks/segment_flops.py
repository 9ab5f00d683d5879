"""Benchmark: FLOP per training step and per inference call of the few-shot segmenters, against the matmul limit.

For each model size it counts FLOP with `torch.utils.flop_counter.FlopCounterMode` (convolutions and
matmuls, forward + backward for a training step), times real steps (AdamW update included) and EP1-sized
inference calls, and divides the achieved FLOP/s by the fp32 `torch.mm` FLOP/s measured in the same run
with the same thread count, so the fraction of the machine's matmul limit sits beside each figure.
Timings on a shared machine are noisy: each is the best of `--repeats` timed blocks.
Writes benchmarks/results/segment_flops.json (and .md).

    .venv/bin/python benchmarks/segment_flops.py                      # the default grid, 1 thread
    .venv/bin/python benchmarks/segment_flops.py --sizes prototype:32:2:128 --steps 10
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segment.train import SegmenterConfig, build_model, episode_loss  # noqa: E402

DEFAULT_SIZES = ["prototype:16:2:128", "prototype:16:2:128:fused", "prototype:32:2:128:fused",
                 "prototype:48:2:128:fused", "prototype:64:2:128:fused", "prototype:16:3:256:fused",
                 "conditional:16:2:128:positional", "conditional:16:2:128"]
# optional last field of a size: SegmenterConfig fields it turns on or off
FLAGS = {"fused": {"fuse_stem": True}, "coords": {"coords": True},
         "positional": {"similarity_gates": False, "spatial_gates": True, "similarity_head": False}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES,
                   help=f"model:width:depth:resolution[:flag], flags {sorted(FLAGS)}")
    p.add_argument("--batch", type=int, default=4, help="episodes per training step")
    p.add_argument("--queries", type=int, default=8, help="query slices per inference call (an EP1 chunk)")
    p.add_argument("--steps", type=int, default=6, help="timed training steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mm-size", type=int, default=2048)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "segment_flops.json"))
    return p.parse_args(argv)


def matmul_gflops(n: int, repeats: int) -> float:
    """Best fp32 GFLOP/s of an n x n x n `torch.mm` (2 n^3 FLOP) over `repeats` runs."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def synthetic_batch(batch: int, queries: int, resolution: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Support and query images `(B, S|Q, 1, R, R)` and rectangle masks covering about a sixth of the slice."""
    g = torch.Generator().manual_seed(seed)
    si = torch.randn(batch, 1, 1, resolution, resolution, generator=g)
    qi = torch.randn(batch, queries, 1, resolution, resolution, generator=g)
    mask = torch.zeros(resolution, resolution)
    lo, hi = resolution // 3, 2 * resolution // 3
    mask[lo:hi, lo:hi] = 1.0
    return si, mask.expand_as(si).clone(), qi, mask.expand_as(qi).clone()


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(size: str, args) -> dict:
    """FLOP and time of one training step and one inference call of the model `size` describes."""
    kind, width, depth, resolution, *flags = size.split(":")
    unknown = [f for f in flags if f not in FLAGS]
    if unknown or len(flags) > 1:
        raise SystemExit(f"segment_flops: error: size {size!r}: at most one flag, one of {sorted(FLAGS)}")
    cfg = SegmenterConfig(model=kind, width=int(width), depth=int(depth), resolution=int(resolution),
                          batch=args.batch, **(FLAGS[flags[0]] if flags else {}))
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_batch = synthetic_batch(args.batch, 1, cfg.resolution)
    si, sm, qi, _ = synthetic_batch(1, args.queries, cfg.resolution, seed=1)

    def train_step() -> None:
        loss = episode_loss(model, train_batch, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def infer() -> None:
        model.segment(si[0], sm[0], qi[0])

    # 1. count FLOP (forward + backward for training; forward only for inference)
    model.train()
    with FlopCounterMode(display=False) as counter:
        episode_loss(model, train_batch, cfg).backward()
    train_flop = counter.get_total_flops()
    model.eval()
    with FlopCounterMode(display=False) as counter:
        infer()
    infer_flop = counter.get_total_flops()
    # 2. time them: best of `repeats` blocks
    model.train()
    step_s = best_seconds(lambda: [train_step() for _ in range(args.steps)], args.repeats) / args.steps
    model.eval()
    infer_s = best_seconds(infer, args.repeats)
    return {"size": size, "model": kind, "flags": flags, "width": int(width), "depth": int(depth), "resolution": int(resolution),
            "parameters": sum(p.numel() for p in model.parameters()), "batch": args.batch, "queries": args.queries,
            "train_gflop_per_step": train_flop / 1e9, "train_steps_per_s": 1 / step_s,
            "train_gflop_per_s": train_flop / step_s / 1e9,
            "infer_gflop_per_call": infer_flop / 1e9, "infer_calls_per_s": 1 / infer_s,
            "infer_gflop_per_s": infer_flop / infer_s / 1e9}


def markdown(result: dict) -> str:
    lines = ["# Segmenter FLOP and throughput against the fp32 matmul limit", "",
             f"Command: `{result['command']}`", "",
             f"{result['machine']}, {result['threads']} torch thread(s), torch {result['torch']}. Matmul limit: "
             f"{result['matmul_gflop_per_s']:.1f} GFLOP/s ({result['mm_size']}^3 fp32 `torch.mm`, same run). FLOP counted "
             "by FlopCounterMode (convolutions and matmuls); a training step is forward + backward + AdamW on "
             f"{result['batch']} episodes (1 support, 1 query); an inference call is 1 support + "
             f"{result['queries']} queries. Timings are the best of {result['repeats']} blocks on a shared machine.", "",
             "| size (model:width:depth:px[:flag]) | params | train GFLOP/step | steps/s | train % of limit "
             "| infer GFLOP/call | calls/s | infer % of limit |", "|---" * 8 + "|"]
    for r in result["sizes"]:
        lines.append(f"| {r['size']} | {r['parameters'] / 1e6:.2f} M "
                     f"| {r['train_gflop_per_step']:.2f} | {r['train_steps_per_s']:.2f} | {100 * r['train_fraction']:.0f} "
                     f"| {r['infer_gflop_per_call']:.2f} | {r['infer_calls_per_s']:.2f} | {100 * r['infer_fraction']:.0f} |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    limit = matmul_gflops(args.mm_size, args.repeats)
    rows = []
    for size in args.sizes:
        row = measure(size, args)
        row["train_fraction"] = row["train_gflop_per_s"] / limit
        row["infer_fraction"] = row["infer_gflop_per_s"] / limit
        rows.append(row)
        print(f"{size}: train {row['train_gflop_per_step']:.2f} GFLOP x {row['train_steps_per_s']:.2f}/s = "
              f"{100 * row['train_fraction']:.0f} %, infer {row['infer_gflop_per_call']:.2f} GFLOP x "
              f"{row['infer_calls_per_s']:.2f}/s = {100 * row['infer_fraction']:.0f} %", flush=True)
    limit_after = matmul_gflops(args.mm_size, args.repeats)  # the machine is shared: check the limit held
    result = {"benchmark": "segment_flops", "command": " ".join([".venv/bin/python benchmarks/segment_flops.py",
                                                                 *sys.argv[1:]]),
              "machine": f"{platform.machine()} CPU (shared)", "threads": args.threads, "torch": torch.__version__,
              "mm_size": args.mm_size, "matmul_gflop_per_s": limit, "matmul_gflop_per_s_after": limit_after,
              "batch": args.batch, "queries": args.queries, "repeats": args.repeats, "sizes": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out} and .md (matmul {limit:.1f} GFLOP/s before, {limit_after:.1f} after)")
    return result


if __name__ == "__main__":
    main()
