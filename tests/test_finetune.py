"""`deft finetune`: run folder, exact resume, SIGINT, NaN handling, and the CLI end to end on tiny problems."""

import json
import os
import signal

import pytest
import torch
from conftest import TINY_HNET, assert_user_error

from deftcli.errors import DeftError
from deftcli.finetune import Finetuner, TrainingDiverged, finetune
from deftcli.htransform import load_htransform
from deftcli.images import read_measurement, save_image
from deftcli.operators import create
from deftcli.priors import load_prior
from deftcli.specs import FinetuneSpec, build_spec
from deftcli.tuning import with_tuned_defaults


def gmm_spec(problem, run_dir, **extra) -> FinetuneSpec:
    overrides = {
        "prior.path": str(problem["prior_dir"]),
        "operator.params": {"factor": 2, "sigma": 0.1},
        "measurement": str(problem["y_path"]),
        "iterations": 4,
        "time_steps": 8,
        "trajectories": 4,
        "run_dir": str(run_dir),
        "preview_every": 2,
        "checkpoint_every": 1,
        "lr": 1e-3,
        **TINY_HNET,
    }
    overrides.update(extra)
    return build_spec(FinetuneSpec, overrides=overrides)


def metric_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_folder_holds_spec_info_checkpoints_metrics_and_preview(gmm_problem, tmp_path):
    run_dir = tmp_path / "run"
    summary = finetune(gmm_spec(gmm_problem, run_dir), quiet=True)
    assert summary["steps"] == 4
    for name in (
        "spec.json",
        "run.json",
        "hnet_last.safetensors",
        "hnet_best.safetensors",
        "state_last.safetensors",
        "metrics.jsonl",
        "preview.png",
        "measurement.safetensors",
    ):
        assert (run_dir / name).exists(), name
    info = json.loads((run_dir / "run.json").read_text())
    assert info["mode"] == "per-measurement" and info["prior"]["format"] == "gaussian-mixture"
    assert {"torch", "deft", "python"} <= set(info["versions"])
    lines = metric_lines(run_dir)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert {"loss", "J", "D", "KL", "filtered", "lr", "seconds"} <= set(lines[0])
    htransform, meta = load_htransform(run_dir / "hnet_last.safetensors", load_prior(gmm_problem["prior_dir"]))
    assert meta["step"] == 4 and htransform.num_parameters() > 0


def test_resume_continues_exactly_like_an_uninterrupted_run(gmm_problem, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    finetune(gmm_spec(gmm_problem, straight), quiet=True)

    interrupted = tmp_path / "interrupted"
    original_step = Finetuner.step

    def step_then_sigint_at_two(self):
        result = original_step(self)
        if self.step_count == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: the loop saves and stops
        return result

    monkeypatch.setattr(Finetuner, "step", step_then_sigint_at_two)
    summary = finetune(gmm_spec(gmm_problem, interrupted), quiet=True)
    assert summary["stopped_by"] == "interrupt" and summary["steps"] == 2
    monkeypatch.setattr(Finetuner, "step", original_step)
    finetune(gmm_spec(gmm_problem, interrupted), resume=True, quiet=True)

    a, b = metric_lines(straight), metric_lines(interrupted)
    assert [line["step"] for line in b] == [1, 2, 3, 4]
    for key in ("loss", "J", "D", "KL", "lr"):
        assert [line[key] for line in a] == [line[key] for line in b], key
    for key in ("J_smooth", "skipped_total"):
        assert [line[key] for line in a] == [line[key] for line in b], key
    for name in ("hnet_last.safetensors", "hnet_best.safetensors"):  # the best-J bookkeeping resumes too
        sa = load_htransform(straight / name, gmm_problem["prior"])[0].state_dict()
        sb = load_htransform(interrupted / name, gmm_problem["prior"])[0].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_a_time_budget_stops_and_saves_and_counts_every_leg_of_a_resumed_run(gmm_problem, tmp_path):
    run_dir = tmp_path / "run"
    first = finetune(gmm_spec(gmm_problem, run_dir, max_minutes=1e-6), quiet=True)
    assert first["stopped_by"] == "max_minutes" and first["steps"] == 1
    files = (
        "hnet_last.safetensors",
        "hnet_best.safetensors",
        "state_last.safetensors",
        "metrics.jsonl",
        "spec.json",
        "run.json",
    )
    before = {name: (run_dir / name).read_bytes() for name in files}
    with pytest.raises(DeftError, match="already spent"):  # a per-leg budget would train one more step
        finetune(gmm_spec(gmm_problem, run_dir, max_minutes=1e-6), resume=True, quiet=True)
    assert {name: (run_dir / name).read_bytes() for name in files} == before
    rest = finetune(gmm_spec(gmm_problem, run_dir, max_minutes=60), resume=True, quiet=True)
    assert rest["stopped_by"] == "iterations" and rest["steps"] == 4
    assert [line["step"] for line in metric_lines(run_dir)] == [1, 2, 3, 4]


def test_a_resumed_leg_may_change_the_schedule_and_is_recorded(gmm_problem, tmp_path):
    run_dir = tmp_path / "run"
    finetune(gmm_spec(gmm_problem, run_dir, iterations=2), quiet=True)
    summary = finetune(
        gmm_spec(gmm_problem, run_dir, iterations=3, lr=2e-3),
        resume=True,
        quiet=True,
        command=["deft", "finetune", "--resume"],
    )
    assert summary["steps"] == 3
    spec = json.loads((run_dir / "spec.json").read_text())
    assert (spec["iterations"], spec["lr"]) == (
        3,
        2e-3,
    )  # what `deft eval` and a later --resume read is the last leg's spec
    assert json.loads((run_dir / "run.json").read_text())["resumed"][0] | {"started": None} == {
        "command": "deft finetune --resume",
        "started": None,
        "at_step": 2,
    }


def test_a_resumed_leg_may_not_change_the_measurement(gmm_problem, tmp_path):
    run_dir = tmp_path / "run"
    finetune(gmm_spec(gmm_problem, run_dir, iterations=2), quiet=True)
    other = tmp_path / "other_y.safetensors"
    save_image(read_measurement(gmm_problem["y_path"]) + 0.5, other)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(DeftError, match="cannot change the run's measurement"):
        finetune(gmm_spec(gmm_problem, run_dir, iterations=3, measurement=str(other)), resume=True, quiet=True)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_a_failed_start_leaves_no_half_made_run_folder(gmm_problem, tmp_path, monkeypatch):
    def unreadable(self):
        raise DeftError("an image of the data set cannot be read")

    monkeypatch.setattr(
        Finetuner, "step", unreadable
    )  # fails at the first step, after spec.json and run.json were written
    with pytest.raises(DeftError, match="cannot be read"):
        finetune(gmm_spec(gmm_problem, tmp_path / "run"), quiet=True)
    assert not (tmp_path / "run").exists()  # so the same command can be run again, and `deft sample` finds no stub


def test_an_amortised_batch_holds_m_measurements_each_repeated_for_its_k_trajectories(gmm_problem, tmp_path):
    from deftcli.data import MeasurementSource
    from deftcli.distributed import Distributed

    spec = gmm_spec(gmm_problem, tmp_path / "run", measurement=None, measurements_per_batch=3, trajectories=2)
    batch = MeasurementSource(spec, gmm_problem["prior"], gmm_problem["operator"], torch.device("cpu")).draw(
        torch.Generator().manual_seed(0), Distributed()
    )
    assert batch.groups.tolist() == [0, 0, 1, 1, 2, 2]  # the variance is taken within these groups, never across y
    assert torch.equal(batch.y, batch.y_unique.repeat_interleave(2, dim=0))
    assert all(not torch.equal(batch.y_unique[i], batch.y_unique[j]) for i, j in ((0, 1), (0, 2), (1, 2)))
    torch.testing.assert_close(
        gmm_problem["operator"].A(batch.x_true), batch.y_unique, atol=0.5, rtol=0
    )  # y = A x + σ noise


def test_a_diverging_run_ends_with_exit_code_1_and_one_line_from_the_command_line(
    run_cli, gmm_problem, tmp_path, monkeypatch
):
    monkeypatch.setattr(type(gmm_problem["prior"]), "score", lambda self, x, t: torch.full_like(x, float("nan")))
    (tmp_path / "spec.yaml").write_text("max_bad_steps: 2\n")
    code, _, err = run_cli(
        "finetune",
        "--spec",
        str(tmp_path / "spec.yaml"),
        "--prior",
        str(gmm_problem["prior_dir"]),
        "--measurement",
        str(gmm_problem["y_path"]),
        "--factor",
        "2",
        "--sigma",
        "0.1",
        "--iterations",
        "5",
        "--time-steps",
        "4",
        "--trajectories",
        "2",
        "--hnet-channels",
        "8",
        "--hnet-mult",
        "1",
        "--device",
        "cpu",
        "--run-dir",
        str(tmp_path / "run"),
        "--quiet",
    )
    assert code == 1  # not a user mistake (2): the training itself failed
    assert len(err.strip().splitlines()) == 1 and "2 skipped steps in a row" in err and "Traceback" not in err

    (tmp_path / "spec.yaml").write_text(
        "max_bad_steps: 20\n"
    )  # too few steps for the guard: the run ends, untrained, and says so
    code, _, err = run_cli(
        "finetune",
        "--spec",
        str(tmp_path / "spec.yaml"),
        "--prior",
        str(gmm_problem["prior_dir"]),
        "--measurement",
        str(gmm_problem["y_path"]),
        "--factor",
        "2",
        "--sigma",
        "0.1",
        "--iterations",
        "2",
        "--time-steps",
        "4",
        "--trajectories",
        "2",
        "--hnet-channels",
        "8",
        "--hnet-mult",
        "1",
        "--device",
        "cpu",
        "--run-dir",
        str(tmp_path / "run2"),
        "--quiet",
    )
    assert code == 0 and "warning: all 2 steps were skipped" in err


def test_the_default_loss_threshold_grows_with_the_number_of_measured_values(gmm_problem, tmp_path):
    from deftcli.finetune import default_loss_threshold

    assert default_loss_threshold((3, 8, 8)) == 5e4  # 4× super-resolution of 32×32: the original's 5e4
    assert default_loss_threshold((3, 32, 32)) == 5e4  # the original's own m = 3072
    assert default_loss_threshold((3, 64, 64)) == 2e5  # inpainting 64×64 measures 4× as many values
    assert (
        Finetuner(gmm_spec(gmm_problem, tmp_path / "a"), tmp_path / "a", resume=False, quiet=True).loss_threshold == 5e4
    )
    assert (
        Finetuner(
            gmm_spec(gmm_problem, tmp_path / "b", loss_threshold=123.0), tmp_path / "b", resume=False, quiet=True
        ).loss_threshold
        == 123.0
    )


@pytest.mark.parametrize("method", ["vargrad", "backprop"])
def test_a_likelihood_weight_multiplies_the_data_term_and_its_default_threshold(gmm_problem, tmp_path, method):
    run_dir = tmp_path / method
    trainer = Finetuner(
        gmm_spec(gmm_problem, run_dir, method=method, likelihood_weight=3.0), run_dir, resume=False, quiet=True
    )
    assert trainer.loss_threshold == 1.5e5 and trainer.htransform.config.likelihood_weight == 3.0
    record, batch, x_final = trainer.step()
    unweighted = (trainer.operator.A(x_final) - batch.y).flatten(1).pow(2).sum(1) / (2 * trainer.operator.sigma**2)
    assert record["filtered"] == 0 and record["D"] == pytest.approx(3.0 * float(unweighted.mean()), rel=1e-5)


def test_the_default_learning_rate_is_divided_by_the_likelihood_weight(gmm_problem, tmp_path):
    assert (
        FinetuneSpec(likelihood_weight=1.0).learning_rate() == 5e-4
        and FinetuneSpec(likelihood_weight=4.0).learning_rate() == 1.25e-4
    )
    assert FinetuneSpec(likelihood_weight=4.0, lr=1e-3).learning_rate() == 1e-3  # a given --lr is kept
    spec = gmm_spec(gmm_problem, tmp_path / "run", likelihood_weight=2.0).model_copy(update={"lr": None})
    cond_group, time_group = Finetuner(spec, tmp_path / "run", resume=False, quiet=True).optimizer.param_groups
    assert (cond_group["initial_lr"], time_group["initial_lr"]) == (2.5e-4, 2.5e-4 * spec.time_lr_factor)


def test_a_resumed_leg_may_not_change_the_likelihood_weight(gmm_problem, tmp_path):
    run_dir = tmp_path / "run"
    finetune(gmm_spec(gmm_problem, run_dir, iterations=2, likelihood_weight=2.0), quiet=True)
    assert (
        load_htransform(run_dir / "hnet_last.safetensors", load_prior(gmm_problem["prior_dir"]))[
            0
        ].config.likelihood_weight
        == 2.0
    )
    with pytest.raises(DeftError, match=r"likelihood weight \(2.0 → 1.0\)"):
        finetune(gmm_spec(gmm_problem, run_dir, iterations=3, likelihood_weight=1.0), resume=True, quiet=True)


def test_a_checkpoint_whose_h_network_differs_from_the_run_record_is_refused(gmm_problem, tmp_path):
    from deftcli.runs import open_run

    run_dir = tmp_path / "run"
    finetune(gmm_spec(gmm_problem, run_dir, iterations=1), quiet=True)
    assert open_run(run_dir, torch.device("cpu")).htransform.config.likelihood_weight == 1.0
    info = json.loads((run_dir / "run.json").read_text())
    info["htransform"]["config"]["likelihood_weight"] = 2.0
    (run_dir / "run.json").write_text(json.dumps(info))
    with pytest.raises(DeftError, match="likelihood_weight 1.0 vs 2.0"):
        open_run(run_dir, torch.device("cpu"))


def test_the_latest_run_is_the_newest_with_a_checkpoint(tmp_path):
    from deftcli.runs import latest_run

    started = {"older": 1_000, "newer": 2_000, "newest-without-checkpoint": 3_000}
    for name, when in started.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text("{}")
        os.utime(tmp_path / name / "run.json", (when, when))
        if "without" not in name:
            (tmp_path / name / "hnet_last.safetensors").write_text("")
    assert latest_run(tmp_path) == tmp_path / "newer"


def test_resume_finds_the_newest_run_with_a_resumable_state_even_without_its_h_network_checkpoint(tmp_path):
    """A kill between the first checkpoint's two files leaves the state a resume needs, and no h-network yet."""
    from deftcli.runs import RESUME_STATE, latest_run

    started = {"older": 1_000, "killed-in-its-first-checkpoint": 2_000, "newest-not-resumable": 3_000}
    for name, when in started.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text("{}")
        os.utime(tmp_path / name / "run.json", (when, when))
    (tmp_path / "older" / "state_last.safetensors").write_text("")
    (tmp_path / "older" / "hnet_last.safetensors").write_text("")
    (tmp_path / "killed-in-its-first-checkpoint" / "state_last.safetensors").write_text("")
    (tmp_path / "newest-not-resumable" / "hnet_last.safetensors").write_text("")
    assert latest_run(tmp_path, holding=RESUME_STATE) == tmp_path / "killed-in-its-first-checkpoint"
    assert latest_run(tmp_path) == tmp_path / "newest-not-resumable"
    with pytest.raises(DeftError, match="no run to resume"):
        latest_run(tmp_path / "older", holding=RESUME_STATE)


def test_non_finite_steps_are_skipped_and_counted_then_the_run_stops_with_its_checkpoint_intact(
    gmm_problem, tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"
    prior_cls = type(gmm_problem["prior"])
    original_score = prior_cls.score
    calls = {"n": 0}

    def score_that_breaks_after_two_iterations(self, x, t):
        calls["n"] += 1
        out = original_score(self, x, t)
        return out * float("nan") if calls["n"] > 2 * 7 else out  # 7 steps per iteration

    monkeypatch.setattr(prior_cls, "score", score_that_breaks_after_two_iterations)
    with pytest.raises(TrainingDiverged, match="skipped steps in a row") as info:
        finetune(gmm_spec(gmm_problem, run_dir, iterations=10, max_bad_steps=3), quiet=True)
    assert info.value.exit_code == 1
    lines = metric_lines(run_dir)
    assert [line["skipped"] for line in lines] == [False, False, True, True, True]
    assert lines[-1]["skipped_total"] == 3 and lines[-1]["filtered"] == 4
    monkeypatch.setattr(prior_cls, "score", original_score)
    _, meta = load_htransform(run_dir / "hnet_last.safetensors", gmm_problem["prior"])
    assert meta["step"] == 4  # written at the last step whose checkpoint_every came round, loadable


def test_existing_run_folder_is_not_overwritten(gmm_problem, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(DeftError, match="exists"):
        finetune(gmm_spec(gmm_problem, run_dir), quiet=True)
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_backprop_method_logs_J_as_its_loss(gmm_problem, tmp_path):
    summary = finetune(
        gmm_spec(gmm_problem, tmp_path / "bp", method="backprop", iterations=2, micro_batch=2), quiet=True
    )
    lines = metric_lines(tmp_path / "bp")
    assert summary["steps"] == 2 and all(line["loss"] == line["J"] for line in lines)


def test_cli_amortised_finetune_then_sample_and_eval_on_a_tiny_prior(run_cli, tiny_prior, tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(
        "finetune",
        "--prior",
        str(tiny_prior),
        "--operator",
        "superres",
        "--factor",
        "2",
        "--iterations",
        "3",
        "--time-steps",
        "5",
        "--measurements-per-batch",
        "2",
        "--trajectories",
        "2",
        "--hnet-channels",
        "8",
        "--hnet-mult",
        "1",
        "--likelihood-weight",
        "2",
        "--run-dir",
        str(run_dir),
        "--quiet",
    )
    assert code == 0, err
    assert json.loads(out)["steps"] == 3
    info = json.loads((run_dir / "run.json").read_text())
    assert info["mode"] == "amortised"
    # a measurement of the right size samples; a folder of measurements too
    from deftcli.images import save_image
    from deftcli.petals import render_petals

    y = torch.nn.functional.avg_pool2d(render_petals("val", [0, 1], 16), 2)
    (tmp_path / "ys").mkdir()
    save_image(y[0], tmp_path / "ys" / "a.png")
    save_image(y[1], tmp_path / "ys" / "b.safetensors")
    code, out, err = run_cli(
        "sample", str(tmp_path / "ys" / "a.png"), "--run", str(run_dir), "-n", "3", "-o", str(tmp_path / "s1")
    )
    assert code == 0, err
    for name in ("sample_000.png", "sample_002.png", "mean.png", "std.png", "summary.json"):
        assert (tmp_path / "s1" / name).exists()
    summary = json.loads((tmp_path / "s1" / "summary.json").read_text())
    assert len(summary["data_residual"]) == 3 and summary["nfe_prior"] == 5 and summary["nfe_hnet"] == 5
    assert (summary["guidance_scale"], summary["likelihood_weight"]) == (
        1.0,
        2.0,
    )  # the run's tempered likelihood, on the record
    code, _, err = run_cli("sample", str(tmp_path / "ys"), "--run", str(run_dir), "-n", "2", "-o", str(tmp_path / "s2"))
    assert code == 0, err
    assert (tmp_path / "s2" / "a" / "mean.png").exists() and (tmp_path / "s2" / "b" / "mean.png").exists()
    # wrong size: one line naming both sizes
    save_image(render_petals("val", [0], 16)[0], tmp_path / "big.png")
    code, _, err = run_cli("sample", str(tmp_path / "big.png"), "--run", str(run_dir), "-o", str(tmp_path / "s3"))
    assert_user_error(code, err, "(3, 16, 16)", "(3, 8, 8)")


def test_cli_resume_of_a_missing_run_is_a_user_error(run_cli, tmp_path):
    code, _, err = run_cli("finetune", "--resume", "--run-dir", str(tmp_path / "nothing"))
    assert_user_error(code, err, "nothing")


def test_default_h_network_is_sized_to_the_prior():
    from deftcli.finetune import htransform_for
    from deftcli.priors import UNetPrior
    from deftcli.sde import VPSDE
    from deftcli.unet import UNet, UNetConfig

    prior = UNetPrior(
        UNet(UNetConfig(model_channels=16, channel_mult=(1, 2)), VPSDE().sigma), VPSDE(), (3, 16, 16), "p", {}
    )
    prior_params = sum(p.numel() for p in prior.parameters())
    sizes = []
    for fraction in (0.1, 0.5):
        hnet = {"size_fraction": fraction, "time_embedding_dim": 16, "time_hidden": 16}
        spec, _ = with_tuned_defaults(FinetuneSpec(hnet=hnet), None)
        htransform = htransform_for(spec, prior, create("superres", factor=4, sigma=0.05))
        assert htransform.num_parameters() <= fraction * prior_params
        blocks = htransform.config.space_to_depth**2
        assert htransform.config.network.in_channels == 2 * prior.image_shape[0] * blocks
        sizes.append(htransform.config.network.model_channels)
    assert sizes[0] < sizes[1]
    given, _ = with_tuned_defaults(FinetuneSpec(hnet={"model_channels": 12}), None)
    assert htransform_for(given, prior, create("superres", factor=4, sigma=0.05)).config.network.model_channels == 12


def test_space_to_depth_h_network_maps_images_to_images_and_keeps_its_block_size_in_the_checkpoint(tmp_path):
    from deftcli.finetune import htransform_for
    from deftcli.htransform import save_htransform
    from deftcli.priors import UNetPrior
    from deftcli.sde import VPSDE
    from deftcli.unet import UNet, UNetConfig

    prior = UNetPrior(
        UNet(UNetConfig(model_channels=8, channel_mult=(1, 2), norm_groups=8), VPSDE().sigma),
        VPSDE(),
        (3, 16, 16),
        "p",
        {},
    )
    hnet = {"space_to_depth": 4, "model_channels": 8, "channel_mult": [1], "time_embedding_dim": 16, "time_hidden": 16}
    spec, _ = with_tuned_defaults(FinetuneSpec(hnet=hnet), None)
    htransform = htransform_for(spec, prior, create("superres", factor=4, sigma=0.05))
    assert (htransform.config.network.in_channels, htransform.config.network.out_channels) == (96, 48)
    with torch.no_grad():
        for p in htransform.parameters():
            p.add_(0.1 * torch.randn_like(p))  # past the zero-initialised output layer
    x, g, t = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.7])
    out = htransform(x, t, g)
    assert out.shape == x.shape
    save_htransform(htransform, tmp_path / "h.safetensors", {"step": 0})
    loaded, _ = load_htransform(tmp_path / "h.safetensors", prior)
    assert loaded.config.space_to_depth == 4
    assert torch.allclose(loaded(x, t, g), out)


def test_the_time_scaling_network_learns_at_its_own_rate(gmm_problem, tmp_path):
    trainer = Finetuner(
        gmm_spec(gmm_problem, tmp_path / "run", lr=1e-3, time_lr_factor=3.0), tmp_path / "run", resume=False, quiet=True
    )
    cond_group, time_group = trainer.optimizer.param_groups
    assert {id(p) for p in time_group["params"]} == {id(p) for p in trainer.htransform.time_model.parameters()}
    trainer.step()  # inside the warm-up: both rates scaled by the same factor
    assert time_group["lr"] == pytest.approx(3 * cond_group["lr"]) and cond_group["lr"] < 1e-3


def test_gaussian_start_begins_closer_to_the_optimum_and_is_saved_with_the_run(gmm_problem, tmp_path):
    first_j = {}
    for start in ("zero", "gaussian"):
        run_dir = tmp_path / start
        finetune(gmm_spec(gmm_problem, run_dir, **{"iterations": 1, "hnet.start": start}), quiet=True)
        first_j[start] = metric_lines(run_dir)[0]["J"]
        htransform, _ = load_htransform(run_dir / "hnet_last.safetensors", load_prior(gmm_problem["prior_dir"]))
        assert (htransform.config.guidance is not None) == (start == "gaussian")
    assert first_j["gaussian"] < 0.8 * first_j["zero"]
