"""benchmarks/report.py: benchmarks/README.md is what the results' JSON files hold, table by table."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_report():
    spec = importlib.util.spec_from_file_location("benchmark_report", ROOT / "benchmarks" / "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


report = load_report()


def test_the_shipped_benchmarks_readme_is_the_generated_one():
    assert (ROOT / "benchmarks" / "README.md").read_text() == report.render_readme(), (
        "benchmarks/README.md is stale: run python benchmarks/report.py"
    )


def test_the_benchmarks_readme_stays_short():
    assert len(report.render_readme().splitlines()) <= 200


def test_every_results_file_the_readme_names_exists():
    for benchmark in report.BENCHMARKS:
        for path in benchmark.results:
            assert (ROOT / path).is_file(), path


def test_a_posterior_quality_result_becomes_its_table_rows():
    result = {
        "setup": {
            "data": "petals val, first 2",
            "operator": "superres(factor=4, sigma=0.05)",
            "time_steps": 50,
            "k": 4,
            "threads": 2,
            "torch": "2.14.1",
            "platform": "Linux-x86_64",
        },
        "sweeps": {
            "images": "first 8 of train",
            "dps": {"selected": {"dps_zeta": 10.0}},
            "diffpir": {"selected": {"diffpir_lambda": 0.25, "diffpir_zeta": 1.0}},
            "deft_w3_zero": {"selected": {"guidance_scale": 2.0, "sampler": "sde"}, "best_train_psnr": 21.5},
        },
        "selected_deft": {"run": "deft_w3_zero", "guidance_scale": 2.0, "sampler": "sde"},
        "methods": {
            "dps": {
                "dps_zeta": 10.0,
                "psnr_sample": 21.1,
                "ssim_sample": 0.5,
                "psnr_mean": 22.8,
                "ssim_mean": 0.69,
                "data_residual": 0.02,
                "seconds_per_image": 2.2,
                "k": 4,
            },
            "deft_w3_zero": {
                "guidance_scale": 2.0,
                "sampler": "sde",
                "psnr_sample": 22.7,
                "ssim_sample": 0.7,
                "psnr_mean": 23.3,
                "ssim_mean": 0.81,
                "data_residual": 0.04,
                "seconds_per_image": 1.0,
                "k": 4,
            },
        },
        "selected_deft_against": {
            "dps": {
                "psnr_mean": {"mean_db": 0.5, "standard_error_db": 0.1, "images_above": 2, "images": 2},
                "ssim_mean": {"mean_db": -0.01, "standard_error_db": 0.002, "images_above": 0, "images": 2},
            }
        },
        "sampling_speed": {
            "batch": 2,
            "rounds": 3,
            "seconds_per_image": {"dps": {"median": 0.53}, "deft_w3_zero": {"median": 0.26}},
        },
        "prior_truth": None,
    }
    lines = report.render_sample_quality([result])
    assert "| DPS | dps_zeta 10.0 | 21.1 | 22.8 | 0.69 | 0.02 | 0.53 |" in lines
    assert (
        "| deft, w = 3, zero start (selected) | guidance_scale 2.0, sampler sde | 22.7 | 23.3 | 0.81 | 0.04 | 0.26 |"
        in lines
    )
    assert "| DPS | +0.5 ± 0.1 (2 of 2) | -0.01 ± 0.002 (0 of 2) |" in lines


def test_a_rendering_speed_result_becomes_its_table_row():
    result = {
        "threads": 1,
        "torch": "2.14.1",
        "machine": "x86_64",
        "results": [{"size": 32, "batch": 64, "images_per_second": 4133.54459534846}],
    }
    assert report.render_petals_throughput([result])[-1] == "| 32 | 64 | 4134 |"


def test_check_exits_1_when_the_readme_differs_and_0_when_it_matches(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nedited by hand\n")
    monkeypatch.setattr(report, "README", readme)
    monkeypatch.setattr(report, "ROOT", tmp_path)
    monkeypatch.setattr(sys, "argv", ["report.py", "--check"])
    with pytest.raises(SystemExit) as stopped:
        report.main()
    assert stopped.value.code == 1
    monkeypatch.setattr(sys, "argv", ["report.py"])
    report.main()
    monkeypatch.setattr(sys, "argv", ["report.py", "--check"])
    report.main()
    assert readme.read_text() == report.render_readme()
