"""Exact identities of DESIGN §2, asserted with atol=0 in float64."""

import pytest
import torch
import torch.nn.functional as F

from pconv import NEURONS, ConfigError, ParallelIF, SerialIF, Site
from pconv.nn import functional as PF
from pconv.nn.neurons import make_neuron

C = 6


def site(channels=C, ndim=4):
    return Site("act", "relu", channels, ndim)


def random_params(levels, g, dyadic=False, shifts=True):
    """Per-channel theta, delta_in, delta_out; dyadic amplitudes make sums of spikes exact."""
    theta = torch.rand(C, generator=g, dtype=torch.float64) * 2 + 0.1
    if dyadic:
        theta = torch.round(theta * 256) / 256
    delta_in = (torch.rand(C, generator=g, dtype=torch.float64) - 0.5) * 0.3 if shifts else torch.zeros(C, dtype=torch.float64)
    delta_out = (torch.rand(C, generator=g, dtype=torch.float64) - 0.5) * 0.2 if shifts else torch.zeros(C, dtype=torch.float64)
    if dyadic:
        delta_out = torch.round(delta_out * 256) / 256
    return theta, delta_in, delta_out


def spike_input(T, g, B=5, H=4):
    """A time-varying input, [T*B, C, H, W], step-major."""
    return torch.randn(T * B, C, H, H, generator=g, dtype=torch.float64) * 1.5


@pytest.mark.parametrize("T", [1, 2, 4, 8, 16, 32])
def test_parallel_time_mean_equals_qcfs(T):
    g = torch.Generator().manual_seed(T)
    for dyadic in (False, True):
        theta, d_in, d_out = random_params(T, g, dyadic)
        neuron = make_neuron("parallel", theta, d_in, d_out, T).double()
        neuron.set_engine("spikes")
        x = spike_input(T, g)
        spikes = neuron.steps_view(neuron(x))
        x_mean = neuron.steps_view(x).mean(dim=0)
        expected = PF.qcfs(x_mean, theta, d_in, d_out, T)
        # The spike count is exactly the QCFS level.
        k = (spikes != 0).sum(dim=0).to(torch.float64)
        assert torch.equal(PF.count_output(k, theta + d_out, T), expected)
        if dyadic:  # with dyadic amplitudes the float sum of the spikes is exact as well
            assert torch.equal(spikes.sum(dim=0) / T, expected)
        # The count engine emits the same time-mean, bit for bit.
        neuron.set_engine("counts")
        assert torch.equal(neuron(x_mean), expected)


@pytest.mark.parametrize("T", [1, 4, 8, 32])
def test_qcfs_without_shifts_is_the_textbook_formula(T):
    g = torch.Generator().manual_seed(0)
    theta, d_in, d_out = random_params(T, g, shifts=False)
    x = torch.randn(4, C, 3, 3, generator=g, dtype=torch.float64)
    th = theta.view(1, C, 1, 1)
    textbook = th / T * torch.clamp(torch.floor(T * x / th + 0.5), 0, T)
    assert torch.allclose(PF.qcfs(x, theta, d_in, d_out, T), textbook, atol=1e-15, rtol=0)


@pytest.mark.parametrize("T", [2, 4, 8, 16])
def test_spike_trains_are_sorted(T):
    g = torch.Generator().manual_seed(1)
    theta, d_in, d_out = random_params(T, g)
    neuron = make_neuron("parallel", theta, d_in, d_out, T).double()
    neuron.set_engine("spikes")
    fired = neuron.steps_view(neuron(spike_input(T, g))) != 0
    k = fired.sum(dim=0)
    steps = torch.arange(1, T + 1).view(T, 1, 1, 1, 1)
    # Spikes occupy exactly steps 1..k.
    assert torch.equal(fired, steps <= k.unsqueeze(0))
    assert (k > 0).any() and (k < T).any()  # the test exercises partial trains


@pytest.mark.parametrize("T", [4, 8])
def test_max_pool_commutes_with_sorted_spike_trains(T):
    g = torch.Generator().manual_seed(2)
    theta, d_in, d_out = random_params(T, g)
    neuron = make_neuron("parallel", theta, d_in, d_out, T).double()
    neuron.set_engine("spikes")
    x = spike_input(T, g, H=6)
    pooled_trains = F.max_pool2d(neuron(x), 2)
    # Spike train of the max-pooled counts.
    k = PF.spike_count(neuron.steps_view(x).mean(0), neuron.theta_in, neuron.bias, T)
    k_max = F.max_pool2d(k, 2)
    steps = torch.arange(1, T + 1, dtype=torch.float64).view(T, 1, 1, 1, 1)
    train_of_max = (steps <= k_max.unsqueeze(0)).double() * PF.per_channel(neuron.theta_out, k_max).unsqueeze(0)
    assert torch.equal(pooled_trains, train_of_max.reshape(pooled_trains.shape))


@pytest.mark.parametrize("T", [1, 3, 8, 16, 32])
def test_serial_equals_parallel_on_constant_input(T):
    g = torch.Generator().manual_seed(3)
    theta = torch.round((torch.rand(C, generator=g, dtype=torch.float64) * 2 + 0.25) * 64) / 64
    # Input shifts keep the initial membrane b = theta/2 + T*delta_in inside [0, theta).
    d_in = (torch.rand(C, generator=g, dtype=torch.float64) - 0.5) * 0.9 * theta / T
    d_out = torch.round((torch.rand(C, generator=g, dtype=torch.float64) - 0.5) * 0.2 * 64) / 64
    parallel = make_neuron("parallel", theta, d_in, d_out, T).double()
    serial = make_neuron("serial", theta, d_in, d_out, T).double()
    parallel.set_engine("spikes")
    x = torch.randn(7, C, 3, 3, generator=g, dtype=torch.float64) * theta.view(1, C, 1, 1)
    constant = x.unsqueeze(0).expand(T, *x.shape).reshape(T * 7, *x.shape[1:])
    s_par = parallel.steps_view(parallel(constant))
    s_ser = serial.steps_view(serial(constant))
    assert torch.equal((s_par != 0).sum(0), (s_ser != 0).sum(0))
    assert torch.equal(s_par.sum(0), s_ser.sum(0))  # dyadic amplitudes: exact sums


def test_serial_differs_from_parallel_on_time_varying_input():
    """The classic conversion error: the serial neuron depends on when input arrives."""
    T = 4
    theta = torch.ones(1, dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    parallel = make_neuron("parallel", theta, zero, zero, T).double()
    serial = make_neuron("serial", theta, zero, zero, T).double()
    parallel.set_engine("spikes")
    late = torch.tensor([[-1.0], [-1.0], [2.0], [2.0]], dtype=torch.float64)  # mean 0.5
    assert parallel(late).sum() == 2.0  # round(T * 0.5 + 0.5) = 2 spikes
    assert serial(late).sum() == 1.0  # the early negative input is lost, the late one saturates


def test_neuron_registry_and_engines():
    assert {"parallel", "serial"} <= set(NEURONS.names())
    assert NEURONS.get("parallel") is ParallelIF and NEURONS.get("serial") is SerialIF
    n = make_neuron("serial", torch.ones(2), torch.zeros(2), torch.zeros(2), 4)
    with pytest.raises(ConfigError, match="cannot run in the 'counts' engine"):
        n.set_engine("counts")
    with pytest.raises(ConfigError, match="did you mean 'parallel'"):
        NEURONS.get("paralel")
    with pytest.raises(ConfigError, match="unknown engine 'analog'"):
        n.set_engine("analog")


def test_linear_layout_channels_on_dim_1():
    T = 8
    g = torch.Generator().manual_seed(4)
    theta, d_in, d_out = random_params(T, g)
    neuron = make_neuron("parallel", theta, d_in, d_out, T).double()
    x = torch.randn(3, C, generator=g, dtype=torch.float64)
    assert torch.equal(neuron(x), PF.qcfs(x, theta, d_in, d_out, T))


def test_count_engine_follows_changed_parameters():
    """The count engine keeps its per-channel factors between calls; a parameter changed in place, replaced, or
    moved to another dtype is seen at the next call (the output is a freshly built neuron's)."""
    g = torch.Generator().manual_seed(11)
    theta, d_in, d_out = random_params(8, g)
    neuron = make_neuron("parallel", theta, d_in, d_out, 8, population=3).double()
    x = torch.randn(4, C, 3, 3, generator=g, dtype=torch.float64)

    def fresh():
        return ParallelIF(neuron.theta_in, neuron.bias, neuron.theta_out, 8, 3)(x)

    assert torch.equal(neuron(x), fresh())
    with torch.no_grad():
        neuron.theta_in.mul_(1.7)
    assert torch.equal(neuron(x), fresh())
    neuron.bias = neuron.bias + 0.25
    assert torch.equal(neuron(x), fresh())
    expected = fresh()
    neuron.float().double()  # new tensors: the rounding to float32 changes them
    assert not torch.equal(neuron(x), expected) and torch.equal(neuron(x), fresh())
