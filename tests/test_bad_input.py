"""The bad-input matrix: every mistake a user can make with a path, an image, a spec, an operator,
a run folder, a prior or an output location, driven through the real command line.

Rules each case of :data:`MATRIX` must satisfy:

- the command exits with code 2 and writes exactly one non-empty line to stderr, with no traceback;
- that line names the problem (it contains every expected keyword, case-insensitively);
- nothing that existed before the command is changed: every file under the test's working folder and
  under the shared assets (prior, runs, images) keeps its bytes, and no new file appears — in
  particular existing outputs are never overwritten silently, and a pickle that would create a file
  when unpickled is refused without creating it.

Each case is ``(case id, argv builder, expected keywords)``; the builder receives a :class:`Workspace`,
creates the bad input in the test's own folder (the current directory during the call) and returns
the arguments after ``deft``. Commands run in-process through ``deftcli.cli.main``; the ids in
:data:`IN_A_REAL_PROCESS` run as ``python -m deftcli`` in a subprocess, where the process's own exit
status and side effects matter.

Conversions that are accepted rather than refused are asserted in the tests after the matrix:
``deft degrade`` reads L, LA and I;16 images as one channel and RGB, RGBA and P as three, alpha
composited onto black and 16-bit precision kept; ``deft sample`` converts an RGBA measurement to RGB
the same way but refuses a grey one for a colour prior (a one-line error naming the channels).

Assets are tiny: a random 8-channel UNet prior on 16×16 RGB images, 2× super-resolution (8×8
measurements), two fine-tuned runs of 1 iteration with h-networks of different sizes.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from conftest import Assets, assert_user_error, snapshot
from PIL import Image
from safetensors.torch import save_file

from deftcli.images import read_measurement, read_tensor

# ------------------------------------------------------------------ the workspace a case builds its input in


def pil_image(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A random image of a Pillow mode (size is (width, height))."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))  # uint16 arrays are I;16
    if mode == "P":
        img = Image.fromarray(rng.integers(0, 16, (h, w), dtype=np.uint8))
        img.putpalette(rng.integers(0, 256, 16 * 3, dtype=np.uint8).tolist())  # L + palette → P
        return img
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr)
    assert img.mode == mode
    return img


class Workspace:
    """Helpers for the argv builders: everything is created under ``tmp`` (the current directory)."""

    def __init__(self, tmp: Path, assets: Assets) -> None:
        self.tmp, self.assets = tmp, assets
        self.prior, self.run, self.flower, self.y = (
            str(p) for p in (assets.prior, assets.run, assets.flower, assets.y)
        )
        self.out = str(tmp / "out")

    def path(self, name: str) -> str:
        return str(self.tmp / name)

    def file(self, name: str, content: bytes | str = b"") -> str:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(p)

    def fifo(self, name: str) -> str:
        """A named pipe: opening it for reading would wait for a writer forever."""
        os.mkfifo(self.tmp / name)
        return str(self.tmp / name)

    def huge_image(self) -> str:
        """A tiny file that decodes to 4·10⁸ pixels (past Pillow's decompression-bomb limit)."""
        path = self.tmp / "huge.png"
        Image.new("1", (20000, 20000)).save(path)
        return str(path)

    def folder(self, name: str, files: dict[str, bytes | str] | None = None) -> str:
        (self.tmp / name).mkdir(parents=True, exist_ok=True)
        for fname, content in (files or {}).items():
            self.file(f"{name}/{fname}", content)
        return str(self.tmp / name)

    def symlink(self, name: str, target: str) -> str:
        os.symlink(target, self.tmp / name)
        return str(self.tmp / name)

    def previous(self, names: list[str], folder: str = "out") -> "Workspace":
        """Put earlier outputs (recognisable bytes) into ``folder``; returns the workspace, for chaining."""
        self.folder(folder, {name: f"previous {name}".encode() for name in names})
        return self

    def image(self, name: str, mode: str = "RGB", size: tuple[int, int] = (8, 8)) -> str:
        p = self.tmp / name
        pil_image(mode, size).save(p)
        return str(p)

    def truncated(self, name: str, source: str) -> str:
        data = Path(source).read_bytes()
        return self.file(name, data[: len(data) // 2])

    def tensor(self, name: str, tensors: dict[str, torch.Tensor]) -> str:
        save_file(tensors, str(self.tmp / name))
        return str(self.tmp / name)

    def unreadable(self, name: str) -> str:
        """A file with mode 000; root reads it anyway, so the case is skipped there (the folder-as-file cases cover
        it)."""
        p = Path(self.image(name, "RGB", (32, 32)))
        p.chmod(0)
        if os.access(p, os.R_OK):
            p.chmod(0o644)
            pytest.skip("running as root: mode 000 does not make a file unreadable (see the '*-is-a-folder' cases)")
        return str(p)

    def run_copy(self, mutate: Callable[[Path], None] = lambda p: None, source: Path | None = None) -> str:
        """A copy of the fine-tuned run, changed by ``mutate``."""
        dst = self.tmp / "run_copy"
        shutil.copytree(source or self.assets.run, dst)
        mutate(dst)
        return str(dst)

    def prior_copy(self, mutate: Callable[[Path], None]) -> str:
        dst = self.tmp / "prior_copy"
        shutil.copytree(self.assets.prior, dst)
        mutate(dst)
        return str(dst)

    def run_with_moved_prior(self, mutate: Callable[[Path], None]) -> str:
        """A run copy whose spec points at a copy of the prior, changed by ``mutate``."""
        prior = self.prior_copy(mutate)

        def repoint(run: Path) -> None:
            spec = json.loads((run / "spec.json").read_text())
            spec["prior"]["path"] = prior
            (run / "spec.json").write_text(json.dumps(spec))

        return self.run_copy(repoint)

    def evil_prior(self, how: str) -> str:
        """model.pt + report.yaml whose unpickling would create ``pwned`` (an absolute path)."""
        folder = self.tmp / f"evil_{how}"
        folder.mkdir()
        (folder / "report.yaml").write_text(
            "model: {model_channels: 8, channel_mult: [1, 2], norm_groups: 8}\ndiffusion: {sde: VPSDE}\n"
        )
        payload = {
            "weight": TouchOnUnpickle(str(self.tmp / "pwned"))
            if how == "touch"
            else SystemOnUnpickle(f"touch {self.tmp / 'pwned'}")
        }
        if how == "touch":
            torch.save(payload, folder / "model.pt")
        else:
            with open(folder / "model.pt", "wb") as f:
                pickle.dump(payload, f)
        return str(folder)


class TouchOnUnpickle:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


class SystemOnUnpickle:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# ------------------------------------------------------------------ argv fragments


def sample(w: Workspace, measurement: str, *extra: str, run: str | None = None) -> list[str]:
    return [
        "sample",
        measurement,
        "--run",
        run or w.run,
        "-n",
        "1",
        "--steps",
        "3",
        "--device",
        "cpu",
        "-o",
        w.out,
        *extra,
    ]


def unconditional(w: Workspace, prior: str, *extra: str) -> list[str]:
    return [
        "sample",
        "--unconditional",
        "--prior",
        prior,
        "-n",
        "1",
        "--steps",
        "3",
        "--device",
        "cpu",
        "-o",
        w.out,
        *extra,
    ]


def evaluate(w: Workspace, run: str | None = None, *extra: str, out: str | None = None) -> list[str]:
    return [
        "eval",
        "--run",
        run or w.run,
        "--n",
        "1",
        "-k",
        "1",
        "--methods",
        "dagger",
        "--steps",
        "3",
        "--device",
        "cpu",
        "-o",
        out or w.out,
        *extra,
    ]


def finetune(w: Workspace, *extra: str, prior: str | None = None) -> list[str]:
    return [
        "finetune",
        "--prior",
        prior or w.prior,
        "--factor",
        "2",
        "--iterations",
        "1",
        "--time-steps",
        "3",
        "--measurements-per-batch",
        "1",
        "--trajectories",
        "2",
        "--hnet-channels",
        "8",
        "--hnet-mult",
        "1",
        "--device",
        "cpu",
        "--run-dir",
        w.path("new_run"),
        "--quiet",
        *extra,
    ]


def degrade(w: Workspace, image: str, *extra: str, out: str | None = None) -> list[str]:
    return ["degrade", image, "-o", out or w.path("y_out.png"), *extra]


def pretrain(w: Workspace, *extra: str) -> list[str]:
    return [
        "pretrain",
        "--image-size",
        "8",
        "--model-channels",
        "8",
        "--channel-mult",
        "1",
        "--iterations",
        "1",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--out",
        w.path("new_prior"),
        "--quiet",
        *extra,
    ]


def spec_cmd(command: str) -> Callable[[Workspace, str], list[str]]:
    """``deft COMMAND --spec FILE`` with otherwise valid arguments."""

    def build(w: Workspace, spec: str) -> list[str]:
        return {
            "finetune": lambda: finetune(w, "--spec", spec),
            "sample": lambda: sample(w, w.y, "--spec", spec),
            "eval": lambda: evaluate(w, None, "--spec", spec),
            "pretrain": lambda: pretrain(w, "--spec", spec),
        }[command]()

    return build


# fields the argv builders do not also set by flag (a flag would override the file)
WRONG_TYPE = {"finetune": "lr", "sample": "batch_size", "eval": "batch_size", "pretrain": "lr"}


def spec_cases() -> list[tuple]:
    cases = []
    for cmd in ("finetune", "sample", "eval", "pretrain"):
        build = spec_cmd(cmd)
        field = WRONG_TYPE[cmd]
        cases += [
            (
                f"{cmd}-spec-unknown-key",
                lambda w, b=build: b(w, w.file("s.yaml", "bogus_key: 1\n")),
                ["bogus_key", "unknown field"],
            ),
            (
                f"{cmd}-spec-wrong-type",
                lambda w, b=build, f=field: b(w, w.file("s.yaml", f"{f}: many\n")),
                [field, "valid", "many"],
            ),
            (
                f"{cmd}-spec-boolean-number",
                lambda w, b=build, f=field: b(w, w.file("s.yaml", f"{f}: yes\n")),
                [field, "not the boolean true"],
            ),
            (
                f"{cmd}-spec-bad-yaml",
                lambda w, b=build: b(w, w.file("s.yaml", "a: [1, 2\n")),
                ["s.yaml", "not a valid yaml"],
            ),
            (
                f"{cmd}-spec-bad-toml",
                lambda w, b=build: b(w, w.file("s.toml", "a = = 1\n")),
                ["s.toml", "not a valid toml"],
            ),
            (
                f"{cmd}-spec-toml-unknown-key",
                lambda w, b=build: b(w, w.file("s.toml", "bogus_key = 1\n")),
                ["bogus_key", "unknown field"],
            ),
        ]
    return cases


# ------------------------------------------------------------------ run-folder mutations


def delete(name: str) -> Callable[[Path], None]:
    return lambda run: (run / name).unlink()


def cut_in_half(name: str) -> Callable[[Path], None]:
    def mutate(run: Path) -> None:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: len(data) // 2])

    return mutate


GMM_QUICK = ["check", "gmm", "--iterations", "1", "--samples", "10", "--time-steps", "3", "--device", "cpu"]


def replace_with(name: str, text: str) -> Callable[[Path], None]:
    return lambda run: (run / name).write_text(text)


def checkpoint_from(
    other: Callable[[Workspace], Path], name: str = "hnet_last.safetensors"
) -> Callable[[Workspace], Callable[[Path], None]]:
    return lambda w: lambda run: shutil.copy(other(w), run / name)


def hnet_with_bad_metadata(run: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(run / "hnet_last.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    save_file(tensors, str(run / "hnet_last.safetensors"), metadata={**meta, "htransform_config": "{not json"})


def edit_json(name: str, edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def mutate(run: Path) -> None:
        data = json.loads((run / name).read_text())
        result = edit(data)
        (run / name).write_text(json.dumps(data if result is None else result))

    return mutate


def perturb_weights(prior: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(prior / "model.safetensors"))
    first = sorted(state)[0]
    state[first] = state[first] + 1
    save_file(state, str(prior / "model.safetensors"))


def bad_run_cases() -> list[tuple]:
    """The same broken run folders for ``deft sample`` and ``deft eval``."""
    mutations: list[tuple[str, Callable[[Workspace], Callable[[Path], None]], list[str]]] = [
        (
            "checkpoint-deleted",
            lambda w: delete("hnet_last.safetensors"),
            ["hnet_last.safetensors", "no such checkpoint"],
        ),
        (
            "checkpoint-truncated",
            lambda w: cut_in_half("hnet_last.safetensors"),
            ["hnet_last.safetensors", "truncated"],
        ),
        (
            "checkpoint-from-bigger-hnet",
            checkpoint_from(lambda w: w.assets.other_run / "hnet_last.safetensors"),
            ["hnet_last.safetensors", "does not match", "model_channels"],
        ),
        (
            "checkpoint-is-the-prior",
            checkpoint_from(lambda w: w.assets.prior / "model.safetensors"),
            ["not an h-transform checkpoint"],
        ),
        (
            "checkpoint-is-training-state",
            checkpoint_from(lambda w: w.assets.run / "state_last.safetensors"),
            ["not an h-transform checkpoint"],
        ),
        ("checkpoint-metadata-garbled", lambda w: hnet_with_bad_metadata, ["hnet_last.safetensors", "config"]),
        ("spec-json-deleted", lambda w: delete("spec.json"), ["spec.json", "no such file"]),
        ("spec-json-garbled", lambda w: replace_with("spec.json", '{"prior": '), ["spec.json", "not valid json"]),
        ("spec-json-a-list", lambda w: replace_with("spec.json", "[1, 2]"), ["spec.json", "object"]),
        (
            "spec-json-unknown-field",
            lambda w: edit_json("spec.json", lambda d: d.update(bogus=1)),
            ["spec.json", "bogus"],
        ),
        (
            "spec-json-unknown-operator",
            lambda w: edit_json("spec.json", lambda d: d["operator"].update(name="warp")),
            ["warp"],
        ),
        ("run-json-deleted", lambda w: delete("run.json"), ["run.json", "no such file"]),
        ("run-json-garbled", lambda w: replace_with("run.json", "{"), ["run.json", "not valid json"]),
        ("run-json-a-list", lambda w: replace_with("run.json", "[]"), ["run.json", "object"]),
    ]
    cases = []
    for name, mutation, needles in mutations:
        cases.append((f"sample-run-{name}", lambda w, m=mutation: sample(w, w.y, run=w.run_copy(m(w))), needles))
        cases.append((f"eval-run-{name}", lambda w, m=mutation: evaluate(w, w.run_copy(m(w))), needles))
    return cases


# ------------------------------------------------------------------ the matrix
MATRIX: list[tuple[str, Callable[[Workspace], list[str]], list[str]]] = [
    # --- missing and unreadable paths
    ("degrade-missing-image", lambda w: degrade(w, w.path("nope.png")), ["nope.png", "no such file"]),
    (
        "degrade-dangling-symlink",
        lambda w: degrade(w, w.symlink("link.png", w.path("gone.png"))),
        ["link.png", "no such file"],
    ),
    ("degrade-image-is-a-folder", lambda w: degrade(w, w.folder("img.png")), ["img.png", "folder"]),
    ("degrade-image-under-a-file", lambda w: degrade(w, w.file("plain") + "/x.png"), ["no such file"]),
    ("degrade-image-mode-000", lambda w: degrade(w, w.unreadable("locked.png")), ["locked.png", "permission"]),
    ("sample-missing-measurement", lambda w: sample(w, w.path("nope.png")), ["nope.png", "no such file"]),
    ("sample-measurement-is-an-empty-folder", lambda w: sample(w, w.folder("ys")), ["ys", "no measurement"]),
    ("sample-missing-run", lambda w: sample(w, w.y, run=w.path("nope")), ["nope", "no such folder"]),
    ("sample-run-is-a-file", lambda w: sample(w, w.y, run=w.file("run.txt", "x")), ["run.txt", "not a folder"]),
    ("sample-no-run-yet", lambda w: ["sample", w.y, "-n", "1", "-o", w.out], ["no fine-tuned run"]),
    (
        "sample-missing-spec",
        lambda w: sample(w, w.y, "--spec", w.path("nope.yaml")),
        ["nope.yaml", "no such spec file"],
    ),
    (
        "sample-spec-is-a-folder",
        lambda w: sample(w, w.y, "--spec", w.folder("spec.yaml")),
        ["spec.yaml", "cannot read spec file"],
    ),
    (
        "finetune-spec-not-utf8",
        lambda w: finetune(w, "--spec", w.file("s.yaml", b"\xff\xfe\x00bad")),
        ["s.yaml", "cannot read spec file"],
    ),
    ("finetune-missing-prior", lambda w: finetune(w, prior=w.path("nope")), ["nope", "no such folder"]),
    (
        "finetune-missing-measurement",
        lambda w: finetune(w, "--measurement", w.path("nope.png")),
        ["nope.png", "no such file"],
    ),
    (
        "finetune-missing-data-root",
        lambda w: finetune(w, "--dataset", "folder", "--data-root", w.path("nope")),
        ["nope", "no such folder"],
    ),
    ("eval-missing-run", lambda w: evaluate(w, w.path("nope")), ["nope", "no such folder"]),
    ("finetune-resume-missing-run", lambda w: ["finetune", "--resume", "--run-dir", w.path("nope")], ["nope"]),
    (
        "finetune-resume-changes-the-operator",
        lambda w: ["finetune", "--resume", "--run-dir", w.run_copy(), "--sigma", "0.3", "--iterations", "2"],
        ["--resume", "operator", "0.3"],
    ),
    (
        "finetune-resume-with-other-prior-weights",
        lambda w: ["finetune", "--resume", "--run-dir", w.run_with_moved_prior(perturb_weights), "--iterations", "2"],
        ["prior", "changed since fine-tuning"],
    ),
    (
        "sample-folder-two-measurements-one-name",
        lambda w: sample(w, w.folder("ys", {"a.png": Path(w.y).read_bytes(), "a.safetensors": b""})),
        ["a.png", "a.safetensors", "both write"],
    ),
    (
        "sample-unconditional-with-a-measurement",
        lambda w: unconditional(w, w.prior, w.y),
        ["--unconditional", "measurement"],
    ),
    (
        "sample-unconditional-with-dps-zeta",
        lambda w: unconditional(w, w.prior, "--dps-zeta", "3"),
        ["--dps-zeta", "--unconditional"],
    ),
    ("eval-no-methods", lambda w: evaluate(w, None, "--methods", ","), ["methods", "at least 1"]),
    (
        "eval-gamma-sweep-without-deft",
        lambda w: evaluate(w, None, "--guidance-scale", "sweep"),
        ["--guidance-scale", "deft is not among the methods"],
    ),
    (
        "eval-dps-zeta-without-dps",
        lambda w: evaluate(w, None, "--dps-zeta", "3"),
        ["--dps-zeta", "dps is not among the methods"],
    ),
    ("sample-dps-zeta-for-deft", lambda w: sample(w, w.y, "--dps-zeta", "3"), ["--dps-zeta", "--method dps"]),
    (
        "sample-diffpir-lambda-for-dps",
        lambda w: sample(w, w.y, "--method", "dps", "--diffpir-lambda", "2"),
        ["--diffpir-lambda", "--method diffpir"],
    ),
    (
        "sample-diffpir-lambda-zero",
        lambda w: sample(w, w.y, "--method", "diffpir", "--diffpir-lambda", "0"),
        ["diffpir_lambda", "greater than 0"],
    ),
    (
        "sample-diffpir-zeta-above-one",
        lambda w: sample(w, w.y, "--method", "diffpir", "--diffpir-zeta", "1.5"),
        ["diffpir_zeta", "less than or equal to 1"],
    ),
    (
        "sample-ddrm-eta-above-one",
        lambda w: sample(w, w.y, "--method", "ddrm", "--ddrm-eta", "2"),
        ["ddrm_eta", "less than or equal to 1"],
    ),
    (
        "sample-renoise-zeta-above-one",
        lambda w: sample(w, w.y, "--sampler", "renoise", "--renoise-zeta", "1.5"),
        ["renoise_zeta", "less than or equal to 1"],
    ),
    ("sample-unknown-sampler", lambda w: sample(w, w.y, "--sampler", "heun"), ["sampler", "sde", "renoise"]),
    (
        "sample-sampler-for-dps",
        lambda w: sample(w, w.y, "--method", "dps", "--sampler", "renoise"),
        ["--sampler", "--method deft"],
    ),
    (
        "eval-diffpir-zeta-negative",
        lambda w: evaluate(w, None, "--methods", "diffpir", "--diffpir-zeta", "-0.1"),
        ["diffpir_zeta", "greater than or equal to 0"],
    ),
    (
        "eval-diffpir-lambda-without-diffpir",
        lambda w: evaluate(w, None, "--diffpir-lambda", "2"),
        ["--diffpir-lambda", "diffpir is not among the methods"],
    ),
    (
        "eval-diffpir-sweep-lambda-zero",
        lambda w: evaluate(
            w, None, "--methods", "diffpir", "--spec", w.file("e.json", json.dumps({"diffpir_sweep": {"lambdas": [0]}}))
        ),
        ["diffpir_sweep.lambdas", "greater than 0"],
    ),
    (
        "finetune-petals-with-a-data-root",
        lambda w: finetune(w, "--data-root", w.folder("imgs")),
        ["petals", "--data-root"],
    ),
    (
        "finetune-spec-section-as-a-scalar-and-a-flag-inside-it",
        lambda w: finetune(w, "--spec", w.file("s.yaml", "hnet: 8\n")),
        ["hnet", "mapping"],
    ),
    (
        "finetune-spec-key-twice-yaml",
        lambda w: finetune(w, "--spec", w.file("s.yaml", "lr: 0.1\nlr: 0.2\n")),
        ["s.yaml", "lr", "twice"],
    ),
    (
        "finetune-spec-key-twice-json",
        lambda w: finetune(w, "--spec", w.file("s.json", '{"lr": 0.1, "lr": 0.2}')),
        ["s.json", "lr", "twice"],
    ),
    ("sample-a-trillion-samples", lambda w: sample(w, w.y, "-n", str(10**12)), ["n:", "100000"]),
    ("finetune-lr-infinite", lambda w: finetune(w, "--lr", "inf"), ["lr", "finite"]),
    ("degrade-sigma-infinite", lambda w: degrade(w, w.flower, "--sigma", "inf"), ["sigma", "finite"]),
    ("degrade-seed-beyond-64-bits", lambda w: degrade(w, w.flower, "--seed", str(2**70)), ["--seed"]),
    (
        "degrade-factor-given-twice",
        lambda w: degrade(w, w.flower, "--factor", "2", "--param", "factor=4"),
        ["factor", "twice"],
    ),
    ("degrade-decompression-bomb", lambda w: degrade(w, w.huge_image()), ["huge.png", "too large"]),
    (
        "finetune-hnet-too-deep-for-the-image",
        lambda w: finetune(w, "--hnet-mult", "1,1,1,1,1,1"),
        ["--hnet-mult", "multiple of"],
    ),
    (
        "pretrain-image-size-not-a-multiple",
        lambda w: pretrain(w, "--image-size", "12", "--channel-mult", "1,1,1,1"),
        ["--image-size", "multiple of 8"],
    ),
    (
        "finetune-resume-with-iterations-already-done",
        lambda w: ["finetune", "--resume", "--run-dir", w.run_copy(), "--iterations", "1"],
        ["--iterations 1", "already trained 1 steps"],
    ),
    (
        "sample-integer-tensor-measurement",
        lambda w: sample(w, w.tensor("y8.safetensors", {"image": torch.zeros(3, 8, 8, dtype=torch.uint8)})),
        ["y8.safetensors", "uint8"],
    ),
    (
        "degrade-inpaint-observing-nothing",
        lambda w: degrade(w, w.flower, "--operator", "inpaint", "--param", "box_fraction=1"),
        ["observes no pixel"],
    ),
    (
        "degrade-kernel-larger-than-any-image",
        lambda w: degrade(w, w.flower, "--operator", "blur", "--kernel-size", "100001"),
        ["kernel_size", "1025"],
    ),
    ("finetune-lr-huge", lambda w: finetune(w, "--lr", "1e300"), ["lr", "less than or equal to 1"]),
    (
        "finetune-likelihood-weight-zero",
        lambda w: finetune(w, "--likelihood-weight", "0"),
        ["likelihood_weight", "greater than 0"],
    ),
    (
        "finetune-resume-changing-the-likelihood-weight",
        lambda w: ["finetune", "--resume", "--run-dir", w.run_copy(), "--iterations", "5", "--likelihood-weight", "3"],
        ["likelihood weight", "1.0 → 3.0"],
    ),
    (
        "eval-force-with-a-folder-named-like-an-output",
        lambda w: evaluate(w, None, "--force", out=w.folder("ev", {"grid.png/keep.txt": "mine"})),
        ["grid.png", "is a folder"],
    ),
    ("degrade-a-named-pipe", lambda w: degrade(w, w.fifo("pipe.png")), ["pipe.png", "not a regular file"]),
    (
        "finetune-folder-data-with-a-file-that-is-no-image",
        lambda w: finetune(
            w, "--dataset", "folder", "--data-root", w.folder("imgs", {f"bad{i}.png": "text" for i in range(10)})
        ),
        ["imgs", "not an image Pillow can read"],
    ),
    (
        "finetune-measurements-per-batch-with-one-measurement",
        lambda w: finetune(w, "--measurement", w.y, "--measurements-per-batch", "4"),
        ["--measurements-per-batch", "--measurement"],
    ),
    (
        "sample-run-record-without-prior",
        lambda w: sample(w, w.y, run=w.run_copy(replace_with("run.json", '{"prior": "x"}'))),
        ["run.json", "prior"],
    ),
    (
        "finetune-resume-run-record-a-list",
        lambda w: [
            "finetune",
            "--resume",
            "--run-dir",
            w.run_copy(replace_with("run.json", "[]")),
            "--iterations",
            "2",
        ],
        ["run.json", "expected a JSON object"],
    ),
    (
        "pretrain-resume-missing-out",
        lambda w: pretrain(w, "--resume", "--out", w.path("nope")),
        ["nope", "no such file"],
    ),
    # --- empty, truncated and non-image files
    ("degrade-empty-file", lambda w: degrade(w, w.file("empty.png")), ["empty.png", "not an image"]),
    ("degrade-truncated-png", lambda w: degrade(w, w.truncated("half.png", w.flower)), ["half.png", "truncated"]),
    ("degrade-text-file", lambda w: degrade(w, w.file("notes.png", "just text\n")), ["notes.png", "not an image"]),
    (
        "degrade-safetensors-as-image",
        lambda w: degrade(w, w.tensor("x.safetensors", {"image": torch.zeros(3, 32, 32)})),
        ["x.safetensors", "not an image"],
    ),
    ("sample-empty-png", lambda w: sample(w, w.file("empty.png")), ["empty.png", "not an image"]),
    ("sample-truncated-png", lambda w: sample(w, w.truncated("half.png", w.y)), ["half.png", "truncated"]),
    ("sample-text-file", lambda w: sample(w, w.file("notes.png", "just text\n")), ["notes.png", "not an image"]),
    ("sample-empty-safetensors", lambda w: sample(w, w.file("y.safetensors")), ["y.safetensors", "safetensors"]),
    (
        "sample-truncated-safetensors",
        lambda w: sample(
            w, w.truncated("y.safetensors", w.tensor("full.safetensors", {"image": torch.zeros(3, 8, 8)}))
        ),
        ["y.safetensors", "safetensors"],
    ),
    (
        "sample-measurement-with-nan",
        lambda w: sample(w, w.tensor("nan.safetensors", {"image": torch.full((3, 8, 8), float("nan"))})),
        ["nan.safetensors", "non-finite"],
    ),
    (
        "sample-safetensors-without-image",
        lambda w: sample(w, w.tensor("y.safetensors", {"pixels": torch.zeros(3, 8, 8)})),
        ["y.safetensors", "'image'"],
    ),
    (
        "finetune-truncated-measurement",
        lambda w: finetune(w, "--measurement", w.truncated("half.png", w.y)),
        ["half.png", "truncated"],
    ),
    # --- image modes a colour run cannot use
    (
        "sample-grey-L-measurement",
        lambda w: sample(w, w.image("grey.png", "L")),
        ["grey.png", "channels", "(1, 8, 8)", "(3, 8, 8)"],
    ),
    ("sample-grey-LA-measurement", lambda w: sample(w, w.image("grey_alpha.png", "LA")), ["channels", "(1, 8, 8)"]),
    ("sample-16-bit-measurement", lambda w: sample(w, w.image("deep.png", "I;16")), ["channels", "(1, 8, 8)"]),
    (
        "finetune-grey-measurement",
        lambda w: finetune(w, "--measurement", w.image("grey.png", "L")),
        ["grey.png", "channels"],
    ),
    # --- wrong measurement sizes
    (
        "sample-measurement-too-big",
        lambda w: sample(w, w.image("big.png", "RGB", (16, 16))),
        ["big.png", "(3, 16, 16)", "(3, 8, 8)", "size"],
    ),
    (
        "sample-measurement-not-square",
        lambda w: sample(w, w.image("wide.png", "RGB", (9, 8))),
        ["wide.png", "(3, 8, 9)", "size"],
    ),
    (
        "sample-measurement-2d-tensor",
        lambda w: sample(w, w.tensor("flat.safetensors", {"image": torch.zeros(8, 8)})),
        ["flat.safetensors", "(C, H, W)"],
    ),
    (
        "sample-measurement-4-channels",
        lambda w: sample(w, w.tensor("four.safetensors", {"image": torch.zeros(4, 8, 8)})),
        ["four.safetensors", "channels"],
    ),
    (
        "sample-folder-with-one-bad-size",
        lambda w: sample(
            w,
            w.folder(
                "ys", {"a.png": Path(w.y).read_bytes(), "b.png": Path(w.image("big.png", "RGB", (16, 16))).read_bytes()}
            ),
        ),
        ["b.png", "size"],
    ),
    (
        "finetune-measurement-wrong-size",
        lambda w: finetune(w, "--measurement", w.image("big.png", "RGB", (16, 16))),
        ["big.png", "size"],
    ),
    # --- operators and their parameters
    (
        "degrade-unknown-operator",
        lambda w: degrade(w, w.flower, "--operator", "warp"),
        ["warp", "superres", "blur", "inpaint"],
    ),
    ("finetune-unknown-operator", lambda w: finetune(w, "--operator", "warp"), ["warp", "superres"]),
    ("finetune-noiseless-operator", lambda w: finetune(w, "--sigma", "0"), ["--sigma", "> 0"]),
    ("check-gmm-shape-of-two", lambda w: ["check", "gmm", "--shape", "1,8"], ["--shape", "3 comma-separated"]),
    ("check-gmm-shape-zero", lambda w: ["check", "gmm", "--shape", "0,8,8"], ["--shape", "positive"]),
    ("finetune-hnet-mult-zero", lambda w: finetune(w, "--hnet-mult", "0"), ["--hnet-mult", "positive"]),
    (
        "finetune-hnet-blocks-not-dividing-the-image",
        lambda w: finetune(w, "--hnet-space-to-depth", "3"),
        ["space_to_depth 3", "divide"],
    ),
    (
        "finetune-hnet-blocks-zero",
        lambda w: finetune(w, "--hnet-space-to-depth", "0"),
        ["space_to_depth", "greater than or equal to 1"],
    ),
    (
        "finetune-hnet-start-unknown",
        lambda w: finetune(w, "--hnet-start", "half"),
        ["hnet.start", "'zero' or 'gaussian'"],
    ),
    (
        "sample-guidance-scale-negative",
        lambda w: sample(w, w.y, "--guidance-scale", "-1"),
        ["guidance_scale", "greater than or equal to 0"],
    ),
    (
        "eval-guidance-scale-not-a-number",
        lambda w: evaluate(w, None, "--guidance-scale", "lots"),
        ["guidance_scale", "a number ≥ 0 or 'sweep'"],
    ),
    ("check-gmm-unknown-operator", lambda w: ["check", "gmm", "--operator", "warp"], ["warp", "superres"]),
    (
        "check-gmm-kept-input-exists",
        lambda w: [*GMM_QUICK, "--run-dir", str(Path(w.file("g-y.safetensors", b"precious")).with_name("g"))],
        ["g-y.safetensors", "exists"],
    ),
    (
        "check-gmm-run-dir-not-empty",
        lambda w: [*GMM_QUICK, "--run-dir", w.folder("g", {"notes.txt": "mine"})],
        ["not empty"],
    ),
    ("degrade-factor-0", lambda w: degrade(w, w.flower, "--factor", "0"), ["factor", "greater than or equal to 2"]),
    ("degrade-factor-1", lambda w: degrade(w, w.flower, "--factor", "1"), ["factor", "greater than or equal to 2"]),
    ("degrade-factor-3-on-32px", lambda w: degrade(w, w.flower, "--factor", "3"), ["factor 3", "32x32"]),
    ("finetune-factor-3-on-16px-prior", lambda w: finetune(w, "--factor", "3"), ["factor 3", "16x16"]),
    ("degrade-factor-not-a-number", lambda w: degrade(w, w.flower, "--factor", "two"), ["--factor", "valid int"]),
    (
        "degrade-sigma-negative",
        lambda w: degrade(w, w.flower, "--sigma", "-0.1"),
        ["sigma", "greater than or equal to 0"],
    ),
    (
        "degrade-mask-wrong-size",
        lambda w: degrade(w, w.flower, "--operator", "inpaint", "--mask", w.image("mask.png", "L", (16, 16))),
        ["mask", "16x16", "32x32"],
    ),
    (
        "degrade-mask-missing",
        lambda w: degrade(w, w.flower, "--operator", "inpaint", "--mask", w.path("nomask.png")),
        ["nomask.png", "mask"],
    ),
    (
        "degrade-mask-not-an-image",
        lambda w: degrade(w, w.flower, "--operator", "inpaint", "--mask", w.file("mask.png", "text")),
        ["mask.png", "not a readable image"],
    ),
    (
        "degrade-even-kernel-size",
        lambda w: degrade(w, w.flower, "--operator", "blur", "--kernel-size", "4"),
        ["kernel_size", "odd"],
    ),
    (
        "degrade-kernel-missing-file",
        lambda w: degrade(w, w.flower, "--operator", "blur", "--kernel", w.path("k.png")),
        ["k.png", "kernel"],
    ),
    ("degrade-unknown-param-key", lambda w: degrade(w, w.flower, "--param", "bogus=1"), ["bogus", "unknown parameter"]),
    ("degrade-param-without-value", lambda w: degrade(w, w.flower, "--param", "factor"), ["key=value"]),
    ("degrade-param-wrong-type", lambda w: degrade(w, w.flower, "--param", "factor=two"), ["factor", "two"]),
    (
        "degrade-flag-of-another-operator",
        lambda w: degrade(w, w.flower, "--operator", "blur", "--factor", "2"),
        ["factor", "unknown parameter"],
    ),
    ("degrade-unknown-output-format", lambda w: degrade(w, w.flower, out=w.path("y.xyz")), ["y.xyz", "format"]),
    (
        "finetune-spec-unknown-operator-param",
        lambda w: finetune(w, "--spec", w.file("s.yaml", "operator: {params: {bogus: 1}}\n")),
        ["bogus", "unknown parameter"],
    ),
    (
        "finetune-spec-boolean-operator-param",
        lambda w: finetune(w, "--spec", w.file("s.yaml", "operator: {params: {sigma: true}}\n")),
        ["sigma", "not the boolean true"],
    ),
    ("finetune-unknown-device", lambda w: finetune(w, "--device", "quantum"), ["quantum", "device"]),
    ("sample-unknown-method", lambda w: sample(w, w.y, "--method", "magic"), ["method", "magic"]),
    ("eval-unknown-method", lambda w: evaluate(w, None, "--methods", "deft,magic"), ["methods", "magic"]),
    ("eval-unknown-split", lambda w: evaluate(w, None, "--split", "holdout"), ["split", "holdout"]),
    # --- spec files (every command that takes --spec)
    *spec_cases(),
    (
        "finetune-spec-nested-unknown-key",
        lambda w: finetune(w, "--spec", w.file("s.yaml", "operator: {name: superres, bogus: 1}\n")),
        ["operator.bogus", "unknown field"],
    ),
    ("finetune-spec-a-list", lambda w: finetune(w, "--spec", w.file("s.yaml", "- 1\n- 2\n")), ["mapping"]),
    (
        "finetune-spec-bad-json",
        lambda w: finetune(w, "--spec", w.file("s.json", "{bad json")),
        ["s.json", "not a valid json"],
    ),
    (
        "finetune-spec-out-of-range",
        lambda w: finetune(w, "--spec", w.file("s.yaml", "lr: -1\n")),
        ["s.yaml", "lr", "greater than 0", "-1"],
    ),
    (
        "finetune-flag-out-of-range-with-a-spec",
        lambda w: finetune(w, "--spec", w.file("s.yaml", "seed: 1\n"), "--lr", "-1"),
        ["options: lr", "greater than 0"],
    ),
    # --- broken run folders (sample and eval)
    *bad_run_cases(),
    (
        "finetune-resume-spec-json-a-list",
        lambda w: ["finetune", "--resume", "--run-dir", w.run_copy(replace_with("spec.json", "[]")), "--quiet"],
        ["spec.json", "object"],
    ),
    (
        "finetune-resume-spec-json-garbled",
        lambda w: ["finetune", "--resume", "--run-dir", w.run_copy(replace_with("spec.json", "{")), "--quiet"],
        ["spec.json", "not valid json"],
    ),
    (
        "finetune-resume-state-truncated",
        lambda w: [
            "finetune",
            "--resume",
            "--run-dir",
            w.run_copy(cut_in_half("state_last.safetensors")),
            "--iterations",
            "2",
            "--quiet",
        ],
        ["state_last.safetensors", "truncated"],
    ),
    (
        "finetune-resume-state-from-bigger-hnet",
        lambda w: [
            "finetune",
            "--resume",
            "--run-dir",
            w.run_copy(
                checkpoint_from(lambda w: w.assets.other_run / "state_last.safetensors", "state_last.safetensors")(w)
            ),
            "--iterations",
            "2",
            "--quiet",
        ],
        ["state_last.safetensors", "does not match"],
    ),
    (
        "sample-run-prior-deleted",
        lambda w: sample(w, w.y, run=w.run_with_moved_prior(shutil.rmtree)),
        ["prior_copy", "no such folder"],
    ),
    (
        "sample-run-prior-weights-changed",
        lambda w: sample(w, w.y, run=w.run_with_moved_prior(perturb_weights)),
        ["prior", "changed since fine-tuning"],
    ),
    (
        "sample-prior-given-for-run-missing",
        lambda w: sample(w, w.y, "--prior", w.path("nope")),
        ["nope", "no such folder"],
    ),
    (
        "sample-prior-given-for-run-other-weights",
        lambda w: sample(w, w.y, "--prior", w.prior_copy(perturb_weights)),
        ["prior", "changed since fine-tuning"],
    ),
    # --- priors
    (
        "sample-prior-wrong-format",
        lambda w: unconditional(w, w.folder("weird", {"weights.bin": b"1234"})),
        ["weird", "unrecognised"],
    ),
    (
        "sample-prior-is-a-file",
        lambda w: unconditional(w, w.file("prior.bin", b"1234")),
        ["prior.bin", "expected a folder"],
    ),
    (
        "sample-prior-config-garbled",
        lambda w: unconditional(w, w.prior_copy(replace_with("config.json", "{oops"))),
        ["config.json", "not valid json"],
    ),
    (
        "sample-prior-weights-truncated",
        lambda w: unconditional(w, w.prior_copy(cut_in_half("model.safetensors"))),
        ["model.safetensors", "truncated"],
    ),
    (
        "sample-prior-config-mismatch",
        lambda w: unconditional(
            w, w.prior_copy(edit_json("config.json", lambda d: d["unet"].update(model_channels=16)))
        ),
        ["do not match", "shape mismatch"],
    ),
    (
        "sample-prior-original-format-bad-report",
        lambda w: unconditional(w, w.folder("orig", {"model.pt": b"x", "report.yaml": "model: [1\n"})),
        ["report.yaml"],
    ),
    ("sample-prior-pickle-os-system", lambda w: unconditional(w, w.evil_prior("system")), ["model.pt", "refused"]),
    ("finetune-prior-pickle-path-touch", lambda w: finetune(w, prior=w.evil_prior("touch")), ["model.pt", "refused"]),
    # --- outputs that exist or cannot be written
    (
        "degrade-output-exists",
        lambda w: degrade(w, w.flower, out=w.file("existing.png", b"previous bytes")),
        ["existing.png", "exists"],
    ),
    (
        "degrade-output-is-a-folder",
        lambda w: degrade(w, w.flower, out=w.folder("outdir", {"keep.txt": "mine"})),
        ["outdir", "is a folder"],
    ),
    (
        "degrade-output-parent-is-a-file",
        lambda w: degrade(w, w.flower, out=w.file("plain", "mine") + "/y.png"),
        ["plain", "cannot write"],
    ),
    (
        "degrade-force-onto-a-folder",
        lambda w: degrade(w, w.flower, "--force", out=w.folder("outdir.png", {"keep.txt": "mine"})),
        ["outdir.png", "is a folder"],
    ),
    (
        "sample-output-has-previous-outputs",
        lambda w: sample(w.previous(["sample_000.png", "mean.png", "std.png", "summary.json"]), w.y),
        ["exists", "--force"],
    ),
    (
        "sample-output-has-a-previous-later-sample",
        lambda w: sample(w.previous(["sample_002.png"]), w.y, "-n", "3"),
        ["sample_002.png", "exists"],
    ),
    (
        "sample-folder-output-has-previous",
        lambda w: sample(
            w.previous(["a/mean.png"]),
            w.folder("ys", {"a.png": Path(w.y).read_bytes(), "b.png": Path(w.y).read_bytes()}),
        ),
        ["mean.png", "exists"],
    ),
    (
        "sample-unconditional-output-has-previous",
        lambda w: unconditional(w.previous(["grid.png"]), w.prior),
        ["grid.png", "exists"],
    ),
    ("sample-output-is-a-file", lambda w: sample(w, w.y, "-o", w.file("out.txt", "mine")), ["out.txt", "not a folder"]),
    (
        "sample-output-parent-is-a-file",
        lambda w: sample(w, w.y, "-o", w.file("plain", "mine") + "/out"),
        ["plain", "cannot"],
    ),
    (
        "sample-unconditional-output-parent-is-a-file",
        lambda w: unconditional(w, w.prior, "-o", w.file("plain", "mine") + "/out"),
        ["plain", "cannot"],
    ),
    ("eval-output-not-empty", lambda w: evaluate(w.previous(["results.json"])), ["exists", "not empty"]),
    ("eval-output-is-a-file", lambda w: evaluate(w, out=w.file("out.txt", "mine")), ["out.txt", "not a folder"]),
    ("eval-output-parent-is-a-file", lambda w: evaluate(w, out=w.file("plain", "mine") + "/out"), ["plain", "cannot"]),
    (
        "finetune-run-dir-not-empty",
        lambda w: finetune(w, "--run-dir", w.folder("busy", {"notes.txt": "mine"})),
        ["busy", "not empty"],
    ),
    (
        "finetune-run-dir-parent-is-a-file",
        lambda w: finetune(w, "--run-dir", w.file("plain", "mine") + "/run"),
        ["plain", "cannot be created"],
    ),
    (
        "finetune-run-dir-is-a-file",
        lambda w: finetune(w, "--run-dir", w.file("run.txt", "mine")),
        ["run.txt", "not a folder"],
    ),
    (
        "pretrain-out-not-empty",
        lambda w: pretrain(w, "--out", w.folder("busy", {"notes.txt": "mine"})),
        ["busy", "not empty"],
    ),
    (
        "pretrain-out-is-a-file",
        lambda w: pretrain(w, "--out", w.file("prior.txt", "mine")),
        ["prior.txt", "not a folder"],
    ),
    (
        "pretrain-out-parent-is-a-file",
        lambda w: pretrain(w, "--out", w.file("plain", "mine") + "/prior"),
        ["plain", "cannot be created"],
    ),
]

# Where the process itself matters: the console entry's exit status, and a pickle payload's side effect.
IN_A_REAL_PROCESS = {"sample-prior-pickle-os-system", "degrade-output-exists"}


def matrix_params() -> list:
    params = []
    for case_id, build, needles in MATRIX:
        params.append(pytest.param(build, needles, id=case_id))
    return params


def test_case_ids_are_unique():
    ids = [case[0] for case in MATRIX]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    assert IN_A_REAL_PROCESS <= set(ids)


@pytest.mark.parametrize("build, needles", matrix_params())
def test_bad_input(request, build, needles, assets, tmp_path, monkeypatch, run_cli, record_property):
    monkeypatch.chdir(tmp_path)  # default outputs (runs/, out/) would land here
    w = Workspace(tmp_path, assets)
    argv = [str(a) for a in build(w)]
    before = snapshot(tmp_path, assets.root)
    if request.node.callspec.id in IN_A_REAL_PROCESS:
        result = subprocess.run(
            [sys.executable, "-m", "deftcli", *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        code, out, err = result.returncode, result.stdout, result.stderr
    else:
        code, out, err = run_cli(*argv)
    record_property("stderr", err.strip())  # the matrix report: pytest --junitxml=FILE keeps case → message
    assert_user_error(code, err, *needles)
    assert "Traceback" not in out
    assert not (tmp_path / "pwned").exists(), "unpickling ran code"
    assert snapshot(tmp_path, assets.root) == before, "a file was created, changed or removed"


# ------------------------------------------------------------------ conversions that are accepted


def expected_unit(mode: str, img: Image.Image) -> np.ndarray:
    """(C, H, W) in [0, 1], computed here independently of deftcli.images."""
    if mode == "L":
        return np.asarray(img, np.float64)[None] / 255
    if mode == "LA":
        la = np.asarray(img, np.float64) / 255
        return (la[..., 0] * la[..., 1])[None]
    if mode == "I;16":
        return np.asarray(img, np.float64)[None] / 65535
    if mode == "P":
        return np.asarray(img.convert("RGB"), np.float64).transpose(2, 0, 1) / 255
    rgba = np.asarray(img, np.float64) / 255  # RGBA: composited onto black
    return (rgba[..., :3] * rgba[..., 3:]).transpose(2, 0, 1)


@pytest.mark.parametrize("mode, channels", [("L", 1), ("LA", 1), ("I;16", 1), ("P", 3), ("RGBA", 3)])
def test_degrade_converts_every_image_mode(run_cli, tmp_path, mode, channels):
    """L, LA, I;16 → one channel; P, RGBA → RGB; alpha onto black; 16-bit values keep their precision."""
    img = pil_image(mode, (32, 32), seed=3)
    img.save(tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as reread:  # what the file holds (P and I;16 round-trip unchanged)
        assert reread.mode == mode
        truth = expected_unit(mode, reread)
    out = tmp_path / "y.safetensors"
    code, _, err = run_cli("degrade", str(tmp_path / "x.png"), "--factor", "2", "--sigma", "0", "-o", str(out))
    assert code == 0, err
    y = read_tensor(out)
    want = torch.nn.functional.avg_pool2d(torch.from_numpy(2 * truth - 1)[None], 2)[0].float()
    assert y.shape == (channels, 16, 16)
    assert torch.allclose(y, want, atol=1e-5)
    if mode == "I;16":  # 16-bit precision is kept: reading through 8 bits would be off by up to 1/255 per pixel
        eight_bit = torch.from_numpy(2 * np.round(truth * 255) / 255 - 1)
        assert (y - torch.nn.functional.avg_pool2d(eight_bit[None], 2)[0].float()).abs().max() > 1e-3


def test_sample_converts_an_rgba_measurement_to_rgb(run_cli, assets, tmp_path):
    rgba = pil_image("RGBA", (8, 8), seed=5)
    rgba.save(tmp_path / "y.png")
    expected = torch.from_numpy(2 * expected_unit("RGBA", rgba) - 1).float()
    assert torch.allclose(read_measurement(tmp_path / "y.png"), expected, atol=1e-6)
    code, out, err = run_cli(
        "sample",
        str(tmp_path / "y.png"),
        "--run",
        str(assets.run),
        "-n",
        "2",
        "--steps",
        "3",
        "--device",
        "cpu",
        "-o",
        str(tmp_path / "s"),
    )
    assert code == 0, err
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert len(summary["data_residual"]) == 2
    assert all((tmp_path / "s" / name).exists() for name in ("sample_000.png", "sample_001.png", "mean.png", "std.png"))


def test_sample_finds_a_moved_prior_through_prior_and_records_it(run_cli, assets, tmp_path):
    moved = tmp_path / "moved_prior"
    shutil.copytree(assets.prior, moved)
    code, _, err = run_cli(
        "sample",
        str(assets.y),
        "--run",
        str(assets.run),
        "--prior",
        str(moved),
        "-n",
        "1",
        "--steps",
        "3",
        "--device",
        "cpu",
        "-o",
        str(tmp_path / "s"),
    )
    assert code == 0, err
    recorded = json.loads((tmp_path / "s" / "summary.json").read_text())["prior"]
    assert recorded["path"] == str(moved)
    assert recorded["sha256"] == json.loads((assets.run / "run.json").read_text())["prior"]["sha256"]


def test_sample_converts_a_palette_measurement_to_rgb(run_cli, assets, tmp_path):
    palette = pil_image("P", (8, 8), seed=6)
    palette.save(tmp_path / "y.png")
    expected = torch.from_numpy(2 * expected_unit("P", palette) - 1).float()
    assert torch.allclose(read_measurement(tmp_path / "y.png"), expected, atol=1e-6)
    code, _, err = run_cli(
        "sample",
        str(tmp_path / "y.png"),
        "--run",
        str(assets.run),
        "-n",
        "1",
        "--steps",
        "3",
        "--device",
        "cpu",
        "-o",
        str(tmp_path / "s"),
    )
    assert code == 0, err
    assert (tmp_path / "s" / "mean.png").exists()


def test_a_run_keeps_its_mask_file_so_it_works_from_any_folder_and_ignores_later_edits(
    run_cli, assets, tmp_path, monkeypatch
):
    mask = np.zeros((16, 16), np.uint8)
    mask[:, :8] = 255  # left half observed
    Image.fromarray(mask).save(tmp_path / "mask.png")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(
        "finetune",
        "--prior",
        str(assets.prior),
        "--operator",
        "inpaint",
        "--mask",
        "mask.png",
        "--iterations",
        "1",
        "--time-steps",
        "3",
        "--measurements-per-batch",
        "1",
        "--trajectories",
        "2",
        "--hnet-channels",
        "8",
        "--hnet-mult",
        "1",
        "--device",
        "cpu",
        "--run-dir",
        "run",
        "--quiet",
    )
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "spec.json").read_text())["operator"]["params"]["mask"] == "operator-mask.png"
    Image.fromarray(255 - mask).save(tmp_path / "mask.png")  # edited after fine-tuning: the run keeps its copy
    y = torch.zeros(3, 16, 16)
    y[:, :, :8] = 0.5  # a measurement through the kept mask: A†y fits it exactly; through the edited mask it would not
    save_file({"image": y}, str(tmp_path / "y.safetensors"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli(
        "sample",
        str(tmp_path / "y.safetensors"),
        "--run",
        str(tmp_path / "run"),
        "-n",
        "1",
        "--steps",
        "3",
        "--method",
        "dagger",
        "--device",
        "cpu",
        "-o",
        "s",
    )
    assert code == 0, err
    assert json.loads((elsewhere / "s" / "summary.json").read_text())["data_residual"] == [0.0]


def test_eval_accepts_the_largest_seed(run_cli, assets, tmp_path):
    code, _, err = run_cli(
        "eval",
        "--run",
        str(assets.run),
        "--n",
        "1",
        "-k",
        "1",
        "--methods",
        "deft",
        "--steps",
        "3",
        "--device",
        "cpu",
        "--seed",
        str(2**63 - 1),
        "-o",
        str(tmp_path / "e"),
    )
    assert code == 0, err


def test_force_overwrites_only_when_asked(run_cli, assets, tmp_path):
    """The refusals above are about silence: --force replaces the previous outputs."""
    out = tmp_path / "s"
    out.mkdir()
    (out / "mean.png").write_bytes(b"previous")
    code, _, err = run_cli(
        "sample",
        str(assets.y),
        "--run",
        str(assets.run),
        "-n",
        "1",
        "--steps",
        "3",
        "--device",
        "cpu",
        "-o",
        str(out),
        "--force",
    )
    assert code == 0, err
    assert (out / "mean.png").read_bytes() != b"previous"
