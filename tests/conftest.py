"""Shared fixtures: paths to the upstream files, tiny priors, a CLI runner that returns (code, out, err), and the
command-line tests' assets (a tiny prior, two runs, images) with a snapshot of the files under them."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "upstream"

# Tiny tensors gain nothing from threads, and oversubscribed OpenMP threads are very slow on a busy 2-core machine.
torch.set_num_threads(1)


def upstream(path: str) -> Path:
    """A file of ../shared/upstream, or skip the test when the shared folder is absent."""
    p = SHARED / path
    if not p.exists():
        pytest.skip(f"{p} not available (../shared/upstream is absent in this checkout)")
    return p


@pytest.fixture
def run_cli(capsys):
    """Run `deft ARGS` in-process through the real entry point; returns (exit code, stdout, stderr)."""
    from deftcli.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def assert_user_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2, exactly one line on stderr, no traceback, and the line names the problem."""
    assert code == 2, f"exit code {code}, stderr: {err}"
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"


@pytest.fixture
def python() -> str:
    return sys.executable


def write_tiny_unet_prior(folder: Path, size: int = 16, channels: int = 3) -> Path:
    """A randomly initialised 8-channel UNet prior in deft's own format (fast, meaningless)."""
    from deftcli.checkpoint import save_weights, write_json
    from deftcli.sde import VPSDE
    from deftcli.unet import UNet, UNetConfig

    config = UNetConfig(
        in_channels=channels, out_channels=channels, model_channels=8, channel_mult=(1, 2), norm_groups=8
    )
    gen = torch.Generator().manual_seed(0)
    unet = UNet(config, VPSDE().sigma)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(unet.state_dict(), folder / "model.safetensors")
    write_json(
        {
            "format": "deft-unet-prior",
            "name": "tiny",
            "image_shape": [channels, size, size],
            "sde": {"beta_min": 0.1, "beta_max": 20.0},
            "unet": config.model_dump(mode="json"),
        },
        folder / "config.json",
    )
    return folder


@pytest.fixture
def tiny_prior(tmp_path) -> Path:
    return write_tiny_unet_prior(tmp_path / "tiny_prior")


@pytest.fixture
def gmm_problem(tmp_path):
    """A 1×8×8 Gaussian-mixture prior saved as a folder, 2× super-resolution, and one measurement file."""
    from deftcli.gmm import hard_mixture
    from deftcli.images import save_image
    from deftcli.operators import create

    op = create("superres", factor=2, sigma=0.1)
    prior = hard_mixture(op, (1, 8, 8), generator=torch.Generator().manual_seed(0))
    prior.save(tmp_path / "gmm_prior")
    gen = torch.Generator().manual_seed(1)
    x = prior.sample(1, gen)
    y = op.measure(x, generator=gen)
    save_image(y[0], tmp_path / "y.safetensors")
    return {
        "prior": prior,
        "operator": op,
        "x": x,
        "y": y,
        "prior_dir": tmp_path / "gmm_prior",
        "y_path": tmp_path / "y.safetensors",
    }


TINY_HNET = {"hnet.model_channels": 8, "hnet.channel_mult": [1], "hnet.time_embedding_dim": 16, "hnet.time_hidden": 16}


# ------------------------------------------------------------------ the command-line tests' shared assets


@dataclass(frozen=True)
class Assets:
    root: Path
    prior: Path  # 16×16 RGB UNet prior, deft format
    run: Path  # fine-tuned on `prior`, superres ×2, h-net 8 channels [1]
    other_run: Path  # same prior and operator, h-net 16 channels [1, 2]
    flower: Path  # 32×32 RGB png
    y: Path  # a valid 8×8 RGB measurement png for `run`


def _finetune(prior: Path, run_dir: Path, **hnet) -> None:
    from deftcli.finetune import finetune
    from deftcli.specs import FinetuneSpec, build_spec

    overrides = {
        "prior.path": str(prior),
        "operator.params": {"factor": 2, "sigma": 0.1},
        "iterations": 1,
        "time_steps": 3,
        "measurements_per_batch": 1,
        "trajectories": 2,
        "run_dir": str(run_dir),
        "device": "cpu",
        **TINY_HNET,
        **hnet,
    }
    finetune(build_spec(FinetuneSpec, overrides=overrides), quiet=True)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    root = tmp_path_factory.mktemp("assets")
    prior = write_tiny_unet_prior(root / "prior", size=16)
    _finetune(prior, root / "run")
    _finetune(prior, root / "other_run", **{"hnet.model_channels": 16, "hnet.channel_mult": [1, 2]})
    rng = np.random.default_rng(0)
    flower = root / "flower.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB").save(flower)
    y = root / "y.png"
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").save(y)
    return Assets(root, prior, root / "run", root / "other_run", flower, y)


def snapshot(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under the roots."""
    files = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                files[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files
