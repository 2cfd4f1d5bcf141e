"""Faults during fine-tuning (SIGKILL mid-write, SIGINT, a full disk) and reproducibility of sample/eval."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_HNET

from deftcli.checkpoint import PAUSE_HOOK, load_state
from deftcli.errors import DeftError
from deftcli.finetune import finetune
from deftcli.interrupts import GracefulInterrupt
from deftcli.specs import FinetuneSpec, build_spec
from deftcli.training import MetricsLog


def cli_args(problem, run_dir, iterations=6):
    hnet = ["--hnet-channels", "8", "--hnet-mult", "1"]
    return [
        sys.executable,
        "-m",
        "deftcli",
        "finetune",
        "--prior",
        str(problem["prior_dir"]),
        "--factor",
        "2",
        "--sigma",
        "0.1",
        "--measurement",
        str(problem["y_path"]),
        "--iterations",
        str(iterations),
        "--time-steps",
        "6",
        "--trajectories",
        "4",
        *hnet,
        "--run-dir",
        str(run_dir),
        "--device",
        "cpu",
        "--quiet",
    ]


def lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_for(predicate, timeout=120.0):
    start = time.time()
    while not predicate():
        if time.time() - start > timeout:
            raise TimeoutError
        time.sleep(0.05)


def tiny_spec(problem, run_dir, iterations):
    return build_spec(
        FinetuneSpec,
        overrides={
            "prior.path": str(problem["prior_dir"]),
            "operator.params": {"factor": 2, "sigma": 0.1},
            "measurement": str(problem["y_path"]),
            "iterations": iterations,
            "time_steps": 6,
            "trajectories": 4,
            "checkpoint_every": 1,
            "run_dir": str(run_dir),
            **TINY_HNET,
        },
    )


def spec_file(tmp_path, every=1):
    path = tmp_path / "spec.yaml"
    path.write_text(f"checkpoint_every: {every}\npreview_every: 100\n")
    return str(path)


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one_and_resume_finishes_the_run(gmm_problem, tmp_path):
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same float reductions in every process
    straight = tmp_path / "straight"
    subprocess.run(
        cli_args(gmm_problem, straight) + ["--spec", spec_file(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
        env=one_thread,
    )

    run_dir = tmp_path / "killed"
    env = {**one_thread, "DEFT_TEST_PAUSE_BEFORE_RENAME": "state_last.safetensors:2:60"}
    proc = subprocess.Popen(
        cli_args(gmm_problem, run_dir) + ["--spec", spec_file(tmp_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: any(run_dir.glob(".state_last.safetensors.*.tmp")))  # the third save is half done
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert int(load_state(run_dir / "state_last.safetensors")["step"]) == 2  # the previous checkpoint, intact

    resumed = subprocess.run(
        [sys.executable, "-m", "deftcli", "finetune", "--resume", "--run-dir", str(run_dir), "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        env=one_thread,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert not list(run_dir.glob(".*.tmp"))
    assert [line["loss"] for line in lines(run_dir)] == [line["loss"] for line in lines(straight)]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; kill, timeout or a scheduler's preemption
def test_an_interrupt_saves_a_checkpoint_and_exits_130_with_a_message(gmm_problem, tmp_path, signum):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        cli_args(gmm_problem, run_dir, iterations=100000),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted at step" in err and "--resume" in err and "Traceback" not in err
    state = load_state(run_dir / "state_last.safetensors")
    assert int(state["step"]) == len(lines(run_dir))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_a_resumed_run_starts_stops_it_after_a_step_with_a_checkpoint(gmm_problem, tmp_path, signum):
    run_dir = tmp_path / "run"
    finetune(tiny_spec(gmm_problem, run_dir, iterations=3), quiet=True)
    # the resumed leg pauses in its start-up, after loading its checkpoint, while it trims the metrics log
    env = {**os.environ, "OMP_NUM_THREADS": "1", PAUSE_HOOK: "metrics.jsonl:0:5"}
    resume = [
        sys.executable,
        "-m",
        "deftcli",
        "finetune",
        "--resume",
        "--run-dir",
        str(run_dir),
        "--iterations",
        "9999",
        "--quiet",
    ]
    proc = subprocess.Popen(resume, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: any(run_dir.glob(".metrics.jsonl.*.tmp")))
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "Traceback" not in err
    steps = [line["step"] for line in lines(run_dir)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 3
    assert int(load_state(run_dir / "state_last.safetensors")["step"]) == len(steps)


class SignalsWhenProbed:
    """Sends SIGINT when torch looks up an attribute; torch drops the KeyboardInterrupt this raises and reports
    a RuntimeError instead (as it does, with a ValueError, when a signal lands while safetensors reads a file)."""

    def __getattr__(self, name):
        os.kill(os.getpid(), signal.SIGINT)
        raise AttributeError(name)


def test_a_second_signal_aborts_even_where_torch_reports_its_keyboard_interrupt_as_another_error():
    with pytest.raises(KeyboardInterrupt):
        with GracefulInterrupt() as interrupt:
            os.kill(os.getpid(), signal.SIGINT)
            wait_for(lambda: interrupt.requested)  # the first only asks the loop to save and stop
            torch.as_tensor(SignalsWhenProbed())


def test_ctrl_c_while_a_command_loads_a_checkpoint_is_an_interrupt_not_a_corrupt_file(run_cli, tmp_path, monkeypatch):
    """torch turns a KeyboardInterrupt raised inside safetensors' reading into another error; deft exits 130."""

    def open_and_get_interrupted(*args, **kwargs):
        torch.as_tensor(SignalsWhenProbed())

    monkeypatch.setattr("deftcli.checkpoint.safe_open", open_and_get_interrupted)
    code, _, err = run_cli("sample", "--unconditional", "-n", "1", "--steps", "3", "-o", str(tmp_path / "out"))
    assert code == 130, err
    assert err.strip() == "deft: aborted" and "corrupt" not in err
    assert not (tmp_path / "out").exists()


def test_trimming_the_metrics_log_for_a_resume_is_atomic_so_a_failure_midway_keeps_every_line(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.append({"step": step})
    before = log.path.read_text()
    write_text = Path.write_text

    def half_then_disk_full(path, text):
        write_text(path, text[: len(text) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", half_then_disk_full)
    with pytest.raises(DeftError, match="No space left on device"):
        log.truncate_after(2)
    assert log.path.read_text() == before


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_old_checkpoint(gmm_problem, tmp_path, monkeypatch):
    import deftcli.checkpoint as checkpoint

    real_save = checkpoint.save_file
    calls = {"n": 0}

    def save_until_the_disk_fills(tensors, filename, metadata=None):
        if "state_last" in str(filename):
            calls["n"] += 1
            if calls["n"] > 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_until_the_disk_fills)
    with pytest.raises(DeftError, match="No space left on device") as info:
        finetune(tiny_spec(gmm_problem, tmp_path / "run", iterations=5), quiet=True)
    assert "\n" not in str(info.value) and "unchanged" in str(info.value)
    assert int(load_state(tmp_path / "run" / "state_last.safetensors")["step"]) == 2
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_a_write_that_fails_halfway_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from deftcli.images import atomic_write

    path = tmp_path / "state.json"
    path.write_text("old")

    def half_then_disk_full(tmp):
        Path(tmp).write_text("ne")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DeftError, match="No space left on device.*previous version of the file is unchanged"):
        atomic_write(path, half_then_disk_full)
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]


def test_written_files_get_the_permissions_of_the_umask_like_any_other_file(tmp_path):
    from deftcli.checkpoint import save_weights, write_json

    old = os.umask(0o027)
    try:
        save_weights({"w": torch.zeros(2)}, tmp_path / "w.safetensors")  # safetensors alone would create it 0600
        write_json({"a": 1}, tmp_path / "a.json")
    finally:
        os.umask(old)
    assert [(tmp_path / name).stat().st_mode & 0o777 for name in ("w.safetensors", "a.json")] == [0o640, 0o640]


def test_same_seed_gives_bit_identical_samples_and_the_same_eval_metrics(run_cli, tiny_prior, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(
        "finetune",
        "--prior",
        str(tiny_prior),
        "--factor",
        "2",
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
        "--run-dir",
        str(run_dir),
        "--quiet",
    )
    assert code == 0, err
    import torch

    from deftcli.images import save_image
    from deftcli.petals import render_petals

    save_image(torch.nn.functional.avg_pool2d(render_petals("val", [0], 16), 2)[0], tmp_path / "y.safetensors")
    outs = []
    for i in range(2):
        code, _, err = run_cli(
            "sample",
            str(tmp_path / "y.safetensors"),
            "--run",
            str(run_dir),
            "-n",
            "3",
            "--seed",
            "5",
            "-o",
            str(tmp_path / f"s{i}"),
        )
        assert code == 0, err
        outs.append([(tmp_path / f"s{i}" / f"sample_{j:03d}.png").read_bytes() for j in range(3)])
    assert outs[0] == outs[1]
    results = []
    for i in range(2):
        code, _, err = run_cli(
            "eval",
            "--run",
            str(run_dir),
            "--n",
            "3",
            "-k",
            "2",
            "--steps",
            "4",
            "--methods",
            "deft,dagger",
            "-o",
            str(tmp_path / f"e{i}"),
        )
        assert code == 0, err
        metrics = json.loads((tmp_path / f"e{i}" / "results.json").read_text())["methods"]
        results.append({m: {k: v for k, v in row.items() if not k.startswith("seconds")} for m, row in metrics.items()})
    assert results[0] == results[1]
    info = json.loads((run_dir / "run.json").read_text())
    assert {"torch", "deft", "python"} <= set(info["versions"]) and len(info["prior"]["sha256"]) == 64
