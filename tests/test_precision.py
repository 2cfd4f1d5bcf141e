"""bf16 networks on the CPU stay close to float32, compiled networks equal eager ones, and precision choices by CPU.

Tolerances: bf16 keeps 8 bits of mantissa (relative rounding 2⁻⁸ ≈ 0.4 %), so a network output is
compared with its float32 value to 3 % of its largest magnitude, and a few sampler steps and a
VarGrad gradient (direction) likewise; a compiled graph reorders float32 arithmetic only (1e-4).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import assert_user_error

from deftcli import devices
from deftcli.devices import CPUFeatures, Runtime, resolve_precision
from deftcli.errors import DeftError
from deftcli.htransform import HTransform, HTransformConfig
from deftcli.methods import SamplingSetup, build_sampler
from deftcli.operators import create
from deftcli.priors import load_prior
from deftcli.samplers import GeneratorNoise
from deftcli.sde import VPSDE, reverse_time_grid
from deftcli.soc import accumulate_vargrad_gradient, data_term, rollout, vargrad_weights
from deftcli.specs import HNetSpec

BF16_TOLERANCE = 0.03
CPU = torch.device("cpu")


def bf16() -> Runtime:
    return Runtime(CPU, precision="bf16", requested_precision="bf16")


def tiny_htransform(seed: int = 0) -> HTransform:
    torch.manual_seed(seed)
    spec = HNetSpec(model_channels=8, channel_mult=(1,), time_embedding_dim=16, time_hidden=16, space_to_depth=1)
    h = HTransform(HTransformConfig.from_spec(spec, (3, 16, 16), 0.005), VPSDE())
    with torch.no_grad():  # leave the zero-initialised output layers: make h non-trivial
        for p in h.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return h


def images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).abs().max() / reference.abs().max())


@pytest.fixture
def inputs():
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(4, 3, 16, 16, generator=gen), torch.randn(4, 3, 16, 16, generator=gen)
    return x, torch.tensor([0.05, 0.3, 0.6, 0.95]), g


def test_bf16_prior_score_is_float32_and_within_tolerance_of_fp32(tiny_prior, inputs):
    x, t, _ = inputs
    exact, low = load_prior(tiny_prior), load_prior(tiny_prior)
    bf16().adapt(low)
    with torch.no_grad():
        reference, value = exact.score(x, t), low.score(x, t)
    assert value.dtype == torch.float32
    assert not torch.equal(value, reference)  # the network did run in bf16
    assert relative_error(value, reference) < BF16_TOLERANCE


def test_bf16_h_network_is_float32_and_within_tolerance_of_fp32(inputs):
    x, t, g = inputs
    exact, low = tiny_htransform(), tiny_htransform()
    bf16().adapt(low)
    with torch.no_grad():
        reference, value = exact(x, t, g), low(x, t, g)
    assert value.dtype == torch.float32
    assert not torch.equal(value, reference)
    assert relative_error(value, reference) < BF16_TOLERANCE
    assert low.state_dict().keys() == exact.state_dict().keys()  # checkpoints are unchanged by the adaptation


@pytest.mark.parametrize("method", ["deft", "dps"])
def test_a_few_bf16_sampler_steps_stay_within_tolerance_of_fp32(tiny_prior, method):
    operator = create("superres", factor=2, sigma=0.1)
    y = operator.measure(images(2), generator=torch.Generator().manual_seed(2))
    samples = []
    for runtime in (Runtime(CPU), bf16()):
        prior, h = load_prior(tiny_prior), tiny_htransform()
        runtime.adapt(prior, h)
        sampler = build_sampler(method, SamplingSetup(prior, steps=5), operator, h, {"dps_zeta": 1.0})
        samples.append(sampler.sample(y, GeneratorNoise(torch.Generator().manual_seed(3))))
    assert relative_error(samples[1], samples[0]) < BF16_TOLERANCE


def test_one_bf16_vargrad_gradient_points_where_the_fp32_gradient_does(tiny_prior):
    operator = create("superres", factor=2, sigma=0.1)
    y = operator.measure(images(2), generator=torch.Generator().manual_seed(2)).repeat_interleave(3, 0)
    groups = torch.arange(2).repeat_interleave(3)
    grid = reverse_time_grid(6)
    x_init = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    gradients = []
    for runtime in (Runtime(CPU), bf16()):
        prior, h = load_prior(tiny_prior), tiny_htransform()
        runtime.adapt(prior, h)
        traj = rollout(prior, h, operator, y, x_init, grid, GeneratorNoise(torch.Generator().manual_seed(9)), [1, 3, 4])
        assert traj.t3.dtype == torch.float32
        weights = vargrad_weights(traj.log_rnd(data_term(operator, traj.x_final, y)), groups, 1e12, 0.3).weights
        accumulate_vargrad_gradient(h, prior, grid, traj.stored, weights)
        gradients.append(torch.cat([p.grad.flatten() for p in h.parameters() if p.grad is not None]))
    fp32, low = gradients
    cosine = float(torch.nn.functional.cosine_similarity(fp32, low, dim=0))
    assert cosine > 0.99
    assert abs(float(low.norm() / fp32.norm()) - 1) < 0.05


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile's CPU backend needs a C++ compiler",
)
def test_compiled_prior_score_equals_eager(tiny_prior, inputs):
    x, t, _ = inputs
    eager, compiled = load_prior(tiny_prior), load_prior(tiny_prior)
    Runtime(CPU, compile=True).adapt(compiled)
    with torch.no_grad():
        reference, value = eager.score(x, t), compiled.score(x, t)
    assert relative_error(value, reference) < 1e-4


def features(*flags: str) -> CPUFeatures:
    return CPUFeatures("test cpu", "AVX512" if flags else "AVX2", flags, bool(flags))


@pytest.mark.parametrize(("flags", "expected"), [((), "fp32"), (("avx512_bf16",), "bf16"), (("amx_bf16",), "bf16")])
def test_auto_precision_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, flags, expected):
    monkeypatch.setattr(devices, "cpu_features", lambda: features(*flags))
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("fp32", CPU) == "fp32"


def test_auto_precision_is_fp32_on_cuda_even_with_a_bf16_cpu(monkeypatch):
    monkeypatch.setattr(devices, "cpu_features", lambda: features("amx_bf16"))
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"


def test_bf16_on_a_cpu_without_native_bf16_runs_after_one_warning_line(monkeypatch, capsys):
    monkeypatch.setattr(devices, "cpu_features", lambda: features())
    devices.warn_emulated_bf16.cache_clear()
    assert resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("bf16", CPU) == "bf16"
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no native bf16" in err and "slower" in err
    devices.warn_emulated_bf16.cache_clear()


def test_bf16_on_mps_is_refused():
    with pytest.raises(DeftError, match="not on MPS"):
        resolve_precision("bf16", torch.device("mps"))


def test_an_unknown_precision_is_a_one_line_error(run_cli, tmp_path):
    code, _, err = run_cli("sample", "--unconditional", "--precision", "fp16", "-o", str(tmp_path / "out"))
    assert_user_error(code, err, "precision", "fp16")


def test_finetune_at_bf16_records_the_precision_and_the_cpu_in_run_json(run_cli, tiny_prior, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(
        "finetune",
        "--prior",
        str(tiny_prior),
        "--operator",
        "superres",
        "--factor",
        "2",
        "--iterations",
        "1",
        "--time-steps",
        "4",
        "--trajectories",
        "2",
        "--measurements-per-batch",
        "1",
        "--hnet-channels",
        "8",
        "--hnet-mult",
        "1",
        "--precision",
        "bf16",
        "--run-dir",
        str(run_dir),
        "--quiet",
    )
    assert code == 0, err
    runtime = json.loads((run_dir / "run.json").read_text())["runtime"]
    assert runtime["precision"] == runtime["precision_requested"] == "bf16" and runtime["compile"] is False
    assert runtime["cpu"]["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert ("no native bf16" in err) == (not runtime["cpu"]["native_bf16"])
