"""Recording channel statistics and turning them into thresholds."""

import pytest
import torch
from torch import nn

from pconv import THRESHOLDS, ConfigError, ThresholdSpec, find_sites
from pconv.observe.record import record_activations


class Probe(nn.Module):
    """Identity conv followed by an in-place ReLU: the observer must see the activation's output."""

    def __init__(self, act):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        nn.init.eye_(self.conv.weight.view(3, 3))
        self.act = act

    def forward(self, x):
        return self.act(self.conv(x)).mean(dim=(2, 3))


def record(act, batches, histograms=True):
    model = Probe(act).eval()
    sites = find_sites(model, batches[0][:1])
    stats = record_activations(model, sites, batches, histograms=histograms, bins=1024)
    assert type(model.act) is type(act)  # observers are swapped back out
    return stats["act"]


def test_max_is_the_channel_maximum_after_inplace_relu():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 5, 5, generator=g) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) for _ in range(3)]
    stats = record(nn.ReLU(inplace=True), [b.clone() for b in batches])
    expected = torch.cat(batches).clamp_min(0).amax(dim=(0, 2, 3))
    assert torch.equal(stats.max, expected)
    assert stats.count == 3 * 4 * 25
    assert stats.hist.sum(dim=1).tolist() == [300.0] * 3


def test_relu6_caps_threshold_at_6():
    batches = [torch.randn(4, 3, 5, 5) * 20]
    stats = record(nn.ReLU6(inplace=True), batches)
    assert stats.max.max() == 6.0


@pytest.mark.parametrize("q", [50.0, 90.0, 99.0, 99.9])
def test_percentile_within_one_bin(q):
    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(8, 3, 10, 10, generator=g).pow(3) * 4 for _ in range(2)]
    stats = record(nn.ReLU(), batches)
    theta = ThresholdSpec.parse(f"percentile:{q}").compute(stats, 8)
    values = torch.cat(batches).transpose(0, 1).reshape(3, -1)
    # Smallest value v with P(x <= v) >= q: the ceil(q*n)-th order statistic.
    n = values.shape[1]
    exact = values.sort(dim=1).values[:, int(torch.tensor(q / 100 * n).ceil()) - 1]
    bin_width = stats.max / stats.bins
    assert torch.all((theta - exact).abs() <= bin_width + 1e-6)


def test_mse_threshold_never_worse_than_max():
    from pconv.observe.thresholds import _bin_edges, _qcfs_error

    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(8, 3, 10, 10, generator=g).exp() for _ in range(2)]  # heavy tail
    stats = record(nn.ReLU(), batches)
    centers = _bin_edges(stats) - stats.max.double().unsqueeze(1) / (2 * stats.bins)
    for T in (2, 4, 8, 32):
        theta = ThresholdSpec.parse("mse").compute(stats, T).double()
        err_best = _qcfs_error(centers, stats.hist, theta, T)
        err_max = _qcfs_error(centers, stats.hist, stats.max.double(), T)
        assert torch.all(err_best <= err_max)
        assert torch.all(theta <= stats.max.double() + 1e-6)
    # Heavy tails and few levels: clipping well below the maximum pays.
    assert torch.all(ThresholdSpec.parse("mse").compute(stats, 2) < 0.8 * stats.max)


def test_threshold_spec_parsing():
    assert str(ThresholdSpec.parse("percentile:99.99")) == "percentile:99.99"
    assert ThresholdSpec.parse("max") == ThresholdSpec("max")
    for bad, words in [("percentile", "needs a value"), ("percentile:101", "needs a value"),
                       ("percentile:abc", "bad threshold value"), ("max:3", "takes no value"),
                       ("maxx", "did you mean 'max'")]:
        with pytest.raises(ConfigError, match=words):
            ThresholdSpec.parse(bad)
    assert {"max", "percentile", "mse"} <= set(THRESHOLDS.names())


def test_dead_channel_gets_positive_threshold():
    batches = [torch.randn(2, 3, 4, 4).abs() * torch.tensor([1.0, 0.0, 1.0]).view(1, 3, 1, 1)]
    stats = record(nn.ReLU(), batches)
    for name in THRESHOLDS.names():
        spec = ThresholdSpec.parse("percentile:99" if name == "percentile" else name)
        assert torch.all(spec.compute(stats, 4) > 0)
