"""The ``deft`` command line (Typer). Commands stay thin: they build a spec and call the library.

Every user mistake ends as one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml

from .errors import DeftError
from .interrupts import InterruptWins

# Typer ≥ 0.20 vendors click (its exceptions derive from typer.TyperException); older ones use click.
USAGE_ERRORS: tuple[type[Exception], ...] = (typer.TyperException,)
ABORTS: tuple[type[BaseException], ...] = (typer.Abort, KeyboardInterrupt)
try:
    import click

    USAGE_ERRORS += (click.exceptions.ClickException,)
    ABORTS += (click.exceptions.Abort,)
except ImportError:
    pass

app = typer.Typer(
    name="deft",
    help="Fine-tune an unconditional diffusion prior into a posterior sampler for an inverse problem (online DEFT).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
check_app = typer.Typer(help="Exact checks against analytic posteriors.", no_args_is_help=True)
app.add_typer(check_app, name="check")

# ---------------------------------------------------------------- shared options
SpecOpt = Annotated[
    Optional[Path], typer.Option("--spec", help="run spec file (YAML, TOML or JSON); flags override it")
]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", min=0, max=2**63 - 1, help="random seed (default 0)")]
SamplerOpt = Annotated[
    Optional[str],
    typer.Option(
        "--sampler",
        help="deft's sampler: sde (Euler–Maruyama on the reverse SDE) or renoise (denoise and re-noise; "
        "default: the run's tuned one, else sde)",
    ),
]
RenoiseZetaOpt = Annotated[
    Optional[float],
    typer.Option("--renoise-zeta", help="deft's renoise sampler: share ζ ∈ [0, 1] of fresh noise per step"),
]
DeviceOpt = Annotated[
    Optional[str], typer.Option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="plain log lines instead of a progress bar")]
OperatorOpt = Annotated[Optional[str], typer.Option("--operator", help="forward operator (see `deft operators`)")]
FactorOpt = Annotated[Optional[int], typer.Option("--factor", help="superres: downsampling factor")]
SigmaOpt = Annotated[Optional[float], typer.Option("--sigma", help="measurement noise std in the [-1, 1] pixel scale")]
KernelOpt = Annotated[Optional[str], typer.Option("--kernel", help="blur: gaussian, uniform or a kernel image file")]
KernelStdOpt = Annotated[Optional[float], typer.Option("--kernel-std", help="blur: gaussian kernel std (pixels)")]
KernelSizeOpt = Annotated[Optional[int], typer.Option("--kernel-size", help="blur: odd kernel size")]
MaskOpt = Annotated[
    Optional[str], typer.Option("--mask", help="inpaint: box, random or a mask image (white = observed)")
]
ParamOpt = Annotated[
    Optional[list[str]], typer.Option("--param", help="any operator parameter as key=value (repeatable)")
]
PriorOpt = Annotated[
    Optional[str], typer.Option("--prior", help="prior folder or shipped name (default: model_weights/petals32)")
]
DatasetOpt = Annotated[Optional[str], typer.Option("--dataset", help="petals, flowers102 or folder")]
DataRootOpt = Annotated[Optional[str], typer.Option("--data-root", help="data folder for flowers102 / folder")]
PrecisionOpt = Annotated[
    Optional[str],
    typer.Option(
        "--precision",
        help="the networks' precision: fp32 (default), bf16, or "
        "auto (bf16 on a CPU with AMX-BF16/AVX512-BF16, else fp32)",
    ),
]
CompileOpt = Annotated[
    Optional[bool],
    typer.Option(
        "--compile/--no-compile",
        help="torch.compile the prior and the h-network (default off; compiles once per batch size)",
    ),
]


def operator_overrides(
    operator: str | None,
    factor: int | None,
    sigma: float | None,
    kernel: str | None,
    kernel_std: float | None,
    kernel_size: int | None,
    mask: str | None,
    param: list[str] | None,
) -> dict[str, Any]:
    """Dotted spec overrides for the operator section from the operator flags."""
    params: dict[str, Any] = {}
    flags = {
        "factor": factor,
        "sigma": sigma,
        "kernel": kernel,
        "kernel_std": kernel_std,
        "kernel_size": kernel_size,
        "mask": mask,
    }
    params.update({k: v for k, v in flags.items() if v is not None})
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DeftError(f"--param expects key=value, got '{item}'")
        name = key.strip().replace("-", "_")
        if name in params:
            raise DeftError(
                f"operator parameter '{name}' is given twice "
                f"(--param {item} and --{name.replace('_', '-')} or another --param)"
            )
        try:
            params[name] = yaml.safe_load(value)
        except yaml.YAMLError:
            params[name] = value
    return {"operator.name": operator, "operator.params": params or None}


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


# ---------------------------------------------------------------- commands
@app.command("operators")
def operators_cmd() -> None:
    """List the registered forward operators, their parameters and defaults, and who provides them."""
    from rich.console import Console
    from rich.table import Table

    from .operators import available

    table = Table(title="deft operators (entry-point group deft.operators)")
    for col in ("name", "parameters (default)", "provided by"):
        table.add_column(col)
    for name, info in sorted(available().items()):
        if info.error is not None:
            table.add_row(name, f"[red]broken plugin: {info.error}[/red]", info.distribution or "?")
            continue
        fields = info.operator_class.Params.model_fields
        params = "\n".join(
            (f"{k} (required)" if f.is_required() else f"{k} = {f.get_default(call_default_factory=True)!r}")
            + (f"  [dim]{f.description}[/dim]" if f.description else "")
            for k, f in fields.items()
        )
        table.add_row(name, params, info.distribution or "?")
    Console().print(table)


@app.command("degrade")
def degrade_cmd(
    image: Annotated[Path, typer.Argument(help="clean image file")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="measurement file (.png, or .safetensors to keep it exact)")
    ],
    operator: OperatorOpt = "superres",
    factor: FactorOpt = None,
    sigma: SigmaOpt = None,
    kernel: KernelOpt = None,
    kernel_std: KernelStdOpt = None,
    kernel_size: KernelSizeOpt = None,
    mask: MaskOpt = None,
    param: ParamOpt = None,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**63 - 1, help="noise seed (default 0)")] = 0,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing output file")] = False,
) -> None:
    """Make a measurement y = A(x) + σ·noise from a clean image."""
    import torch

    from .images import read_image, save_image
    from .operators import create
    from .specs import OperatorSpec, build_spec

    spec = build_spec(
        OperatorSpec,
        overrides={
            k.split(".", 1)[1]: v
            for k, v in operator_overrides(
                operator, factor, sigma, kernel, kernel_std, kernel_size, mask, param
            ).items()
        },
    )
    if output.is_dir():
        raise DeftError(f"{output}: is a folder; -o names the measurement file, e.g. {output / 'y.png'}")
    if output.exists() and not force:
        raise DeftError(f"{output}: exists (use --force to overwrite)")
    op = create(spec.name, **spec.params)
    x = read_image(image)
    op.measurement_shape(tuple(x.shape))
    y = op.measure(x[None], generator=torch.Generator().manual_seed(seed))[0]
    save_image(y, output)
    typer.echo(f"{output}: {op.describe()} of {image} → {tuple(y.shape)}")


@app.command("pretrain")
def pretrain_cmd(
    spec: SpecOpt = None,
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size")] = None,
    channels: Annotated[Optional[int], typer.Option("--channels", help="1 (grey) or 3 (RGB)")] = None,
    model_channels: Annotated[Optional[int], typer.Option("--model-channels", help="UNet base channels")] = None,
    channel_mult: Annotated[Optional[str], typer.Option("--channel-mult", help="e.g. 1,2,2")] = None,
    iterations: Annotated[Optional[int], typer.Option("--iterations", help="training steps (default 20000)")] = None,
    max_minutes: Annotated[
        Optional[float],
        typer.Option(
            "--max-minutes", help="stop and save after this wall time, counted over every leg of a resumed run"
        ),
    ] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="images per step (default 64)")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Adam learning rate (default 5e-4)")] = None,
    ema_decay: Annotated[Optional[float], typer.Option("--ema-decay")] = None,
    sample_every: Annotated[Optional[int], typer.Option("--sample-every")] = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="output prior folder")] = None,
    name: Annotated[Optional[str], typer.Option("--name")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a UNet prior by denoising score matching (how the shipped prior was made)."""
    from .pretrain import pretrain
    from .specs import PretrainSpec, build_spec, read_saved_spec

    mult = parse_ints(channel_mult, "--channel-mult")
    overrides = {
        "data.dataset": dataset,
        "data.root": data_root,
        "image_size": image_size,
        "channels": channels,
        "unet.model_channels": model_channels,
        "unet.channel_mult": mult,
        "iterations": iterations,
        "max_minutes": max_minutes,
        "batch_size": batch_size,
        "lr": lr,
        "ema_decay": ema_decay,
        "sample_every": sample_every,
        "seed": seed,
        "device": device,
        "out": out,
        "name": name,
    }
    base = None
    if resume:
        folder = Path(out or PretrainSpec().out)
        base = read_saved_spec(folder / "spec.json")
    resolved = build_spec(PretrainSpec, spec, overrides, base=base)
    summary = pretrain(resolved, resume=resume, quiet=quiet, command=["deft", *sys.argv[1:]])
    print_json(summary)
    if summary["interrupted"]:
        raise typer.Exit(130)


@app.command("finetune")
def finetune_cmd(
    spec: SpecOpt = None,
    prior: PriorOpt = None,
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = None,
    operator: OperatorOpt = None,
    factor: FactorOpt = None,
    sigma: SigmaOpt = None,
    kernel: KernelOpt = None,
    kernel_std: KernelStdOpt = None,
    kernel_size: KernelSizeOpt = None,
    mask: MaskOpt = None,
    param: ParamOpt = None,
    method: Annotated[Optional[str], typer.Option("--method", help="vargrad (default) or backprop")] = None,
    measurement: Annotated[
        Optional[str], typer.Option("--measurement", help="fine-tune for this one measurement (image or .safetensors)")
    ] = None,
    iterations: Annotated[
        Optional[int], typer.Option("--iterations", help="gradient steps (default: the prior's tuned value, else 100)")
    ] = None,
    max_minutes: Annotated[
        Optional[float],
        typer.Option(
            "--max-minutes", help="stop (and save) after this wall time, counted over every leg of a resumed run"
        ),
    ] = None,
    time_steps: Annotated[
        Optional[int], typer.Option("--time-steps", help="N, points of the time grid (default 50)")
    ] = None,
    measurements_per_batch: Annotated[
        Optional[int], typer.Option("--measurements-per-batch", help="M, measurements per step (amortised; default 2)")
    ] = None,
    trajectories: Annotated[
        Optional[int], typer.Option("--trajectories", help="K, trajectories per measurement (default 4)")
    ] = None,
    lr: Annotated[
        Optional[float], typer.Option("--lr", help="Adam learning rate of the h-network (default 5e-4 / w)")
    ] = None,
    likelihood_weight: Annotated[
        Optional[float],
        typer.Option(
            "--likelihood-weight",
            help="w: fine-tune for the tempered posterior p(x) p(y|x)^w "
            "(default: the prior's tuned w, else 1, the posterior)",
        ),
    ] = None,
    hnet_channels: Annotated[
        Optional[int], typer.Option("--hnet-channels", help="h-network UNet base channels")
    ] = None,
    hnet_mult: Annotated[
        Optional[str], typer.Option("--hnet-mult", help="h-network channel multipliers, e.g. 1,2")
    ] = None,
    hnet_space_to_depth: Annotated[
        Optional[int],
        typer.Option("--hnet-space-to-depth", help="h-network UNet on r×r pixel blocks (1: full resolution)"),
    ] = None,
    hnet_start: Annotated[
        Optional[str],
        typer.Option(
            "--hnet-start",
            help="gaussian (h starts at the Gaussian-approximation guidance) or zero "
            "(as the original; default: the prior's tuned start, else zero)",
        ),
    ] = None,
    precision: PrecisionOpt = None,
    compile_networks: CompileOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    run_dir: Annotated[
        Optional[str], typer.Option("--run-dir", help="run folder (default runs/<operator>-<timestamp>)")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue --run-dir (default: the latest run)")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune an h-transform so the prior samples the posterior of an inverse problem."""
    from .finetune import finetune
    from .runs import RESUME_STATE, latest_run
    from .specs import FinetuneSpec, build_spec, read_saved_spec

    overrides = {
        "prior.path": prior,
        "data.dataset": dataset,
        "data.root": data_root,
        "method": method,
        "measurement": measurement,
        "iterations": iterations,
        "max_minutes": max_minutes,
        "time_steps": time_steps,
        "measurements_per_batch": measurements_per_batch,
        "trajectories": trajectories,
        "lr": lr,
        "likelihood_weight": likelihood_weight,
        "hnet.model_channels": hnet_channels,
        "hnet.channel_mult": parse_ints(hnet_mult, "--hnet-mult"),
        "hnet.space_to_depth": hnet_space_to_depth,
        "hnet.start": hnet_start,
        "precision": precision,
        "compile": compile_networks,
        "seed": seed,
        "device": device,
        "run_dir": run_dir,
        **operator_overrides(operator, factor, sigma, kernel, kernel_std, kernel_size, mask, param),
    }
    if measurement is not None and measurements_per_batch is not None and measurements_per_batch > 1:
        raise DeftError(
            "--measurements-per-batch sets M for amortised fine-tuning; "
            "with --measurement there is one, use --trajectories for K"
        )
    base = None
    if resume:
        folder = Path(run_dir) if run_dir else latest_run(holding=RESUME_STATE)
        base = read_saved_spec(folder / "spec.json")
        overrides["run_dir"] = str(folder)
    resolved = build_spec(FinetuneSpec, spec, overrides, base=base)
    summary = finetune(resolved, resume=resume, quiet=quiet, command=["deft", *sys.argv[1:]])
    print_json(summary)
    if summary["steps"] and summary["skipped_steps"] >= summary["steps"]:
        print(
            f"deft: warning: all {summary['steps']} steps were skipped "
            "(non-finite or filtered losses): the h-network is untrained",
            file=sys.stderr,
        )
    if summary["stopped_by"] == "interrupt":
        raise typer.Exit(130)


@app.command(
    "sample",
    # the help in one line: typer keeps a docstring's line breaks in `deft --help`
    help="Posterior samples: sample_###.png, mean.png, std.png, summary.json "
    "(with --unconditional, prior samples: sample_###.png, grid.png, summary.json).",
)
def sample_cmd(
    measurement: Annotated[
        Optional[Path], typer.Argument(help="measurement image, .safetensors tensor, or a folder of them")
    ] = None,
    out: Annotated[Optional[str], typer.Option("-o", "--out", help="output folder")] = None,
    spec: SpecOpt = None,
    run: Annotated[
        Optional[str],
        typer.Option(
            "--run", "--run-dir", help="run folder (default: the latest under runs/); spell it --run-dir under torchrun"
        ),
    ] = None,
    prior: Annotated[
        Optional[str],
        typer.Option(
            "--prior",
            help="with --unconditional: the prior (default: the run's, else model_weights/petals32); "
            "with a run: where its prior now is, if it moved (the weights must match)",
        ),
    ] = None,
    unconditional: Annotated[
        bool, typer.Option("--unconditional", help="samples of the prior, no measurement")
    ] = False,
    n: Annotated[Optional[int], typer.Option("-n", help="samples per measurement (default 8)")] = None,
    steps: Annotated[
        Optional[int], typer.Option("--steps", help="time-grid points (default: the run's; 100 with --unconditional)")
    ] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="deft, dps, ddrm, diffpir, prior or dagger")] = None,
    dps_zeta: Annotated[Optional[float], typer.Option("--dps-zeta", help="DPS step size ζ (default 10)")] = None,
    diffpir_lambda: Annotated[Optional[float], typer.Option("--diffpir-lambda", help="DiffPIR's λ > 0 (0.25)")] = None,
    diffpir_zeta: Annotated[Optional[float], typer.Option("--diffpir-zeta", help="DiffPIR's ζ ∈ [0, 1] (1)")] = None,
    ddrm_eta: Annotated[Optional[float], typer.Option("--ddrm-eta", help="DDRM's η in [0, 1] (default 0.85)")] = None,
    ddrm_eta_b: Annotated[
        Optional[float], typer.Option("--ddrm-eta-b", help="DDRM's η_b in [0, 1] (default 1)")
    ] = None,
    guidance_scale: Annotated[
        Optional[float],
        typer.Option("--guidance-scale", help="deft: γ in s_θ + γ h (default: the run's tuned γ, else 1)"),
    ] = None,
    sampler: SamplerOpt = None,
    renoise_zeta: RenoiseZetaOpt = None,
    clip_x0: Annotated[
        Optional[bool], typer.Option("--clip-x0/--no-clip-x0", help="clip Tweedie x̂0 to [-1, 1] in the sampler")
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", help="samples drawn at once (default 16)")
    ] = None,
    precision: PrecisionOpt = None,
    compile_networks: CompileOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite existing outputs")] = False,
) -> None:
    from .sample import sample_command
    from .specs import SampleSpec, build_spec

    overrides = {
        "out": out,
        "run": run,
        "prior.path": prior,
        "unconditional": unconditional or None,
        "n": n,
        "steps": steps,
        "method": method,
        "dps_zeta": dps_zeta,
        "diffpir_lambda": diffpir_lambda,
        "diffpir_zeta": diffpir_zeta,
        "ddrm_eta": ddrm_eta,
        "ddrm_eta_b": ddrm_eta_b,
        "guidance_scale": guidance_scale,
        "sampler": sampler,
        "renoise_zeta": renoise_zeta,
        "clip_x0": clip_x0,
        "batch_size": batch_size,
        "precision": precision,
        "compile": compile_networks,
        "seed": seed,
        "device": device,
    }
    resolved = build_spec(SampleSpec, spec, overrides)
    print_json(sample_command(resolved, measurement, force))


@app.command("eval")
def eval_cmd(
    spec: SpecOpt = None,
    run: Annotated[
        Optional[str],
        typer.Option(
            "--run", "--run-dir", help="run folder (default: the latest under runs/); spell it --run-dir under torchrun"
        ),
    ] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="train, val or test (default val)")] = None,
    n: Annotated[
        Optional[int], typer.Option("--n", help="number of images, the first n of the split (default 64)")
    ] = None,
    k: Annotated[Optional[int], typer.Option("-k", help="samples per image (default 4)")] = None,
    methods: Annotated[
        Optional[str],
        typer.Option("--methods", help="comma-separated (default deft,dps,diffpir,ddrm,prior,dagger where possible)"),
    ] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="time-grid points (default: the run's)")] = None,
    dps_zeta: Annotated[
        Optional[float], typer.Option("--dps-zeta", help="DPS step size (default: chosen by a sweep on train images)")
    ] = None,
    diffpir_lambda: Annotated[Optional[float], typer.Option("--diffpir-lambda", help="DiffPIR's λ (swept)")] = None,
    diffpir_zeta: Annotated[Optional[float], typer.Option("--diffpir-zeta", help="DiffPIR's ζ (swept)")] = None,
    guidance_scale: Annotated[
        Optional[str],
        typer.Option(
            "--guidance-scale",
            help="deft's γ (default: the run's tuned γ, else 1), or 'sweep' to choose it on train images like ζ",
        ),
    ] = None,
    sampler: SamplerOpt = None,
    renoise_zeta: RenoiseZetaOpt = None,
    clip_x0: Annotated[
        Optional[bool],
        typer.Option("--clip-x0/--no-clip-x0", help="clip Tweedie x̂0 to [-1, 1] in every sampler (default off)"),
    ] = None,
    batch_size: Annotated[
        Optional[int], typer.Option("--batch-size", help="samples drawn at once (default 32)")
    ] = None,
    precision: PrecisionOpt = None,
    compile_networks: CompileOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    out: Annotated[
        Optional[str], typer.Option("-o", "--out", help="output folder (default: <run>/eval-<split>-<time>)")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="write into an existing output folder")] = False,
) -> None:
    """PSNR/SSIM, data residual, time and NFE on a split for the fine-tuned run and the baselines."""
    from .evaluate import evaluate
    from .specs import EvalSpec, build_spec

    method_list = None if methods is None else [m.strip() for m in methods.split(",") if m.strip()]
    overrides = {
        "run": run,
        "split": split,
        "n": n,
        "k": k,
        "methods": method_list,
        "steps": steps,
        "dps_zeta": dps_zeta,
        "diffpir_lambda": diffpir_lambda,
        "diffpir_zeta": diffpir_zeta,
        "guidance_scale": guidance_scale,
        "sampler": sampler,
        "renoise_zeta": renoise_zeta,
        "clip_x0": clip_x0,
        "batch_size": batch_size,
        "precision": precision,
        "compile": compile_networks,
        "seed": seed,
        "device": device,
        "out": out,
    }
    print_json(evaluate(build_spec(EvalSpec, spec, overrides), force))


@check_app.command("gmm")
def check_gmm_cmd(
    shape: Annotated[
        Optional[str], typer.Option("--shape", help="C,H,W of the image-shaped mixture (default 1,8,8)")
    ] = None,
    components: Annotated[
        Optional[int], typer.Option("--components", help="K, an even number: pairs b ± n (default 4)")
    ] = None,
    operator: OperatorOpt = None,
    factor: FactorOpt = None,
    sigma: SigmaOpt = None,
    kernel: KernelOpt = None,
    kernel_std: KernelStdOpt = None,
    kernel_size: KernelSizeOpt = None,
    mask: MaskOpt = None,
    param: ParamOpt = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="per-measurement or amortised")] = None,
    iterations: Annotated[Optional[int], typer.Option("--iterations", help="gradient steps (default 600)")] = None,
    time_steps: Annotated[
        Optional[int], typer.Option("--time-steps", help="N, points of the time grid (default 100)")
    ] = None,
    trajectories: Annotated[
        Optional[int], typer.Option("--trajectories", help="trajectories per batch (default 64)")
    ] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Adam learning rate (default 1e-3)")] = None,
    likelihood_weight: Annotated[
        Optional[float],
        typer.Option(
            "--likelihood-weight",
            help="w: fine-tune for p(x) p(y|x)^w and compare with that exact tempered posterior (default 1)",
        ),
    ] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", help="samples per method (default 2000)")] = None,
    precision: PrecisionOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    run_dir: Annotated[
        Optional[str], typer.Option("--run-dir", help="keep the fine-tuning run here (default: a temporary folder)")
    ] = None,
) -> None:
    """Fine-tune against an analytic Gaussian-mixture posterior and compare deft and DPS with exact samples (JSON)."""
    from .check_gmm import GMMCheckSpec, check_gmm
    from .specs import build_spec

    overrides = {
        "shape": parse_ints(shape, "--shape", length=3),
        "components": components,
        "mode": mode,
        "iterations": iterations,
        "time_steps": time_steps,
        "trajectories": trajectories,
        "lr": lr,
        "likelihood_weight": likelihood_weight,
        "samples": samples,
        "precision": precision,
        "seed": seed,
        "device": device,
        "run_dir": run_dir,
        **operator_overrides(operator, factor, sigma, kernel, kernel_std, kernel_size, mask, param),
    }
    print_json(check_gmm(build_spec(GMMCheckSpec, None, overrides)))


def parse_ints(text: str | None, flag: str, length: int | None = None) -> list[int] | None:
    """Comma-separated positive integers (channel multipliers, C,H,W), ``length`` of them when given."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DeftError(f"{flag} expects comma-separated integers, got '{text}'") from None
    if not values or any(v < 1 for v in values) or (length is not None and len(values) != length):
        count = f"{length} " if length is not None else ""
        raise DeftError(f"{flag} expects {count}comma-separated positive integers, got '{text}'")
    return values


# ---------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user errors become one line on stderr and exit code 2, an interrupt exit code 130."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    command = typer.main.get_command(app)
    try:
        with InterruptWins():
            code = command.main(args=args, prog_name="deft", standalone_mode=False)
    except DeftError as exc:
        if debug:
            raise
        print(f"deft: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except USAGE_ERRORS as exc:
        if debug:
            raise
        message = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
        if message:  # empty when no command was given: the help has been shown, there is nothing to add
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            print(f"deft: error: {message}{hint}", file=sys.stderr)
        sys.exit(2)
    except ABORTS:
        print("deft: aborted", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as exc:  # torch.OutOfMemoryError is one too
        if debug or not any(words in str(exc) for words in ("can't allocate memory", "out of memory")):
            raise
        print(f"deft: error: not enough memory for these sizes ({str(exc).splitlines()[0][:160]})", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)
