"""`deft pretrain`: a prior folder that loads, exact resume, EMA warm-up, no overwriting."""

import json
import os
import signal

import pytest
import torch
from conftest import assert_user_error

from deftcli.errors import DeftError
from deftcli.pretrain import exponential_moving_average, pretrain
from deftcli.priors import load_prior
from deftcli.specs import PretrainSpec, build_spec


def tiny_spec(out, **extra) -> PretrainSpec:
    overrides = {
        "image_size": 16,
        "unet.model_channels": 8,
        "unet.channel_mult": [1, 2],
        "iterations": 4,
        "batch_size": 4,
        "sample_every": 4,
        "sample_steps": 3,
        "checkpoint_every": 1,
        "warmup": 2,
        "out": str(out),
        **extra,
    }
    return build_spec(PretrainSpec, overrides=overrides)


def losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_writes_a_loadable_prior_with_its_training_record(tmp_path):
    summary = pretrain(tiny_spec(tmp_path / "p"), quiet=True, command=["deft", "pretrain", "--tiny"])
    assert summary["steps"] == 4 and summary["val_dsm_loss"] > 0
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["training"]["steps"] == 4 and config["training"]["commands"] == ["deft pretrain --tiny"]
    assert config["training"]["val_dsm_loss"] == summary["val_dsm_loss"]
    assert (tmp_path / "p" / "samples" / "step_0000004.png").exists()
    prior = load_prior(tmp_path / "p")
    assert prior.image_shape == (3, 16, 16) and prior.name == "p"


def test_pretrain_resume_gives_the_same_loss_curve(tmp_path, monkeypatch):
    pretrain(tiny_spec(tmp_path / "straight"), quiet=True)
    import deftcli.pretrain as module

    original = module.dsm_loss
    calls = {"n": 0}

    def loss_then_sigint(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "dsm_loss", loss_then_sigint)
    summary = pretrain(tiny_spec(tmp_path / "resumed"), quiet=True)
    assert summary["interrupted"] and summary["steps"] == 2
    monkeypatch.setattr(module, "dsm_loss", original)
    pretrain(tiny_spec(tmp_path / "resumed"), resume=True, quiet=True, command=["deft", "pretrain", "--resume"])
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    commands = json.loads((tmp_path / "resumed" / "config.json").read_text())["training"]["commands"]
    assert len(commands) == 2 and commands[-1] == "deft pretrain --resume"


def test_resuming_with_a_time_budget_already_spent_is_a_user_error_that_keeps_the_run(tmp_path):
    out = tmp_path / "run"
    pretrain(tiny_spec(out), quiet=True)
    before = {
        name: (out / name).read_bytes() for name in ("model.safetensors", "spec.json", "config.json", "metrics.jsonl")
    }
    with pytest.raises(DeftError, match="already spent"):
        pretrain(tiny_spec(out, iterations=6, max_minutes=1e-6), resume=True, quiet=True)
    assert {name: (out / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("change", [{"image_size": 8}, {"unet.model_channels": 16}, {"parametrisation": "plain"}])
def test_resuming_may_not_change_the_network_or_the_images_and_keeps_the_run(tmp_path, change):
    out = tmp_path / "run"
    pretrain(tiny_spec(out), quiet=True)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(DeftError, match="--resume cannot change the prior's"):
        pretrain(tiny_spec(out, iterations=6, **change), resume=True, quiet=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_failed_start_leaves_no_half_made_prior_folder(tmp_path, monkeypatch):
    import deftcli.pretrain as module

    def unreadable(*args, **kwargs):
        raise DeftError("an image of the data set cannot be read")

    monkeypatch.setattr(module, "dsm_loss", unreadable)  # fails at the first step, after the folder was made
    with pytest.raises(DeftError, match="cannot be read"):
        pretrain(tiny_spec(tmp_path / "p"), quiet=True)
    assert not (tmp_path / "p").exists()
    (tmp_path / "q").mkdir()
    with pytest.raises(DeftError, match="cannot be read"):
        pretrain(tiny_spec(tmp_path / "q"), quiet=True)
    assert (tmp_path / "q").is_dir() and not any(
        (tmp_path / "q").iterdir()
    )  # the user's empty folder stays, emptied again
    monkeypatch.undo()
    assert pretrain(tiny_spec(tmp_path / "q"), quiet=True)["steps"] == 4  # so a retry is not blocked


def test_ema_warm_up_follows_the_raw_weights_early():
    model = torch.nn.Linear(2, 2)
    ema = exponential_moving_average(model, decay=0.999)
    assert torch.equal(ema.module.weight, model.weight)  # it starts at the initial weights
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)  # d_0 = 1/10: the average moves 90 % of the way
    assert torch.allclose(ema.module.weight, model.weight - 0.1, atol=1e-6)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)  # d_1 = 2/11
    assert torch.allclose(ema.module.weight, model.weight - 2 / 11 * 1.1, atol=1e-6)


def test_pretrain_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "keep.txt").write_text("x")
    with pytest.raises(DeftError, match="not empty"):
        pretrain(tiny_spec(tmp_path / "p"), quiet=True)


def test_pretrain_cli_on_an_image_folder(run_cli, tmp_path):
    from deftcli.images import save_image
    from deftcli.petals import render_petals

    images = tmp_path / "imgs"
    for i, x in enumerate(render_petals("train", range(40), 24)):
        save_image(x, images / f"sub{i % 2}" / f"img_{i}.png")
    code, out, err = run_cli(
        "pretrain",
        "--dataset",
        "folder",
        "--data-root",
        str(images),
        "--image-size",
        "16",
        "--model-channels",
        "8",
        "--channel-mult",
        "1,2",
        "--iterations",
        "2",
        "--batch-size",
        "2",
        "--sample-every",
        "2",
        "--out",
        str(tmp_path / "fp"),
        "--quiet",
    )
    assert code == 0, err
    assert json.loads(out)["steps"] == 2 and load_prior(tmp_path / "fp").image_shape == (3, 16, 16)
    code, _, err = run_cli(
        "pretrain", "--dataset", "folder", "--data-root", str(tmp_path / "empty_missing"), "--out", str(tmp_path / "x")
    )
    assert_user_error(code, err, "no such folder")
