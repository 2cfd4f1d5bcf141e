"""torchrun data parallelism on CPU (gloo, 2 processes): same gradients as one process, one run folder, same eval
table."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_unet_prior
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("distributed_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={processes}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        *args,
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("mode", ["per-measurement", "amortised", "backprop"])
def test_two_processes_give_the_gradient_of_one_process_on_the_same_global_batch(gmm_problem, tmp_path, mode):
    args = [mode, str(gmm_problem["prior_dir"]), str(gmm_problem["y_path"])]
    single = subprocess.run(
        [sys.executable, str(WORKER), *args, str(tmp_path / "run1"), str(tmp_path / "g1.safetensors")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun(str(WORKER), *args, str(tmp_path / "run2"), str(tmp_path / "g2.safetensors"))
    one, two = load_file(str(tmp_path / "g1.safetensors")), load_file(str(tmp_path / "g2.safetensors"))
    assert torch.allclose(one.pop("loss"), two.pop("loss"), rtol=1e-5)
    flat1 = torch.cat([one[k].flatten() for k in sorted(one)])
    flat2 = torch.cat([two[k].flatten() for k in sorted(one)])
    assert flat1.abs().max() > 0
    assert torch.allclose(flat1, flat2, rtol=1e-4, atol=1e-6 * flat1.abs().max().item())


def test_a_two_process_run_writes_one_run_folder_that_samples_and_evaluates_like_one_process(tmp_path):
    prior = write_tiny_unet_prior(tmp_path / "prior")
    run_dir = tmp_path / "run"
    hnet = ["--hnet-channels", "8", "--hnet-mult", "1"]
    torchrun(
        "-m",
        "deftcli",
        "finetune",
        "--prior",
        str(prior),
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
        *hnet,
        "--run-dir",
        str(run_dir),
        "--device",
        "cpu",
        "--quiet",
    )
    info = json.loads((run_dir / "run.json").read_text())
    assert info["processes"] == 2 and info["global_batch"] == 4
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3
    assert sorted(p.name for p in run_dir.iterdir() if p.suffix == ".safetensors") == [
        "hnet_best.safetensors",
        "hnet_last.safetensors",
        "state_last.safetensors",
    ]

    common = [
        "eval",
        "--run",
        str(run_dir),
        "--n",
        "5",
        "-k",
        "2",
        "--steps",
        "4",
        "--methods",
        "deft,dps,dagger",
        "--dps-zeta",
        "0.5",
        "--guidance-scale",
        "sweep",
        "--device",
        "cpu",
    ]
    one = subprocess.run(
        [sys.executable, "-m", "deftcli", *common, "-o", str(tmp_path / "eval1")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun(
        "-m", "deftcli", "--", *common, "-o", str(tmp_path / "eval2")
    )  # "--": eval's --n/--run would match torchrun's own options
    r1 = json.loads((tmp_path / "eval1" / "results.json").read_text())
    r2 = json.loads((tmp_path / "eval2" / "results.json").read_text())
    assert r2["processes"] == 2
    assert (
        r2["deft_sweep"] == r1["deft_sweep"] and r2["guidance_scale"] == r1["guidance_scale"] != 1
    )  # rank 0 sweeps, every rank samples with its γ
    for method in ("deft", "dps", "dagger"):
        for key in ("psnr_sample", "ssim_sample", "psnr_mean", "ssim_mean", "data_residual"):
            assert r1["methods"][method][key] == pytest.approx(r2["methods"][method][key], rel=1e-5, abs=1e-6), (
                method,
                key,
            )
