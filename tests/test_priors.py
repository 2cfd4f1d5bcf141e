"""Prior loading: deft's own folders, the original code's model.pt + report.yaml, Gaussian mixtures; bad input."""

import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_user_error, upstream, write_tiny_unet_prior
from safetensors.torch import load_file

from deftcli.errors import DeftError
from deftcli.gmm import GaussianMixturePrior
from deftcli.priors import UNetPrior, load_prior
from deftcli.sde import VPSDE
from deftcli.unet import UNet, UNetConfig


def original_format_folder(tmp_path, state, model_cfg):
    folder = tmp_path / "original"
    folder.mkdir()
    torch.save(state, folder / "model.pt")
    (folder / "report.yaml").write_text(
        yaml.safe_dump({"model": model_cfg, "diffusion": {"sde": "VPSDE", "beta_min": 0.1, "beta_max": 20}})
    )
    return folder


def test_own_folder_loads_with_identity_and_hash(tiny_prior):
    prior = load_prior(tiny_prior)
    assert isinstance(prior, UNetPrior) and prior.image_shape == (3, 16, 16) and prior.name == "tiny"
    ident = prior.identity()
    assert ident["format"] == "deft" and len(ident["sha256"]) == 64
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 0.9])
    assert prior.score(x, t).shape == x.shape


def test_original_format_loads_a_gpu_saved_state_dict_on_cpu(tmp_path):
    """cond_model.pt was saved on CUDA; as a UNet folder in the original format it loads on CPU, strictly."""
    report = yaml.safe_load(upstream("cond_weights_rtb/report.yaml").read_text())
    folder = tmp_path / "orig"
    folder.mkdir()
    shutil.copy(upstream("cond_weights_rtb/cond_model.pt"), folder / "model.pt")
    (folder / "report.yaml").write_text(
        yaml.safe_dump({"model": report["model"], "diffusion": {"sde": "VPSDE", "beta_min": 0.1, "beta_max": 20}})
    )
    prior = load_prior(folder)
    assert prior.identity()["format"] == "original" and prior.image_shape == (3, 64, 64)
    ref = load_file(Path(__file__).parent / "data" / "original_cond_model_reference.safetensors")
    with torch.no_grad():
        assert torch.allclose(prior.score(ref["x"], ref["t"]), ref["unet_out"], rtol=1e-4, atol=1e-5)


def test_original_format_round_trip_with_a_small_config(tmp_path):
    cfg = {
        "in_channels": 3,
        "out_channels": 3,
        "model_channels": 8,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "attention_resolutions": [],
        "max_period": 0.005,
    }
    unet = UNet(UNetConfig(**cfg, norm_groups=8), VPSDE().sigma)
    folder = original_format_folder(tmp_path, unet.state_dict(), {**cfg, "norm_groups": 8})
    prior = load_prior(folder)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([0.5])
    with torch.no_grad():
        assert torch.equal(prior.score(x, t), unet(x, t))


def test_gaussian_mixture_folder_loads(tmp_path, gmm_problem):
    prior = load_prior(gmm_problem["prior_dir"])
    assert isinstance(prior, GaussianMixturePrior)
    assert torch.allclose(prior.means, gmm_problem["prior"].means)


def test_the_default_prior_is_the_shipped_one():
    prior = load_prior()
    assert prior.name == "petals32" and prior.image_shape == (3, 32, 32)


class Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned_by_pickle",))


def test_a_pickle_that_would_run_code_is_refused_and_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "evil"
    folder.mkdir()
    with open(folder / "model.pt", "wb") as f:
        pickle.dump({"weight": Exploit()}, f)
    (folder / "report.yaml").write_text(yaml.safe_dump({"model": {"model_channels": 8}, "diffusion": {}}))
    with pytest.raises(DeftError, match="refused"):
        load_prior(folder)
    assert not (tmp_path / "pwned_by_pickle").exists()


def test_mismatched_keys_name_the_first_missing_and_unexpected(tmp_path):
    cfg = {"in_channels": 3, "out_channels": 3, "model_channels": 8, "channel_mult": [1, 2], "norm_groups": 8}
    state = UNet(UNetConfig(**cfg), None).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["out.2.bias"]
    folder = original_format_folder(tmp_path, state, cfg)
    with pytest.raises(DeftError, match=r"missing keys \['out.2.bias'\].*unexpected keys \['extra.weight'\]"):
        load_prior(folder)


def test_bad_prior_folders_are_one_line_cli_errors(run_cli, tmp_path):
    good = write_tiny_unet_prior(tmp_path / "good")
    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage"
    shutil.copytree(good, garbage)
    (garbage / "model.safetensors").write_bytes(b"\x00" * 64)
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "config.json").write_text("{}")
    wrong_format = tmp_path / "wrong"
    wrong_format.mkdir()
    (wrong_format / "weights.bin").write_bytes(b"1234")
    for folder, needle in (
        (truncated, "truncated"),
        (garbage, "corrupt"),
        (missing, "format"),
        (wrong_format, "unrecognised"),
        (tmp_path / "nope", "no such"),
    ):
        code, _, err = run_cli(
            "sample", "--unconditional", "-n", "1", "--prior", str(folder), "-o", str(tmp_path / "out")
        )
        assert_user_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_unconditional_samples_from_the_cli(run_cli, tiny_prior, tmp_path):
    code, out, err = run_cli(
        "sample", "--unconditional", "-n", "3", "--steps", "4", "--prior", str(tiny_prior), "-o", str(tmp_path / "u")
    )
    assert code == 0, err
    assert (
        all((tmp_path / "u" / f"sample_{i:03d}.png").exists() for i in range(3))
        and (tmp_path / "u" / "grid.png").exists()
    )


def test_a_unet_prior_runs_channels_last_on_the_cpu_only_and_scores_the_same_either_way(tiny_prior):
    prior = load_prior(str(tiny_prior))
    convs = [m.weight for m in prior.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)  # (a 1×1 kernel's strides are the same in both layouts)
    x, t = torch.randn(2, *prior.image_shape, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        score = prior.score(x, t)
        prior.unet.to(memory_format=torch.contiguous_format)
        torch.testing.assert_close(prior.score(x, t), score, rtol=1e-5, atol=1e-5)
    prior.double()  # any _apply (.to, .double, .cuda) restores the device's layout
    assert all(
        m.weight.is_contiguous(memory_format=torch.channels_last)
        for m in prior.unet.modules()
        if isinstance(m, torch.nn.Conv2d)
    )
    prior.to("meta")  # not the CPU: contiguous
    assert all(m.weight.is_contiguous() for m in prior.unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert not all(
        m.weight.is_contiguous(memory_format=torch.channels_last)
        for m in prior.unet.modules()
        if isinstance(m, torch.nn.Conv2d)
    )
