"""The command-line shell: help, `deft operators`, `deft degrade`, and one-line errors for user mistakes."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_user_error
from PIL import Image

from deftcli.images import read_image, read_measurement


@pytest.fixture
def flower(tmp_path):
    """A 32×32 RGB image file."""
    from deftcli.petals import render_petals

    x = render_petals("val", [0], 32)[0]
    arr = ((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    path = tmp_path / "flower.png"
    Image.fromarray(arr).save(path)
    return path


def test_help_through_the_entry_point_and_python_m(python):
    deft = str(Path(python).parent / "deft")  # the console script installed beside this interpreter
    for cmd in ([deft, "--help"], [python, "-m", "deftcli", "--help"]):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        for name in ("finetune", "sample", "eval", "pretrain", "degrade", "operators", "check"):
            assert name in result.stdout


@pytest.mark.parametrize("args", [(), ("check",)])
def test_no_command_shows_the_help_and_no_empty_error_line(run_cli, args):
    code, out, err = run_cli(*args)
    assert code == 2 and "Usage" in out + err and "error" not in err


def test_the_defaults_that_help_texts_quote_are_the_specs_defaults():
    """`--help` says "(default X)" for the main options; X must be what the command really uses."""
    import re

    import typer

    from deftcli.check_gmm import GMMCheckSpec
    from deftcli.cli import app
    from deftcli.specs import EvalSpec, FinetuneSpec, PretrainSpec, SampleSpec

    group = typer.main.get_command(app)
    commands = {name: group.commands[name] for name in ("finetune", "sample", "eval", "pretrain")} | {
        "gmm": group.commands["check"].commands["gmm"]
    }
    specs = {
        "finetune": FinetuneSpec,
        "sample": SampleSpec,
        "eval": EvalSpec,
        "pretrain": PretrainSpec,
        "gmm": GMMCheckSpec,
    }
    checked = []
    for name, command in commands.items():
        for param in command.params:
            quoted = re.search(r"default ([^:;()]+)\)", param.help or "")
            if quoted is None or param.name not in specs[name].model_fields:
                continue
            default = specs[name].model_fields[param.name].default
            if default is None:  # a described default, e.g. "runs/<operator>-<timestamp>"
                continue
            text = quoted.group(1).strip()
            if isinstance(default, bool):
                assert text == ("on" if default else "off"), (name, param.name)
            elif isinstance(default, (list, tuple)):
                assert text == ",".join(map(str, default)), (name, param.name)
            elif isinstance(default, (int, float)):
                assert float(text) == default, (name, param.name, text, default)
            else:
                assert text == str(default), (name, param.name)
            checked.append(f"{name} --{param.name}")
    assert len(checked) >= 20, checked


def test_operators_lists_the_built_ins_with_parameters_and_provider(run_cli):
    code, out, err = run_cli("operators")
    assert code == 0, err
    for text in ("superres", "blur", "inpaint", "factor", "kernel_std", "mask", "deft"):
        assert text in out


def test_degrade_writes_a_measurement_of_the_operator_shape(run_cli, flower, tmp_path):
    out = tmp_path / "y.png"
    code, _, err = run_cli(
        "degrade", str(flower), "--operator", "superres", "--factor", "4", "--seed", "3", "-o", str(out)
    )
    assert code == 0, err
    assert read_image(out).shape == (3, 8, 8)


def test_degrade_is_reproducible_with_a_seed_and_exact_as_safetensors(run_cli, flower, tmp_path):
    paths = [tmp_path / f"y{i}.safetensors" for i in range(3)]
    for path, seed in zip(paths, (1, 1, 2)):
        assert (
            run_cli("degrade", str(flower), "--factor", "2", "--sigma", "0.1", "--seed", str(seed), "-o", str(path))[0]
            == 0
        )
    a, b, c = (read_measurement(p) for p in paths)
    assert torch.equal(a, b) and not torch.equal(a, c)
    clean = torch.nn.functional.avg_pool2d(read_image(flower)[None], 2)[0]
    assert (a - clean).std().item() == pytest.approx(0.1, rel=0.15)


def test_degrade_with_param_and_blur_applies_the_operator_it_was_given(run_cli, flower, tmp_path):
    out = tmp_path / "b.safetensors"
    code, _, err = run_cli(
        "degrade",
        str(flower),
        "--operator",
        "blur",
        "--param",
        "kernel=uniform",
        "--kernel-size",
        "5",
        "--sigma",
        "0",
        "-o",
        str(out),
    )
    assert code == 0, err
    x = read_image(flower)
    box = torch.nn.functional.pad(x[None], (2, 2, 2, 2), mode="circular")
    box = torch.nn.functional.avg_pool2d(box, 5, stride=1)[0]  # a 5×5 uniform kernel, circular padding, computed here
    torch.testing.assert_close(read_measurement(out), box, atol=1e-5, rtol=0)


def test_degrade_refuses_to_overwrite_without_force(run_cli, flower, tmp_path):
    out = tmp_path / "y.png"
    out.write_bytes(b"previous")
    code, _, err = run_cli("degrade", str(flower), "-o", str(out))
    assert_user_error(code, err, "exists")
    assert out.read_bytes() == b"previous"


@pytest.mark.parametrize(
    "args, needles",
    [
        (["degrade", "{missing}", "-o", "{out}"], ["no such file"]),
        (["degrade", "{notimage}", "-o", "{out}"], ["not an image"]),
        (["degrade", "{flower}", "--operator", "warp", "-o", "{out}"], ["warp", "superres"]),
        (["degrade", "{flower}", "--factor", "3", "-o", "{out}"], ["3", "32"]),
        (["degrade", "{flower}", "--factor", "1", "-o", "{out}"], ["factor"]),
        (["degrade", "{flower}", "--sigma", "-0.1", "-o", "{out}"], ["sigma"]),
        (["degrade", "{flower}", "--param", "nonsense", "-o", "{out}"], ["key=value"]),
        (["degrade", "{flower}", "--operator", "blur", "--factor", "2", "-o", "{out}"], ["factor"]),
        (["finetune", "--spec", "{badspec}"], ["bogus"]),
        (["finetune", "--spec", "{typespec}"], ["iterations"]),
        (["degrade", "{flower}", "--no-such-flag"], ["no-such-flag"]),
    ],
)
def test_user_mistakes_are_one_line_errors_with_exit_code_2(run_cli, flower, tmp_path, args, needles):
    (tmp_path / "notimage.png").write_text("this is text")
    (tmp_path / "bad.yaml").write_text("bogus: 1\n")
    (tmp_path / "type.yaml").write_text("iterations: many\n")
    paths = {
        "missing": tmp_path / "nope.png",
        "out": tmp_path / "y.png",
        "notimage": tmp_path / "notimage.png",
        "flower": flower,
        "badspec": tmp_path / "bad.yaml",
        "typespec": tmp_path / "type.yaml",
    }
    code, _, err = run_cli(*[a.format(**paths) for a in args])
    assert_user_error(code, err, *needles)
    assert not (tmp_path / "y.png").exists()


def test_debug_shows_the_traceback(flower, tmp_path, python):
    result = subprocess.run(
        [python, "-m", "deftcli", "--debug", "degrade", str(tmp_path / "nope.png"), "-o", str(tmp_path / "y.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "Traceback" in result.stderr
