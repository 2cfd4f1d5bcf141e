"""Diffusers priors (the optional extra): layouts, the t → timestep mapping, the score against the diffusers
UNet and scheduler themselves, errors, lazy import, and the sampler. Tiny random UNets, offline."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deftcli.errors import DeftError
from deftcli.priors import load_prior
from deftcli.samplers import GeneratorNoise, sample_reverse_sde
from deftcli.sde import reverse_time_grid

diffusers = pytest.importorskip("diffusers")

SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": False,
}


def tiny_unet(out_channels: int = 1, seed: int = 0) -> "diffusers.UNet2DModel":
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=out_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


def save(folder: Path, unet: "diffusers.UNet2DModel", pipeline: bool, **scheduler_kwargs) -> Path:
    """Write ``unet`` + a DDPMScheduler as a DDPMPipeline folder or as bare unet/ + scheduler/."""
    scheduler = diffusers.DDPMScheduler(**{**SCHEDULE, **scheduler_kwargs})
    if pipeline:
        diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    else:
        unet.save_pretrained(folder / "unet")
        scheduler.save_pretrained(folder / "scheduler")
    return folder


def t_at_timestep(k: int, alphas_cumprod: torch.Tensor, beta_min: float, beta_max: float) -> float:
    """The t where the VP-SDE's α(t)² = ᾱ_k: solve ½(β1 − β0) t² + β0 t = −log ᾱ_k."""
    u = -math.log(float(alphas_cumprod[k]))
    return (-beta_min + math.sqrt(beta_min**2 + 2 * (beta_max - beta_min) * u)) / (beta_max - beta_min)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions run fastest on one thread (and do not stall behind a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def saved(unet, tmp_path_factory) -> Path:
    return save(tmp_path_factory.mktemp("ddpm") / "pipe", unet, pipeline=True)


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipeline", "unet+scheduler"])
def test_loads_both_layouts_and_score_is_minus_eps_over_sigma(unet, tmp_path, pipeline):
    folder = save(tmp_path / "prior", unet, pipeline)
    assert (folder / "model_index.json").exists() == pipeline
    prior = load_prior(folder)
    assert (prior.sde.beta_min, prior.sde.beta_max) == (pytest.approx(0.1, rel=1e-6), pytest.approx(20.0, rel=1e-6))
    assert prior.image_shape == (1, 8, 8)
    ident = prior.identity()
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert ident["name"] == "prior" and ident["format"] == "diffusers" and ident["path"] == str(folder)
    assert ident["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()

    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1e-3, 0.37, 1.0])
    tau = prior.timestep(t)
    with torch.no_grad():
        eps = unet(x, tau).sample
        assert torch.allclose(prior.score(x, t), -eps / prior.sde.sigma(t).view(-1, 1, 1, 1), rtol=1e-5, atol=1e-5)
        # a scalar t is broadcast over the batch
        assert torch.allclose(prior.score(x, t[1]), prior.score(x, t[1].expand(3)))


def test_timestep_mapping_matches_alpha_bar(saved):
    prior = load_prior(saved)
    alphas_cumprod = diffusers.DDPMScheduler(**SCHEDULE).alphas_cumprod.double()
    t = torch.linspace(1e-3, 1.0, 2001)
    tau = prior.timestep(t).double()
    # ᾱ at a float timestep: linear interpolation of log ᾱ_k (an independent implementation)
    alpha_bar = np.exp(np.interp(tau.numpy(), np.arange(1000), alphas_cumprod.log().numpy()))
    alpha2 = prior.sde.alpha(t.double()) ** 2
    assert np.abs(alpha_bar - alpha2.numpy()).max() < 2e-7  # documented: 8.9e-8
    assert (tau - (t.double() * 1000 - 1)).abs().max() < 3.5  # documented: within 3.4 steps of t·T − 1
    assert prior.timestep(torch.tensor([0.0, 1e-5])).tolist() == [0.0, 0.0]
    ks = [1, 10, 250, 999]
    tk = torch.tensor([t_at_timestep(k, alphas_cumprod, prior.sde.beta_min, prior.sde.beta_max) for k in ks])
    assert prior.timestep(tk).tolist() == pytest.approx(ks, abs=1e-3)


@pytest.mark.parametrize(
    "prediction_type, out_channels, variance_type",
    [
        ("epsilon", 1, "fixed_small"),
        ("sample", 1, "fixed_small"),
        ("v_prediction", 1, "fixed_small"),
        ("epsilon", 2, "learned_range"),
    ],
)
def test_tweedie_equals_the_schedulers_own_x0(tmp_path, prediction_type, out_channels, variance_type):
    """At t where τ(t) is an integer k, the prior's Tweedie x̂0 = (x + σ² s)/α is DDPMScheduler.step's x̂0."""
    net = tiny_unet(out_channels, seed=2)
    folder = save(tmp_path / "prior", net, pipeline=False, prediction_type=prediction_type, variance_type=variance_type)
    prior = load_prior(folder)
    scheduler = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    for k in (20, 400, 900):
        t = torch.full(
            (2,), t_at_timestep(k, scheduler.alphas_cumprod.double(), prior.sde.beta_min, prior.sde.beta_max)
        )
        with torch.no_grad():
            x0 = prior.sde.tweedie_x0(x, prior.score(x, t), t)
            reference = scheduler.step(
                net(x, k).sample, k, x, generator=torch.Generator().manual_seed(0)
            ).pred_original_sample
        assert torch.allclose(x0, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item()), (
            k,
            (x0 - reference).abs().max(),
        )


def edit_json(path: Path, **changes) -> None:
    """Update a JSON config; a value of ``...`` deletes the key."""
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))


@pytest.mark.parametrize(
    "file, changes, needles",
    [
        ("scheduler/scheduler_config.json", {"prediction_type": "flow"}, ["prediction_type 'flow'", "v_prediction"]),
        (
            "scheduler/scheduler_config.json",
            {"beta_schedule": "squaredcos_cap_v2"},
            ["'squaredcos_cap_v2'", "not linear"],
        ),
        ("scheduler/scheduler_config.json", {"beta_schedule": "scaled_linear"}, ["'scaled_linear'", "not linear"]),
        ("scheduler/scheduler_config.json", {"beta_schedule": "cubic"}, ["unsupported beta schedule 'cubic'"]),
        ("scheduler/scheduler_config.json", {"num_train_timesteps": ...}, ["not a DDPM-like scheduler"]),
        ("unet/config.json", {"_class_name": "UNet2DConditionModel"}, ["UNet2DModel", "UNet2DConditionModel"]),
        ("unet/config.json", {"num_class_embeds": 10}, ["class-conditional"]),
        ("unet/config.json", {"out_channels": 2}, ["out_channels 2"]),
    ],
    ids=[
        "prediction",
        "cosine",
        "scaled_linear",
        "unknown-schedule",
        "not-ddpm",
        "conditional",
        "class-conditional",
        "channels",
    ],
)
def test_unsupported_folders_are_one_line_errors(saved, tmp_path, file, changes, needles):
    folder = shutil.copytree(saved, tmp_path / "prior")
    edit_json(folder / file, **changes)
    with pytest.raises(DeftError) as info:
        load_prior(folder)
    message = str(info.value)
    assert "\n" not in message and str(folder) in message
    for needle in needles:
        assert needle in message


def test_corrupt_or_missing_unet_is_a_one_line_error(saved, tmp_path):
    folder = shutil.copytree(saved, tmp_path / "prior")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(DeftError, match="cannot load the UNet2DModel"):
        load_prior(folder)
    weights.unlink()
    with pytest.raises(DeftError, match="no weights file"):
        load_prior(folder)
    shutil.rmtree(folder / "unet")
    with pytest.raises(DeftError, match="unet/ is missing"):
        load_prior(folder)


def test_without_diffusers_installed_the_error_names_the_extra(saved, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(DeftError, match=r"pip install 'deft\[diffusers\]'"):
        load_prior(saved)


def test_other_priors_never_import_diffusers(tiny_prior):
    code = (
        "import sys, torch, deftcli, deftcli.priors, deftcli.diffusers_prior\n"
        "torch.set_num_threads(1)\n"
        f"p = deftcli.priors.load_prior({str(tiny_prior)!r})\n"
        "p.score(torch.zeros(1, *p.image_shape), torch.tensor([0.5]))\n"
        "assert 'diffusers' not in sys.modules, 'diffusers was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_plugs_into_the_reverse_sde_sampler(saved):
    prior = load_prior(saved)
    x = torch.randn(2, *prior.image_shape, generator=torch.Generator().manual_seed(4))
    out = sample_reverse_sde(
        prior.score, prior.sde, x, reverse_time_grid(5), GeneratorNoise(torch.Generator().manual_seed(5))
    )
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
