"""The UNet and c_ψ(t): state-dict compatible with the original research code, output divided by σ(t)."""

from pathlib import Path

import pytest
import torch
import yaml
from conftest import upstream
from safetensors.torch import load_file

from deftcli.sde import VPSDE
from deftcli.unet import TimeScaling, TimeScalingConfig, UNet, UNetConfig

REFERENCE = Path(__file__).parent / "data" / "original_cond_model_reference.safetensors"


def original_cond_config() -> UNetConfig:
    report = yaml.safe_load(upstream("cond_weights_rtb/report.yaml").read_text())
    return UNetConfig.model_validate(report["model"])


def test_original_h_network_and_time_model_load_strictly():
    unet = UNet(original_cond_config(), VPSDE().sigma)
    state = torch.load(upstream("cond_weights_rtb/cond_model.pt"), weights_only=True, map_location="cpu")
    unet.load_state_dict(state, strict=True)
    report = yaml.safe_load(upstream("cond_weights_rtb/report.yaml").read_text())
    time_model = TimeScaling(TimeScalingConfig(time_embedding_dim=report["time_embedding_dim"]))
    time_state = torch.load(upstream("cond_weights_rtb/time_model.pt"), weights_only=True, map_location="cpu")
    time_model.load_state_dict(time_state, strict=True)


def test_outputs_equal_the_original_code_for_its_weights():
    """Reference outputs were produced once by the original UNetModel / ScaleModel on fixed inputs."""
    ref = load_file(str(REFERENCE))
    unet = UNet(original_cond_config(), VPSDE().sigma).eval()
    unet.load_state_dict(torch.load(upstream("cond_weights_rtb/cond_model.pt"), weights_only=True, map_location="cpu"))
    time_model = TimeScaling(TimeScalingConfig())
    time_model.load_state_dict(
        torch.load(upstream("cond_weights_rtb/time_model.pt"), weights_only=True, map_location="cpu")
    )
    with torch.no_grad():
        assert torch.allclose(unet(ref["x"], ref["t"]), ref["unet_out"], rtol=1e-4, atol=1e-5)
        assert torch.allclose(time_model(ref["t"]).reshape(-1, 1), ref["time_scaling_out"], rtol=1e-5, atol=1e-7)


def test_original_prior_config_has_the_documented_shapes():
    report = yaml.safe_load(upstream("model_weights/report.yaml").read_text())
    config = UNetConfig.model_validate(report["model"])
    assert config.num_parameters() > 9_000_000  # 64 channels, [1, 2, 4]
    keys = UNet(config, None).state_dict()
    assert keys["input_blocks.0.0.weight"].shape == (64, 3, 3, 3)
    assert keys["middle_block.1.qkv.weight"].shape == (768, 256, 1)  # the middle block always has attention


def test_output_is_divided_by_sigma_t():
    torch.manual_seed(0)
    config = UNetConfig(model_channels=8, channel_mult=(1, 2), norm_groups=8)
    sde = VPSDE()
    scaled, bare = UNet(config, sde.sigma), UNet(config, None)
    for p in scaled.parameters():
        torch.nn.init.normal_(p, std=0.1)
    bare.load_state_dict(scaled.state_dict())
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0.01, 0.5, 1.0])
    assert torch.allclose(scaled(x, t), bare(x, t) / sde.sigma(t)[:, None, None, None], rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    config = UNetConfig(model_channels=8, channel_mult=(1, 2), norm_groups=8, attention_resolutions=(2,))
    net = UNet(config, VPSDE().sigma)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.8])
    grads = []
    for enabled in (False, True):
        net.zero_grad()
        net.set_gradient_checkpointing(enabled)
        net(x, t).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_time_scaling_starts_near_init_scale_and_vanishes_at_t_one():
    c = TimeScaling(TimeScalingConfig(init_scale=5e-3))
    values = c(torch.tensor([0.0, 1.0])).detach().flatten().tolist()
    assert values[0] == pytest.approx(torch.nn.functional.silu(torch.tensor(5e-3)).item(), rel=1e-5)
    assert values[1] == 0.0
