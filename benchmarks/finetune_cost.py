"""Seconds per iteration and peak memory of fine-tuning, against the number of time steps N.

Configuration of the original code's measurement: 32×32 RGB, batch 8 (one
measurement × 8 trajectories), prior UNet 32 ch [1, 2, 2], h-network UNet 32 ch [1, 2], random
weights (cost does not depend on them). Methods:

- ``vargrad``: deft's two-pass VarGrad (gradient-free rollout, then one stored step at a time);
- ``backprop``: ∇J through whole trajectories with per-step gradient checkpointing;
- ``vargrad_single_pass``: a reference of the original code's approach, implemented here only for
  comparison — the graph of h at every selected step is kept until Var(L).backward().

Each (method, N) runs in its own process so that the peak RSS (ru_maxrss) is its own; the process
also reports the RSS before the first iteration. Timing: one warm-up iteration, then the mean of
``--iterations`` iterations. Writes JSON (``--out``) and prints a table::

    python benchmarks/finetune_cost.py [--steps 50 100 200 400] [--methods vargrad backprop vargrad_single_pass]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIG = {
    "image_size": 32,
    "batch": 8,
    "prior": {"model_channels": 32, "channel_mult": [1, 2, 2]},
    "hnet": {"model_channels": 32, "channel_mult": [1, 2], "space_to_depth": 1},
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def single_pass_step(trainer) -> None:
    """The original code's memory behaviour: keep h's graph at the selected steps until the end."""
    from deftcli.htransform import guidance_inputs
    from deftcli.samplers import GeneratorNoise, ReverseStep, sample_reverse_sde
    from deftcli.soc import data_term, gradient_steps, step_terms, vargrad_weights

    spec, prior, h, op = trainer.spec, trainer.prior, trainer.htransform, trainer.operator
    batch = trainer.source.draw(trainer.data_gen, trainer.ctx)
    noise = GeneratorNoise(trainer.noise_gen)
    x = noise(batch.y.shape[:1] + tuple(prior.image_shape), "cpu")
    grid = trainer.grid
    selected = set(gradient_steps(len(grid) - 1, spec.grad_fraction, trainer.data_gen))
    total, k = torch.zeros(x.shape[0]), 0
    evaluated: list[torch.Tensor] = []  # h of the step being taken

    def controlled_score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """s_θ + h, with h's graph kept at the selected steps (the trajectory itself carries none)."""
        score, g = guidance_inputs(prior, op, x, t, batch.y)
        with torch.set_grad_enabled(k in selected):
            evaluated.append(h(x, t, g))
        return score + evaluated[-1].detach()

    def add_terms(step: ReverseStep) -> None:
        nonlocal total, k
        with torch.set_grad_enabled(step.k in selected):
            total = total + sum(step_terms(evaluated.pop(), prior.sde.beta(step.t), step.ds, step.xi))
        k += 1

    x = sample_reverse_sde(controlled_score, prior.sde, x, grid, noise, callback=add_terms, keep_graph=True)
    log_rnd = data_term(op, x, batch.y) + total
    kept = vargrad_weights(log_rnd.detach(), batch.groups, trainer.loss_threshold, spec.min_kept_fraction).kept
    trainer.optimizer.zero_grad()
    log_rnd[kept].var().backward()
    trainer.optimizer.step()


def child(method: str, steps: int, iterations: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    from deftcli.checkpoint import save_weights, write_json
    from deftcli.finetune import Finetuner
    from deftcli.images import save_image
    from deftcli.sde import VPSDE
    from deftcli.specs import FinetuneSpec
    from deftcli.unet import UNet, UNetConfig

    size, batch = CONFIG["image_size"], CONFIG["batch"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = UNetConfig(**CONFIG["prior"])
        torch.manual_seed(0)
        unet = UNet(config, VPSDE().sigma)
        for p in unet.parameters():
            torch.nn.init.normal_(p, std=0.02)
        save_weights(unet.state_dict(), tmp / "prior" / "model.safetensors")
        write_json(
            {
                "format": "deft-unet-prior",
                "name": "random",
                "image_shape": [3, size, size],
                "sde": {"beta_min": 0.1, "beta_max": 20.0},
                "unet": config.model_dump(mode="json"),
            },
            tmp / "prior" / "config.json",
        )
        save_image(torch.zeros(3, size // 4, size // 4), tmp / "y.safetensors")
        spec = FinetuneSpec.model_validate(
            {
                "prior": {"path": str(tmp / "prior")},
                "operator": {"name": "superres", "params": {"factor": 4}},
                "measurement": str(tmp / "y.safetensors"),
                "method": "backprop" if method == "backprop" else "vargrad",
                "time_steps": steps,
                "trajectories": batch,
                "iterations": 1000,
                "loss_threshold": 1e12,
                "hnet": CONFIG["hnet"],
                "device": "cpu",
                "run_dir": str(tmp / "run"),
            }
        )
        (tmp / "run").mkdir()
        trainer = Finetuner(spec, tmp / "run", resume=False, quiet=True)
        run_step = (lambda: single_pass_step(trainer)) if method == "vargrad_single_pass" else trainer.step
        rss_before = current_rss_mb()
        run_step()  # warm-up
        began = time.perf_counter()
        for _ in range(iterations):
            run_step()
        seconds = (time.perf_counter() - began) / iterations
    return {
        "method": method,
        "time_steps": steps,
        "seconds_per_iteration": round(seconds, 3),
        "peak_rss_mb": round(rss_mb(), 1),
        "rss_before_first_iteration_mb": round(rss_before, 1),
        "iterations_timed": iterations,
        "threads": threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200, 400])
    parser.add_argument("--methods", nargs="+", default=["vargrad", "backprop", "vargrad_single_pass"])
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune_cost.json"))
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.iterations, args.threads)))
        return
    rows = []
    for method in args.methods:
        for steps in args.steps:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    method,
                    str(steps),
                    "--iterations",
                    str(args.iterations),
                    "--threads",
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{method:22s} N={steps:4d}  {row['seconds_per_iteration']:8.2f} s/it  "
                f"peak RSS {row['peak_rss_mb']:8.1f} MB",
                flush=True,
            )
    summary = {}
    for method in args.methods:
        by_n = {r["time_steps"]: r for r in rows if r["method"] == method}
        if 50 in by_n and 200 in by_n:
            summary[method] = {"rss_ratio_N200_over_N50": round(by_n[200]["peak_rss_mb"] / by_n[50]["peak_rss_mb"], 3)}
    result = {
        "config": CONFIG,
        "machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
        "rows": rows,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
