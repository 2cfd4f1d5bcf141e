"""Shared fixtures: paths to the upstream files, tiny priors, and a CLI runner that returns (code, out, err)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "upstream"

torch.set_num_threads(min(2, torch.get_num_threads()))


def upstream(path: str) -> Path:
    """A file of ../shared/upstream, or skip the test when the shared folder is absent."""
    p = SHARED / path
    if not p.exists():
        pytest.skip(f"{p} not available (../shared/upstream is absent in this checkout)")
    return p


@pytest.fixture
def run_cli(capsys):
    """Run `deft ARGS` in-process through the real entry point; returns (exit code, stdout, stderr)."""
    from deftcli.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def assert_user_error(code: int, err: str, *needles: str) -> None:
    """Exit code 2, exactly one line on stderr, no traceback, and the line names the problem."""
    assert code == 2, f"exit code {code}, stderr: {err}"
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"


@pytest.fixture
def python() -> str:
    return sys.executable
