"""The exact check (``deft check gmm``) over several seeds, operators and both fine-tuning modes.

For each case the JSON of ``deft check gmm`` is kept; the table compares deft and DPS against the
check's targets: posterior-mean relative error ≤ 0.05, component-weight TV ≤ 0.1, sliced W2 within
2× the noise floor, each better than DPS on the same y. ``exact_score`` (the sampler driven by the exact
posterior score) shows how much of the remaining error is the sampler's own::

    python benchmarks/exact_check.py [--seeds 0 1 2] [--parallel 2] [--out benchmarks/results/exact_check.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from deftcli.check_gmm import GMMCheckSpec, check_gmm

OPERATORS = {
    "superres2": {"name": "superres", "params": {"factor": 2, "sigma": 0.1}},
    "inpaint-box": {"name": "inpaint", "params": {"mask": "box", "box_fraction": 0.5, "sigma": 0.1}},
}


def verdict(result: dict) -> dict[str, bool]:
    deft, dps = result["deft"], result["dps"]
    return {
        "mean_error_le_0.05": deft["mean_rel_error"] <= 0.05,
        "weight_tv_le_0.1": deft["weight_tv"] <= 0.1,
        "sliced_w2_within_2x_floor": deft["sliced_w2_over_floor"] <= 2.0,
        "better_than_dps_on_all_three": deft["mean_rel_error"] < dps["mean_rel_error"]
        and deft["weight_tv"] < dps["weight_tv"]
        and deft["sliced_w2"] < dps["sliced_w2"],
    }


def run_case(case: tuple[str, str, int], iterations: int, threads: int) -> dict:
    mode, op, seed = case
    torch.set_num_threads(threads)
    start = time.perf_counter()
    result = check_gmm(GMMCheckSpec(operator=OPERATORS[op], mode=mode, seed=seed, iterations=iterations, device="cpu"))
    return {
        "mode": mode,
        "operator": op,
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 1),
        "verdict": verdict(result),
        "result": result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--operators", nargs="+", default=list(OPERATORS))
    parser.add_argument("--modes", nargs="+", default=["per-measurement", "amortised"])
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--parallel", type=int, default=1, help="cases run at once, each in its own process with --threads threads"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/exact_check.json"))
    args = parser.parse_args()
    cases = [(mode, op, seed) for mode in args.modes for op in args.operators for seed in args.seeds]
    rows = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.parallel, mp_context=context) as pool:
        for row in pool.map(run_case, cases, [args.iterations] * len(cases), [args.threads] * len(cases)):
            rows.append(row)
            d, p, e = (row["result"][k] for k in ("deft", "dps", "exact_score"))
            print(
                f"{row['mode']:15s} {row['operator']:11s} seed {row['seed']}: "
                f"deft err {d['mean_rel_error']:.4f} tv {d['weight_tv']:.4f} "
                f"sw2/floor {d['sliced_w2_over_floor']:.2f} | "
                f"dps(ζ={p['zeta']:g}) err {p['mean_rel_error']:.4f} tv {p['weight_tv']:.4f} "
                f"sw2/floor {p['sliced_w2_over_floor']:.2f} | "
                f"exact score sw2/floor {e['sliced_w2_over_floor']:.2f} | {row['seconds']} s",
                flush=True,
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(
                json.dumps({"iterations": args.iterations, "threads": args.threads, "rows": rows}, indent=2) + "\n"
            )


if __name__ == "__main__":
    main()
