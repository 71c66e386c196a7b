"""One activation module called at several places: each call is its own site with its own neurons, through
calibration, both engines, files and back to the ANN."""

from __future__ import annotations

import torch
from torch import nn

import pconv
from pconv.calibration import CALIBRATIONS
from pconv.observe.sites import PerCall


class Reused(nn.Module):
    """conv -> relu -> conv -> relu (the same nn.ReLU) -> conv -> relu (again) -> linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 8, 3), nn.Conv2d(8, 4, 1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.relu(self.conv3(self.relu(self.conv2(self.relu(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def make() -> nn.Module:
    torch.manual_seed(0)
    model = Reused().double().eval()
    model.pretrained_cfg = dict(input_size=(3, 12, 12), mean=(0.0,) * 3, std=(1.0,) * 3)
    model.pconv_source = pconv.ModelSource("factory", "test_shared_sites:make")
    return model


def images(seed: int, n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_every_call_is_a_site_with_its_own_channels():
    calibration = pconv.calibrate(make(), [images(0)], time_steps=[4], method="none", population_budget=0)
    assert [(s.name, s.channels) for s in calibration.sites] == [("relu", 6), ("relu#2", 8), ("relu#3", 4)]
    # each call saw its own outputs: the channel maxima differ in size and value
    assert [calibration.channel_max[n].numel() for n in ("relu", "relu#2", "relu#3")] == [6, 8, 4]


def test_every_method_runs_and_the_engines_and_file_agree(tmp_path):
    model = make()
    x = images(9)
    for method in CALIBRATIONS.names():
        options = {"recon_steps": 5} if method == "recon" else {}
        snn = pconv.convert(model, [images(0)], 4, method=method, population_budget=0, encoding_levels=0, **options)
        assert isinstance(snn.net.relu, PerCall) and len(snn.neurons()) == 3
        with torch.inference_mode():
            counts = snn.set_engine("counts")(x)
            spikes = snn.set_engine("spikes")(x)
            assert torch.allclose(counts, spikes, atol=1e-9, rtol=0), method
            snn.set_engine("counts")
            # a forward cut short (calibration does this) must not shift the next forward's calls
            snn.net.relu(torch.zeros(1, 6, 10, 10, dtype=torch.float64))
            assert torch.equal(snn(x), counts), method
        loaded = pconv.load(pconv.save(snn, tmp_path / f"{method}.safetensors"), trust_factory=True)
        with torch.inference_mode():
            assert torch.equal(loaded(x), counts), method
            assert torch.equal(loaded.to_ann()(x), model(x)), method
        assert isinstance(loaded.to_ann().relu, nn.ReLU)
