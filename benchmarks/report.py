"""Writes ``benchmarks/README.md`` from the benchmarks' JSON results, so that its tables are what the files hold.

Each user-facing benchmark is one :class:`Benchmark`: its script, the command that wrote its results, two or
three sentences on what it measures, the JSON files it reads and the function that renders their tables.
The README is entirely generated: edit the prose here, never the README::

    python benchmarks/report.py           # rewrites benchmarks/README.md
    python benchmarks/report.py --check   # exit 1 when benchmarks/README.md is not what this would write
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "benchmarks" / "README.md"

Results = dict[str, object]
Renderer = Callable[[Sequence[Results]], list[str]]


@dataclass(frozen=True)
class Benchmark:
    """A user-facing benchmark script and how its results appear in the README."""

    script: str
    title: str
    measures: str  # one line, for the index
    command: str
    about: str
    results: tuple[str, ...]  # JSON files, relative to the repository root
    render: Renderer


def cell(value: object, digits: int | None = None) -> str:
    """A table cell: a number as the JSON holds it, or rounded to ``digits``; null as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if digits is not None and isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A markdown table."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows),
    ]


def machine(results: Results) -> str:
    """Where a result was measured, from what its JSON records."""
    setup = results.get("setup", results)
    assert isinstance(setup, dict)
    parts = [f"{setup['threads']} torch thread{'s' if setup['threads'] != 1 else ''}"] if "threads" in setup else []
    parts += [f"torch {setup['torch']}"] if "torch" in setup else []
    parts += [str(setup["platform"])] if "platform" in setup else []
    return "Measured with " + ", ".join(parts) + "." if parts else ""


def difference(paired: dict[str, float]) -> str:
    """A paired per-image difference: mean ± standard error (images above / images)."""
    return f"{paired['mean_db']:+} ± {paired['standard_error_db']} ({paired['images_above']} of {paired['images']})"


METHOD_NAMES = {"dagger": "A†y", "prior": "prior", "dps": "DPS", "ddrm": "DDRM", "diffpir": "DiffPIR"}
METRICS = {
    "psnr_sample",
    "ssim_sample",
    "psnr_mean",
    "ssim_mean",
    "data_residual",
    "seconds_per_image",
    "k",
    "calibration",
}


def method_name(key: str, selected: str | None = None) -> str:
    """A method's row label: the baselines by name, deft by its run (``deft_w1_gaussian``: w = 1, Gaussian start)."""
    if key in METHOD_NAMES:
        return METHOD_NAMES[key]
    name = "deft"
    if key.startswith("deft_w"):
        weight, start = key.removeprefix("deft_w").split("_")
        name = f"deft, w = {weight}, {start} start"
    return name + (" (selected)" if key == selected else "")


def settings(row: dict[str, object]) -> str:
    """A method's settings: every field of its row that is not a metric."""
    return ", ".join(f"{key} {value}" for key, value in row.items() if key not in METRICS) or "—"


def render_sample_quality(results: Sequence[Results]) -> list[str]:
    (r,) = results
    setup, methods, sweeps = r["setup"], r["methods"], r["sweeps"]
    selected = r["selected_deft"]["run"]
    speed = r["sampling_speed"]
    lines = [
        f"{setup['data']} images, {setup['operator']}, N = {setup['time_steps']}, k = {setup['k']}. {machine(r)}",
        "",
        f"Settings selected on train images ({sweeps['images']}, `sweeps`): DPS {settings(sweeps['dps']['selected'])}; "
        f"DiffPIR {settings(sweeps['diffpir']['selected'])}; {method_name(selected)}, "
        f"{settings(sweeps[selected]['selected'])} (best train PSNR {sweeps[selected]['best_train_psnr']:.2f} dB).",
        "",
    ]
    lines += table(
        [
            "method",
            "settings",
            "PSNR of samples",
            "PSNR of posterior mean",
            "SSIM of posterior mean",
            "data residual",
            f"s/sample (batch {speed['batch']}, median of {speed['rounds']} interleaved rounds)",
        ],
        [
            [
                method_name(name, selected),
                settings(row),
                row["psnr_sample"],
                row["psnr_mean"],
                row["ssim_mean"],
                row["data_residual"],
                speed["seconds_per_image"].get(name, {}).get("median"),
            ]
            for name, row in methods.items()
        ],
    )
    lines += [
        "",
        "The selected deft's posterior mean minus each baseline's, per image (`selected_deft_against`): "
        "mean ± standard error (images where deft is above):",
        "",
    ]
    lines += table(
        ["baseline", "PSNR (dB)", "SSIM"],
        [
            [METHOD_NAMES[name], difference(d["psnr_mean"]), difference(d["ssim_mean"])]
            for name, d in r["selected_deft_against"].items()
        ],
    )
    if r["prior_truth"]:
        truth = r["prior_truth"]
        lines += ["", f"On {truth['images']} (`prior_truth`), where the model's posterior is the true one:", ""]
        lines += table(
            ["method", "PSNR of posterior mean", "SSIM of posterior mean", "data residual"],
            [
                [method_name(name, selected), row["psnr_mean"], row["ssim_mean"], row["data_residual"]]
                for name, row in truth["methods"].items()
            ],
        )
    return lines


CALIBRATION_SAMPLERS = {
    "deft": "deft, fine-tuned posterior",
    "deft_tuned": "deft, the run's tuned sampling",
    "dps": "DPS",
}


def render_calibration(results: Sequence[Results]) -> list[str]:
    (r,) = results
    setup = r["setup"]
    levels = ("0.5", "0.8")
    lines = [
        f"{setup['operator']}, N = {setup['time_steps']}, k = {setup['k']}; prior-drawn truth: "
        f"{r['prior_truth']['images']}; "
        f"{r['petals_val']['images']}. {machine(r)}",
        "",
    ]
    rows = []
    for truth, label in (("prior_truth", "prior-drawn"), ("petals_val", "petals val")):
        for name, row in r[truth]["methods"].items():
            cal = row["calibration"]
            rows.append(
                [
                    label,
                    CALIBRATION_SAMPLERS[name],
                    settings(row),
                    *(cal["coverage"][level] for level in levels),
                    cal["mean_width"]["0.5"],
                    cal["within_one_std"],
                    cal["within_one_std_gaussian"],
                    row["psnr_mean"],
                ]
            )
    return lines + table(
        [
            "truth",
            "sampler",
            "settings",
            "coverage 50 %",
            "coverage 80 %",
            "mean width 50 %",
            "within one std",
            "Gaussian reference",
            "PSNR of posterior mean",
        ],
        rows,
    )


def render_exact_check(results: Sequence[Results]) -> list[str]:
    r, default = results
    lines = [f"{r['iterations']} fine-tuning iterations, {r['threads']} torch thread per case.", ""]
    rows = []
    for case in r["rows"]:
        deft, dps, exact = case["result"]["deft"], case["result"]["dps"], case["result"]["exact_score"]
        rows.append(
            [
                case["mode"],
                case["operator"],
                case["seed"],
                cell(deft["mean_rel_error"], 4),
                cell(deft["weight_tv"], 4),
                cell(deft["sliced_w2_over_floor"], 2),
                dps["zeta"],
                cell(dps["mean_rel_error"], 4),
                cell(dps["weight_tv"], 4),
                cell(dps["sliced_w2_over_floor"], 2),
                cell(exact["sliced_w2_over_floor"], 2),
            ]
        )
    lines += table(
        [
            "mode",
            "operator",
            "seed",
            "deft mean error",
            "deft weight TV",
            "deft SW2 / floor",
            "DPS ζ",
            "DPS mean error",
            "DPS weight TV",
            "DPS SW2 / floor",
            "exact-score SW2 / floor",
        ],
        rows,
    )
    verdicts = [case["verdict"] for case in r["rows"]]
    lines += [
        "",
        "Cases that meet each target (`verdict`): "
        + "; ".join(f"`{target}` {sum(v[target] for v in verdicts)} of {len(verdicts)}" for target in verdicts[0])
        + ".",
        "",
    ]
    coverage = default["coverage"]
    lines += [
        f"Credible-interval coverage of the default `deft check gmm` "
        f"([results/check_gmm_default.json](results/check_gmm_default.json)): {coverage['truths_per_measurement']} "
        f"{coverage['truth']}, against {coverage['samples_per_measurement']} samples of each sampler.",
        "",
    ]
    samplers = {
        "exact_posterior": "exact posterior's own samples",
        "deft": "deft",
        "dps": "DPS",
        "exact_score": "exact-score sampler",
        "prior": "prior",
    }
    return lines + table(
        ["sampler", "coverage 50 %", "80 %", "90 %", "mean width 90 %", "within one std", "Gaussian reference"],
        [
            [
                label,
                *(coverage[key]["coverage"][level] for level in ("0.5", "0.8", "0.9")),
                coverage[key]["mean_width"]["0.9"],
                coverage[key]["within_one_std"],
                coverage[key]["within_one_std_gaussian"],
            ]
            for key, label in samplers.items()
        ],
    )


def render_finetune_cost(results: Sequence[Results]) -> list[str]:
    (r,) = results
    config, host = r["config"], r["machine"]
    lines = [
        f"{config['image_size']}×{config['image_size']} RGB, batch {config['batch']}, prior UNet "
        f"{config['prior']['model_channels']} "
        f"ch {config['prior']['channel_mult']}, h-network UNet {config['hnet']['model_channels']} ch "
        f"{config['hnet']['channel_mult']}. "
        f"Measured on {host['cpu_count']} CPUs, torch {host['torch']}, {host['platform']}.",
        "",
    ]
    lines += table(
        ["method", "N", "s/iteration", "peak RSS (MB)", "RSS before the first iteration (MB)", "threads"],
        [
            [
                row["method"],
                row["time_steps"],
                row["seconds_per_iteration"],
                row["peak_rss_mb"],
                row["rss_before_first_iteration_mb"],
                row["threads"],
            ]
            for row in r["rows"]
        ],
    )
    return lines + [
        "",
        "Peak RSS at N = 200 over N = 50: "
        + ", ".join(f"{method} {ratios['rss_ratio_N200_over_N50']}" for method, ratios in r["summary"].items())
        + ".",
    ]


def render_speed(results: Sequence[Results]) -> list[str]:
    r, bf16 = results
    setup, cpu = r["setup"], r["setup"]["cpu"]
    lines = [
        f"{setup['problem']}; batch {setup['batch']}, N = {setup['time_steps']}, {setup['rounds']} timed "
        f"round(s). CPU: {cpu['model']}, "
        f"torch capability {cpu['torch_capability']}, flags {', '.join(cpu['flags']) or 'none'}, native bf16: "
        f"{cell(cpu['native_bf16'])}. "
        f"{machine(r)}",
        "",
    ]
    rows = r["cpu"]["rows"]
    lines += table(
        [
            "configuration",
            "prior forward (images/s)",
            "deft (s/sample)",
            "DPS (s/sample)",
            "vargrad (s/iteration)",
            "first call: prior forward, deft, DPS, vargrad (s)",
        ],
        [
            [
                name,
                row["prior_forward_images_per_second"],
                row["deft_seconds_per_sample"],
                row["dps_seconds_per_sample"],
                row["vargrad_seconds_per_iteration"],
                ", ".join(str(row["first_call_seconds"][part]) for part in ("prior_forward", "deft", "dps", "vargrad")),
            ]
            for name, row in rows.items()
        ],
    )
    lines += [
        "",
        f"Quality at bf16 ([results/bf16_quality.json](results/bf16_quality.json)): {bf16['what']}; "
        f"{bf16['fp32']['n']} val images, k = {bf16['fp32']['k']}, N = {bf16['fp32']['steps']}, {bf16['threads']} "
        "thread.",
        "",
    ]
    return lines + table(
        ["precision", "deft PSNR of posterior mean", "DPS PSNR of posterior mean", "deft s/image", "DPS s/image"],
        [
            [
                p,
                bf16[p]["deft"]["psnr_mean"],
                bf16[p]["dps"]["psnr_mean"],
                bf16[p]["deft"]["seconds_per_image"],
                bf16[p]["dps"]["seconds_per_image"],
            ]
            for p in ("fp32", "bf16")
        ],
    )


GPU_COLUMNS = {
    "vargrad_seconds_per_iteration": "vargrad s/iteration",
    "vargrad_peak_memory_mb": "vargrad peak MB",
    "deft_samples_per_second": "deft samples/s",
    "dps_samples_per_second": "DPS samples/s",
    "prior_samples_per_second": "prior samples/s",
    "dps_seconds_over_deft_seconds": "DPS s / deft s",
    "deft_peak_memory_mb": "deft peak MB",
    "dps_peak_memory_mb": "DPS peak MB",
}


def render_gpu_check(results: Sequence[Results]) -> list[str]:
    (r,) = results
    config, shipped = r["config"], r["shipped_prior_sampling"]
    lines = [
        f"{r['card']}, torch {r['torch']}. Random weights at the original sizes: prior UNet "
        f"{config['prior']['model_channels']} ch "
        f"{config['prior']['channel_mult']}, h-network {config['hnet']['model_channels']} ch "
        f"{config['hnet']['channel_mult']}, "
        f"{config['image_size']}×{config['image_size']} RGB, {config['operator']}; fine-tuning batch "
        f"{config['batch']}, "
        f"sampling batch {config['sample_batch']}. Peak memory is `torch.cuda.max_memory_allocated`.",
        "",
    ]
    lines += table(
        ["N", *GPU_COLUMNS.values()], [[row["time_steps"], *(row.get(key) for key in GPU_COLUMNS)] for row in r["rows"]]
    )
    lines += [
        "",
        f"The shipped `{shipped['prior']}` prior at N = {shipped['time_steps']} (auto-sized h-network, random "
        "weights): "
        f"deft {shipped['deft_samples_per_second']}, DPS {shipped['dps_samples_per_second']}, prior "
        f"{shipped['prior_samples_per_second']} samples/s (DPS s / deft s {shipped['dps_seconds_over_deft_seconds']}).",
        "",
    ]
    return lines + smoke_lines(r["cli_smoke"])


def smoke_lines(smoke: dict[str, object] | list[dict[str, object]]) -> list[str]:
    """The command-line smoke: its verdict, or (a file without one) each command's exit code and skipped steps."""
    if isinstance(smoke, dict):
        return [
            f"Command-line smoke: passed {cell(smoke['passed'])}, {smoke['finetune_steps_logged']} fine-tuning "
            "steps logged, "
            f"{smoke['finetune_steps_skipped']} skipped."
        ]
    rows = []
    for command in (c for c in smoke if "command" in c):
        skipped = re.search(r'"skipped_steps": (\d+)', command["output_tail"])
        rows.append(
            [
                " ".join(command["command"].split()[:2]),
                command["exit_code"],
                command["seconds"],
                skipped and skipped.group(1),
            ]
        )
    return [
        "The command-line smoke in this file fine-tunes the random prior, where the divergence guard skips every step: "
        "it shows that the commands run, and no more.",
        "",
        *table(
            ["command-line smoke", "exit code", "seconds (process start-up included)", "fine-tuning steps skipped"],
            rows,
        ),
    ]


def render_petals_throughput(results: Sequence[Results]) -> list[str]:
    (r,) = results
    lines = [f"Measured with {r['threads']} torch thread, torch {r['torch']}, {r['machine']}.", ""]
    return lines + table(
        ["size", "batch", "images/s"],
        [[row["size"], row["batch"], cell(row["images_per_second"], 0)] for row in r["results"]],
    )


def render_prior_samples(results: Sequence[Results]) -> list[str]:
    (r,) = results
    lines = [
        f"{r['samples']} samples of `{r['prior']['name']}`, {r['steps']} steps, against as many data images; grid "
        f"`{r['grid']}` ({r['layout']}).",
        "",
    ]
    return lines + table(
        ["", "per-channel mean", "per-channel std", "pixels outside [-1, 1]"],
        [
            [label, r[key]["channel_mean"], r[key]["channel_std"], r[key]["outside_unit_range"]]
            for label, key in (("samples", "samples_stats"), ("data", "data_stats"))
        ],
    )


BENCHMARKS = (
    Benchmark(
        "sample_quality.py",
        "Posterior quality: 4× super-resolution of `petals` val",
        "PSNR/SSIM and speed of A†y, the prior, DPS, DDRM, DiffPIR and deft; selects the prior's tuned defaults",
        "python benchmarks/sample_quality.py [--run DIR --run DIR] [--write-tuning model_weights/petals32/tuning.json]",
        "Every method on the same val images, measurements (seed 0), prior, time grid and k samples per image. "
        "Nothing is "
        "chosen on val images: DPS's ζ, DiffPIR's (λ, ζ) and deft's (run, γ, sampler) are the best PSNR on the "
        "first train "
        "images, DDRM runs at the paper's η = 0.85, η_b = 1; without `--run` it fine-tunes one run per "
        "`--configs` entry "
        "(likelihood weight w : h-network start). `--write-tuning` stores the selected deft as the prior's "
        "`tuning.json`.",
        ("benchmarks/results/sample_quality.json",),
        render_sample_quality,
    ),
    Benchmark(
        "calibration.py",
        "Calibration: do the credible intervals cover the truth?",
        "coverage of deft's and DPS's per-pixel credible intervals against the nominal level",
        "python benchmarks/calibration.py --run DIR",
        "For one fine-tuned run, deft sampled as its fine-tuned posterior (`sde`, γ = 1) and with the run's tuned "
        "sampling "
        "settings, and DPS at the ζ its train sweep selects, each with k samples per image, on truths drawn from "
        "the prior "
        "(where the model's posterior is exact, so exact samples would cover at the nominal rate) and on petals val. "
        "Coverage is the fraction of pixels whose truth lies in the central interval between the samples' Weibull "
        "quantiles.",
        ("benchmarks/results/calibration.json",),
        render_calibration,
    ),
    Benchmark(
        "exact_check.py",
        "The exact check on a Gaussian-mixture prior",
        "`deft check gmm` over seeds, operators and both fine-tuning modes",
        "python benchmarks/exact_check.py [--seeds 0 1 2] [--parallel 2]",
        "A Gaussian-mixture prior whose posterior is known in closed form: relative error of the posterior mean, total "
        "variation of the component weights and sliced W2 over its noise floor (the distance between two exact "
        "sample sets of "
        "the same size), for deft and for DPS at the ζ a sweep on other measurements selects. The exact-score "
        "sampler drives "
        "the same reverse SDE with the exact posterior score: the error no fine-tuning can remove at this N.",
        ("benchmarks/results/exact_check.json", "benchmarks/results/check_gmm_default.json"),
        render_exact_check,
    ),
    Benchmark(
        "finetune_cost.py",
        "Fine-tuning cost against N",
        "seconds per iteration and peak RSS of fine-tuning against the number of time steps N",
        "python benchmarks/finetune_cost.py [--steps 50 100 200 400] [--methods vargrad backprop vargrad_single_pass]",
        "deft's two-pass VarGrad against backpropagation through whole trajectories (per-step checkpointing) and "
        "a single-pass "
        "VarGrad that keeps the graph of h at every selected step (the original code's memory behaviour, for "
        "reference). "
        "Random weights; each (method, N) runs in its own process, so that each peak RSS is its own.",
        ("benchmarks/results/finetune_cost.json",),
        render_finetune_cost,
    ),
    Benchmark(
        "speed.py",
        "Precision and compiled graphs",
        "fp32 against bf16 and eager against compiled networks: the prior's forward pass, deft, DPS and vargrad",
        "python benchmarks/speed.py --threads 1 --steps 20 --rounds 2",
        "All configurations in one process, interleaved, on the embedded default with the CPU's features recorded. "
        "Compiled configurations time the parts named by `--compiled-parts` (all by default); the first call holds "
        "the compilation, whose time depends on what inductor's on-disk cache already holds.",
        ("benchmarks/results/speed.json", "benchmarks/results/bf16_quality.json"),
        render_speed,
    ),
    Benchmark(
        "gpu_check.py",
        "GPU: the original 64×64 configuration",
        "fine-tuning and sampling throughput on a GPU at the original sizes, and a command-line smoke run",
        "python benchmarks/gpu_check.py --device cuda [--steps 50 200]",
        "vargrad seconds per iteration and samples per second of deft, DPS and the prior at the original Flowers102 "
        "experiment's sizes, with the device's peak memory; then `deft finetune` and `deft eval` run on the device. "
        "`shipped_prior_sampling` in this file used a full-resolution h-network (the default one now works on 2×2 "
        "pixel blocks).",
        ("benchmarks/results/gpu_check.json",),
        render_gpu_check,
    ),
    Benchmark(
        "petals_throughput.py",
        "`petals` rendering speed",
        "images per second of the embedded `petals` data set",
        "python benchmarks/petals_throughput.py --threads 1",
        "How fast the procedural data set renders batches, to compare with a training step's cost.",
        ("benchmarks/results/petals_throughput.json",),
        render_petals_throughput,
    ),
    Benchmark(
        "prior_samples.py",
        "Unconditional samples of a prior",
        "a prior's samples next to its data, with simple statistics",
        "python benchmarks/prior_samples.py --prior model_weights/petals32 --out "
        "model_weights/petals32/samples_vs_data.png",
        "A grid of unconditional samples beside data images, to judge the prior by eye, and per-channel "
        "statistics of both.",
        ("model_weights/petals32/samples_vs_data.json",),
        render_prior_samples,
    ),
)


def link(path: str) -> str:
    """A link to a results file, relative to ``benchmarks/``."""
    relative = path.removeprefix("benchmarks/") if path.startswith("benchmarks/") else f"../{path}"
    return f"[{relative}]({relative})"


def section(benchmark: Benchmark, root: Path) -> list[str]:
    """A benchmark's README section: title, command, what it measures, and its tables."""
    results = [json.loads((root / path).read_text()) for path in benchmark.results]
    return [
        f"## {benchmark.title} (`{benchmark.script}`)",
        "",
        f"`{benchmark.command}` → {link(benchmark.results[0])}.",
        benchmark.about,
        "",
        *benchmark.render(results),
        "",
    ]


def render_readme(root: Path = ROOT) -> str:
    """The whole of ``benchmarks/README.md``."""
    lines = [
        "# Benchmarks",
        "",
        "Speed, memory and quality are measured here, never asserted in tests. Each script writes JSON to "
        "`benchmarks/results/`; this file is generated from those files by `python benchmarks/report.py` "
        "(`--check` tells whether it is up to date). Research diagnostics are indexed in "
        "[research/README.md](research/README.md).",
        "",
    ]
    lines += table(
        ["script", "measures", "results"], [[f"`{b.script}`", b.measures, link(b.results[0])] for b in BENCHMARKS]
    )
    lines.append("")
    for benchmark in BENCHMARKS:
        lines += section(benchmark, root)
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when benchmarks/README.md differs from what would be written"
    )
    args = parser.parse_args()
    text = render_readme()
    if args.check:
        if README.read_text() != text:
            print(f"{README.relative_to(ROOT)} is out of date: run python benchmarks/report.py", file=sys.stderr)
            sys.exit(1)
        return
    README.write_text(text)


if __name__ == "__main__":
    main()
