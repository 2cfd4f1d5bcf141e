"""A prior's tuned defaults (tuning.json): what `deft finetune`, `deft sample` and `deft eval` take for the fields
left unset."""

import json

import torch
from conftest import assert_user_error, write_tiny_unet_prior

from deftcli.images import save_image
from deftcli.operators import create

TUNING = {
    "selected_by": "a test",
    "operators": {
        "superres": {
            "finetune": {"likelihood_weight": 2.0, "iterations": 2, "hnet_start": "gaussian"},
            "sampling": {"guidance_scale": 1.5, "sampler": "renoise", "renoise_zeta": 0.5},
        }
    },
}
TINY = [
    "--hnet-channels",
    "8",
    "--hnet-mult",
    "1",
    "--time-steps",
    "5",
    "--measurements-per-batch",
    "1",
    "--trajectories",
    "2",
    "--quiet",
]


def tuned_prior(tmp_path, tuning=TUNING):
    folder = write_tiny_unet_prior(tmp_path / "prior")
    (folder / "tuning.json").write_text(json.dumps(tuning))
    return folder


def finetuned(run_cli, tmp_path, *flags: str):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(
        "finetune",
        "--prior",
        str(tuned_prior(tmp_path)),
        "--operator",
        "superres",
        "--factor",
        "2",
        "--run-dir",
        str(run_dir),
        *TINY,
        *flags,
    )
    assert code == 0, err
    return run_dir, json.loads((run_dir / "spec.json").read_text()), json.loads((run_dir / "run.json").read_text())


def test_finetune_takes_the_prior_s_tuned_settings_for_the_fields_left_unset_and_records_them(run_cli, tmp_path):
    run_dir, spec, info = finetuned(run_cli, tmp_path)
    assert (spec["likelihood_weight"], spec["iterations"], spec["hnet"]["start"]) == (2.0, 2, "gaussian")
    assert info["tuned_defaults"]["source"] == "a test"
    assert info["tuned_defaults"]["finetune"] == {"likelihood_weight": 2.0, "iterations": 2, "hnet_start": "gaussian"}
    assert info["tuned_defaults"]["sampling"] == {"guidance_scale": 1.5, "sampler": "renoise", "renoise_zeta": 0.5}
    assert (
        info["htransform"]["config"]["likelihood_weight"] == 2.0
        and info["htransform"]["config"]["guidance"] is not None
    )


def test_a_flag_overrides_the_tuned_setting(run_cli, tmp_path):
    _, spec, info = finetuned(run_cli, tmp_path, "--likelihood-weight", "1", "--hnet-start", "zero")
    assert (spec["likelihood_weight"], spec["iterations"], spec["hnet"]["start"]) == (1.0, 2, "zero")
    assert info["tuned_defaults"]["finetune"] == {"iterations": 2}


def test_an_operator_the_tuning_does_not_name_keeps_the_built_in_defaults(run_cli, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(
        "finetune",
        "--prior",
        str(tuned_prior(tmp_path)),
        "--operator",
        "inpaint",
        "--iterations",
        "1",
        "--run-dir",
        str(run_dir),
        *TINY,
    )
    assert code == 0, err
    spec, info = (json.loads((run_dir / name).read_text()) for name in ("spec.json", "run.json"))
    assert (spec["likelihood_weight"], spec["hnet"]["start"]) == (1.0, "zero")
    assert info["tuned_defaults"] == {
        "source": None,
        "finetune": {},
        "sampling": {"guidance_scale": 1.0, "sampler": "sde", "renoise_zeta": 1.0},
    }


def test_sample_uses_the_run_s_tuned_sampling_unless_told_otherwise(run_cli, tmp_path):
    run_dir, _, _ = finetuned(run_cli, tmp_path)
    y = tmp_path / "y.safetensors"
    save_image(create("superres", factor=2).measure(-0.2 * torch.ones(1, 3, 16, 16))[0], y)
    for flags, expected in (
        ([], (1.5, "renoise", 0.5)),
        (["--sampler", "sde", "--guidance-scale", "1"], (1.0, "sde", None)),
    ):
        out = tmp_path / f"out-{len(flags)}"
        code, _, err = run_cli(
            "sample", str(y), "--run", str(run_dir), "-n", "2", "--steps", "4", "-o", str(out), *flags
        )
        assert code == 0, err
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["guidance_scale"], summary["sampler"], summary.get("renoise_zeta")) == expected


def test_an_invalid_tuning_file_is_a_one_line_error(run_cli, tmp_path):
    folder = tuned_prior(tmp_path, {"selected_by": "x", "operators": {"superres": {"sampling": {"renoise_zeta": 3}}}})
    code, _, err = run_cli("finetune", "--prior", str(folder), "--run-dir", str(tmp_path / "run"), *TINY)
    assert_user_error(code, err, "tuning.json", "renoise_zeta")
    assert not (tmp_path / "run").exists()


def test_eval_samples_deft_with_the_run_s_tuned_settings(run_cli, tmp_path):
    run_dir, _, _ = finetuned(run_cli, tmp_path)
    out = tmp_path / "eval"
    code, _, err = run_cli(
        "eval", "--run", str(run_dir), "--methods", "deft", "--n", "2", "-k", "1", "--steps", "4", "-o", str(out)
    )
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert (results["guidance_scale"], results["sampler"], results["renoise_zeta"], results["likelihood_weight"]) == (
        1.5,
        "renoise",
        0.5,
        2.0,
    )
