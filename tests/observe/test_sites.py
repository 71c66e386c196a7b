"""Locating activation sites, and refusing what cannot sit between spiking neurons."""

import pytest
import timm
import torch
from torch import nn

import nets
import pconv
from pconv import UnsupportedModelError, find_sites


def test_sites_in_execution_order_with_channels():
    model = nets.vgg_small()
    sites = find_sites(model, torch.randn(1, 3, 32, 32))
    assert [s.name for s in sites] == ["features.2", "features.6", "features.9", "features.13", "relu"]
    assert [s.channels for s in sites] == [16, 16, 32, 32, 64]
    assert [s.activation for s in sites] == ["relu", "relu6", "relu", "relu", "relu"]
    assert sites[1].cap == 6.0 and sites[0].cap is None
    assert sites[-1].ndim == 2


def test_timm_batchnormact_children_are_sites():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    sites = find_sites(model, torch.randn(1, 3, 64, 64))
    assert len(sites) == 33
    assert sites[0].name == "bn1.act" and sites[0].activation == "relu6"
    assert all(s.name.endswith(".act") for s in sites)


def test_timm_resnet_sites():
    sites = find_sites(nets.timm_resnet(), torch.randn(1, 3, 32, 32))
    assert len(sites) == 12 and sites[0].name == "conv1.2" and sites[-1].name == "layer4.0.act2"


def test_unused_activation_is_not_a_site():
    model = nets.vgg_small()
    model.spare = nn.ReLU()
    assert "spare" not in [s.name for s in find_sites(model, torch.randn(1, 3, 32, 32))]


REFUSED = {
    "gelu": (lambda: nets.WithAct(nn.GELU()), "act", "gelu"),
    "silu": (lambda: nets.WithAct(nn.SiLU()), "act", "silu"),
    "hardswish": (lambda: nets.WithAct(nn.Hardswish()), "act", "hardswish"),
    "sigmoid_gate": (lambda: nets.WithAct(nets.SqueezeExcite(4)), "act", "sigmoid"),
    "layernorm": (lambda: nets.WithAct(nets.ChannelNorm(4)), "act.norm", "layer_norm"),
    "product": (lambda: nets.WithAct(nets.Squared()), "act", "multiplies two input-dependent tensors"),
    "functional_relu": (nets.FunctionalReLU, "<model>", "applies relu functionally"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusals_name_the_module(case):
    make, path, words = REFUSED[case]
    model = make().eval()
    with pytest.raises(UnsupportedModelError) as info:
        find_sites(model, torch.randn(1, 3, 12, 12))
    assert info.value.module_path == path
    assert path in info.value.message and words in info.value.message
    assert info.value.hint


def test_refused_before_any_calibration_work():
    """convert() refuses after looking at one image: the rest of the data is never pulled."""
    pulled = []

    def batches():
        for i in range(100):
            pulled.append(i)
            yield torch.randn(2, 3, 12, 12)

    with pytest.raises(UnsupportedModelError, match="act"):
        pconv.convert(nets.WithAct(nn.GELU()).eval(), batches(), time_steps=4)
    assert pulled == [0]


def test_timm_models_with_silu_are_refused():
    model = timm.create_model("efficientnet_b0", pretrained=False).eval()
    with pytest.raises(UnsupportedModelError, match=r"bn1\.act \(SiLU\)"):
        find_sites(model, torch.randn(1, 3, 32, 32))


def test_model_without_relu_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2)).eval()
    with pytest.raises(UnsupportedModelError, match="no nn.ReLU"):
        find_sites(model, torch.randn(1, 3, 2, 2))


def test_a_module_called_twice_is_two_sites():
    """timm and torchvision reuse one nn.ReLU within a block: each call gets its own site, in call order."""
    sites = find_sites(nets.SharedReLU().eval(), torch.randn(1, 3, 12, 12))
    assert [s.name for s in sites] == ["relu", "relu#2"]
    assert [s.encoding for s in sites] == [True, False]


def test_interpolation_is_linear_and_converts():
    """Nearest and bilinear upsampling are linear in their input: they commute with the time-mean."""
    class Upsampled(nn.Module):
        def __init__(self, mode):
            super().__init__()
            self.conv1, self.relu1 = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
            self.up = nn.Upsample(scale_factor=2, mode=mode)
            self.conv2, self.relu2 = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.relu2(self.conv2(self.up(self.relu1(self.conv1(x))))).mean((2, 3)))

    for mode in ("nearest", "bilinear"):
        assert [s.name for s in find_sites(Upsampled(mode).eval(), torch.randn(1, 3, 8, 8))] == ["relu1", "relu2"]
