"""Population coding of the encoding sites: m neurons per channel with biases spread by theta/m.

The identities asserted here are the ones in docs/math.md §2b: the m neurons' total count is the count of
one neuron with m*T levels (Hermite's identity), every engine and both neuron types agree, and only the
sites that see the image get a population.
"""

import pytest
import torch
from torch import nn

import nets
from crafted import assert_refused, snn_file_with_metadata
import pconv
from pconv.nn import functional as PF
from pconv.nn.population import populations
from pconv.errors import ConfigError
from pconv.nn.neurons import ParallelIF, SerialIF
from pconv.observe.sites import find_sites


def test_the_closed_form_is_the_sum_over_the_neurons():
    """The count engine's one-pass total equals the spike engine's neuron-by-neuron sum (float64, so no value
    falls within rounding of a level boundary)."""
    g = torch.Generator().manual_seed(5)
    for T, m in [(4, 16), (8, 8), (5, 3), (32, 2), (7, 1)]:
        x = torch.randn(3, 5, 8, 8, generator=g, dtype=torch.float64) * 2
        theta_in = torch.rand(5, generator=g, dtype=torch.float64) + 0.3
        bias = torch.randn(5, generator=g, dtype=torch.float64) * 0.2
        closed = PF.population_count(x, theta_in, bias, T, m)
        summed = sum(PF.population_counts(x, theta_in, bias, T, m))
        assert torch.equal(closed, summed), (T, m)
        assert 0 < closed.mean() < m * T


def test_population_count_is_one_neuron_with_m_times_t_levels():
    g = torch.Generator().manual_seed(0)
    for T, m in [(4, 16), (8, 8), (5, 3), (32, 2)]:
        x = torch.randn(4, 7, 9, 9, generator=g, dtype=torch.float64) * 3
        theta = torch.rand(7, generator=g, dtype=torch.float64) * 2 + 0.1
        delta_in = torch.randn(7, generator=g, dtype=torch.float64) * 0.1
        theta_in, bias, _ = PF.neuron_params(theta, delta_in, torch.zeros_like(theta), T, m)
        total = PF.population_count(x, theta_in, bias, T, m)
        L = m * T
        direct = torch.clamp(torch.floor(L * (x + PF.per_channel(delta_in, x)) / PF.per_channel(theta, x) + 0.5),
                             0, L)
        assert torch.equal(total, direct), (T, m)
        assert 0 < direct.mean() < L  # neither all silent nor all saturated


def test_population_of_one_is_the_plain_neuron():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 6, 6, generator=g)
    theta, delta_in, delta_out = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g) * 0.1, \
        torch.randn(5, generator=g) * 0.1
    plain = PF.qcfs(x, theta, delta_in, delta_out, 8)
    assert torch.equal(PF.qcfs(x, theta, delta_in, delta_out, 8, population=1), plain)
    assert not torch.equal(PF.qcfs(x, theta, delta_in, delta_out, 8, population=4), plain)


@pytest.mark.parametrize("m", [1, 3])
def test_engines_and_neuron_types_agree_for_a_population(m):
    T = 5
    g = torch.Generator().manual_seed(2)
    theta_in = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    bias = torch.rand(6, generator=g, dtype=torch.float64) * 0.3
    theta_out = theta_in * 1.1
    x = torch.randn(3, 6, 4, 4, generator=g, dtype=torch.float64)
    parallel = ParallelIF(theta_in, bias, theta_out, T, m)
    serial = SerialIF(theta_in, bias, theta_out, T, m)
    repeated = x.unsqueeze(0).expand(T, *x.shape).reshape(T * 3, *x.shape[1:])
    seen = []
    parallel.count_hook = lambda k, neurons: seen.append((k, neurons))
    counts = parallel(x)
    parallel.set_engine("spikes")
    spikes = parallel(repeated).view(T, *x.shape)
    serial_spikes = serial(repeated).view(T, *x.shape)
    serial.set_engine("steps")
    stepped = torch.stack([serial(x) for _ in range(T)])
    serial.reset()
    # the same number of spikes per neuron whatever the schedule (the serial one spikes at other steps)
    assert torch.allclose(spikes.mean(0), counts, atol=1e-12, rtol=0)
    assert torch.allclose(serial_spikes.mean(0), counts, atol=1e-12, rtol=0)
    assert torch.equal(serial_spikes, stepped)
    # every step carries a whole number (0..m) of spikes of theta_out/m
    per_step = spikes / (theta_out / m).view(1, 1, -1, 1, 1)
    assert torch.equal(per_step, per_step.round()) and per_step.max() <= m
    # the count hook sees the spikes per channel position of all m neurons, and m
    k, neurons = seen[0]
    assert k.shape == x.shape and neurons == m
    assert k.sum() == per_step.sum()


def test_only_the_sites_that_see_the_image_encode():
    class TwoStems(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)
            self.act_a, self.act_b, self.act_c = nn.ReLU(), nn.ReLU6(), nn.ReLU()
            self.c = nn.Conv2d(8, 4, 1)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            y = torch.cat([self.act_a(self.a(x)), self.act_b(self.b(x) * 2 + 1)], dim=1)
            return self.head(self.act_c(self.c(y) + self.b(x).sum(1, keepdim=True)).mean((2, 3)))

    sites = find_sites(TwoStems().eval(), torch.zeros(1, 3, 8, 8))
    # act_c's input also takes the image through b directly, but it takes act_a/act_b's spikes too
    assert {s.name: s.encoding for s in sites} == {"act_a": True, "act_b": True, "act_c": False}
    sites = find_sites(nets.vgg_small().eval(), torch.zeros(1, 3, 32, 32))
    assert [s.encoding for s in sites] == [True] + [False] * (len(sites) - 1)
    first = sites[0].name
    assert [populations(sites, T, 64)[first] for T in (4, 8, 16, 32, 64, 100)] == [16, 8, 4, 2, 1, 1]
    assert populations(sites, 8, 0)[first] == 1 and populations(sites, 8, 64)[sites[1].name] == 1
    assert populations(sites, 8, 64, chosen={sites[1].name: 3})[sites[1].name] == 3  # a hidden site the budget chose
    assert populations(sites, 8, 64, chosen={first: 1})[first] == 1  # an encoding site the budget chose


def test_encoding_levels_zero_is_one_neuron_everywhere_and_bad_levels_are_refused():
    model = nets.vgg_small().eval()
    images = [torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))]
    plain = pconv.calibrate(model, images, time_steps=[4], method="none", encoding_levels=0)
    coded = pconv.calibrate(model, images, time_steps=[4], method="none", population_budget=0)  # no choice
    assert set(plain.populations(4).values()) == {1}
    assert coded.populations(4)["features.2"] == 16 and coded.encoding_levels == 64
    snn = pconv.convert(model, coded, time_steps=4)
    assert snn.neurons()["features.2"].population == 16 and snn.info.encoding_levels == 64
    assert snn.with_neuron("serial").neurons()["features.2"].population == 16
    for bad in (-1, 2.5, True, 10**6):
        with pytest.raises(ConfigError, match="encoding levels"):
            pconv.calibrate(model, images, time_steps=[4], encoding_levels=bad)


def test_population_survives_the_file_round_trip(tmp_path):
    model = nets.vgg_small().eval()
    model.pconv_source = pconv.ModelSource("factory", "nets:vgg_small")
    images = [torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))]
    calibration = pconv.calibrate(model, images, time_steps=[2, 8], method="none", encoding_levels=20,
                                  population_budget=0)
    path = pconv.save_calibration(calibration, tmp_path / "c.safetensors")
    again = pconv.load_calibration(path)
    assert again.encoding_levels == 20 and again.populations(2)["features.2"] == 10
    assert again.populations(8)["features.2"] == 3
    snn = pconv.convert(model, again, time_steps=2)
    loaded = pconv.load(pconv.save(snn, tmp_path / "s.safetensors"), trust_factory=True)
    assert loaded.neurons()["features.2"].population == 10
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        assert torch.equal(loaded(x), snn(x))


def test_a_corrupt_encoding_levels_entry_is_refused(tmp_path):
    assert_refused(snn_file_with_metadata(tmp_path, "encoding_levels", "sixty-four"), "encoding_levels")
