"""Rendering speed of the embedded ``petals`` data set, in images per second.

Renders ``--repeats`` batches of distinct train images (after one warm-up batch) for each image
size and batch size, on ``--threads`` torch threads (default 1: the data set must keep up with
training on one core), prints a table and writes JSON::

    python benchmarks/petals_throughput.py [--out benchmarks/results/petals_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from deftcli.petals import SPLIT_SIZES, render_petals


def measure(size: int, batch: int, repeats: int) -> dict[str, float | int]:
    """Seconds per batch and images/s for ``repeats`` batches of ``batch`` images at ``size``."""
    render_petals("train", range(batch), size)
    seconds = []
    for repeat in range(1, repeats + 1):
        start = (repeat * batch) % (SPLIT_SIZES["train"] - batch)
        began = time.perf_counter()
        render_petals("train", range(start, start + batch), size)
        seconds.append(time.perf_counter() - began)
    total = sum(seconds)
    return {
        "size": size,
        "batch": batch,
        "batches": repeats,
        "seconds_per_batch": total / repeats,
        "best_seconds_per_batch": min(seconds),
        "images_per_second": batch * repeats / total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/petals_throughput.json"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    results = [measure(size, batch, args.repeats) for size in args.sizes for batch in args.batches]
    print(f"petals rendering, {args.threads} torch thread(s), {args.repeats} batches each")
    print(f"{'size':>6} {'batch':>6} {'s/batch':>9} {'images/s':>9}")
    for row in results:
        print(f"{row['size']:>6} {row['batch']:>6} {row['seconds_per_batch']:>9.4f} {row['images_per_second']:>9.0f}")

    report = {
        "benchmark": "petals_throughput",
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
