"""The overflow neuron: one more neuron per channel at a site, for inputs above the site's top level.

Its count form (docs/math.md) is the site's count with a higher clamp, clamp(floor(m*u), 0, m*T + T), lower on a
ReLU6 site so that the output never passes 6; QCFS and the count engine compute it bit for bit alike, the spike
engine and the serial neuron (a burst) as the sum of every neuron's spikes.
"""

import pytest
import torch

import nets
from crafted import assert_refused, snn_file_with_metadata
import pconv
from pconv.calibration import CalibrationConfig
from pconv.errors import ConfigError
from pconv.measure.evaluate import evaluate
from pconv.nn import cpu_kernel
from pconv.nn import functional as PF
from pconv.nn.neurons import ParallelIF, SerialIF, make_neuron
from pconv.nn.qcfs import QCFS
from pconv.observe.sites import find_sites


def test_by_hand_one_neuron_t4():
    """theta = 1, T = 4, no shifts: the plain site tops out at 1; with the overflow neuron it counts on, in
    steps of 1/4, up to 2."""
    one, zero = torch.ones(1), torch.zeros(1)
    x = torch.tensor([0.3, 0.95, 1.3, 1.7, 3.0]).view(1, 1, 5)
    plain = PF.qcfs(x, one, zero, zero, 4).flatten().tolist()
    over = PF.qcfs(x, one, zero, zero, 4, overflow=True).flatten().tolist()
    assert plain == [0.25, 1.0, 1.0, 1.0, 1.0]
    # 4*1.3 + 1/2 = 5.7 -> 5 levels; 4*1.7 + 1/2 = 7.3 -> 7; 3.0 -> 12.5, clamped at 4 + 4
    assert over == [0.25, 1.0, 1.25, 1.75, 2.0]


def test_count_form_is_a_higher_clamp_and_below_the_top_nothing_changes():
    g = torch.Generator().manual_seed(0)
    for T, m in [(4, 1), (8, 3), (16, 2), (32, 1)]:
        x = torch.randn(3, 6, 5, 5, generator=g, dtype=torch.float64) * 2
        theta = torch.rand(6, generator=g, dtype=torch.float64) + 0.3
        d_in = torch.randn(6, generator=g, dtype=torch.float64) * 0.02
        d_out = torch.randn(6, generator=g, dtype=torch.float64) * 0.05
        L = m * T
        over = PF.qcfs(x, theta, d_in, d_out, T, population=m, overflow=True)
        v = torch.floor(L * (x + PF.per_channel(d_in, x)) / PF.per_channel(theta, x) + 0.5)
        direct = v.clamp(0, L + T) * PF.per_channel((theta + d_out) / L, x)
        assert torch.equal(over, direct), (T, m)
        plain = PF.qcfs(x, theta, d_in, d_out, T, population=m)
        below = v <= L
        assert torch.equal(over[below], plain[below]) and (over[~below] > plain[~below]).all()
        assert (~below).any() and (v > L + T).any()  # some values use the overflow levels, some saturate them


def test_a_relu6_site_never_passes_the_cap():
    T = 8
    theta = torch.tensor([2.0, 4.0, 5.5, 6.0])
    zero = torch.zeros(4)
    x = torch.linspace(0, 20, 400).view(1, 1, -1).expand(1, 4, -1).contiguous().view(1, 4, -1)
    over = PF.qcfs(x, theta, zero, zero, T, overflow=True, cap=6.0)
    top = over.amax(dim=(0, 2))
    # theta 2: T more levels of 2/8 reach 4; theta 4: 8 of 0.5 would reach 8, 4 of them reach 6; 5.5: 1 level of
    # 5.5/8 would pass 6, none fits; 6: none
    assert top.tolist() == [4.0, 6.0, 5.5, 6.0]
    assert PF.overflow_levels(theta, T, T, 6.0).tolist() == [8.0, 4.0, 0.0, 0.0]
    assert PF.overflow_levels(theta, T, T, None).tolist() == [8.0] * 4


@pytest.mark.parametrize("m, cap", [(1, None), (3, None), (2, 6.0)])
def test_engines_and_neuron_types_agree_with_an_overflow_neuron(m, cap):
    T = 5
    g = torch.Generator().manual_seed(2)
    theta = torch.rand(6, generator=g, dtype=torch.float64) * 3 + 0.5
    d_in = torch.randn(6, generator=g, dtype=torch.float64) * 0.02
    d_out = torch.randn(6, generator=g, dtype=torch.float64) * 0.05
    x = torch.randn(3, 6, 4, 4, generator=g, dtype=torch.float64) * 4
    parallel = make_neuron("parallel", theta, d_in, d_out, T, m, overflow=True, cap=cap)
    serial = make_neuron("serial", theta, d_in, d_out, T, m, overflow=True, cap=cap)
    repeated = x.unsqueeze(0).expand(T, *x.shape).reshape(T * 3, *x.shape[1:])
    seen = []
    parallel.count_hook = lambda k, neurons: seen.append((k, neurons))
    counts = parallel(x)
    assert torch.equal(counts, PF.qcfs(x, theta, d_in, d_out, T, population=m, overflow=True, cap=cap))
    parallel.count_hook = None
    assert torch.equal(parallel(x.clone()), counts)  # the fused and the hooked paths alike
    parallel.set_engine("spikes")
    spikes = parallel(repeated).view(T, *x.shape)
    serial_spikes = serial(repeated).view(T, *x.shape)
    serial.set_engine("steps")
    stepped = torch.stack([serial(x) for _ in range(T)])
    serial.reset()
    assert torch.allclose(spikes.mean(0), counts, atol=1e-12, rtol=0)
    assert torch.allclose(serial_spikes.mean(0), counts, atol=1e-12, rtol=0)
    assert torch.equal(serial_spikes, stepped)
    amplitude = PF.per_channel(parallel.theta_out / m, x)
    per_step = spikes / amplitude
    assert torch.allclose(per_step, per_step.round(), atol=1e-9) and per_step.max() <= m + 1 + 1e-9  # the population's and one more
    k, neurons = seen[0]
    assert neurons == m + 1 and torch.equal(k, (counts * T / amplitude).round())
    assert (k > m * T).any()  # the overflow neuron fired
    if cap is not None:
        assert counts.max() <= cap


def test_qcfs_and_the_count_engine_agree_bit_for_bit_in_float32():
    g = torch.Generator().manual_seed(3)
    theta = torch.rand(16, generator=g) * 5.5 + 0.2  # up to near ReLU6's cap, where fewer than T levels fit
    d_in, d_out = torch.randn(16, generator=g) * 0.01, torch.randn(16, generator=g) * 0.05
    x = torch.randn(2, 16, 200, 200, generator=g) * 6  # large enough for the fused CPU loop
    for cap in (None, 6.0):
        q = QCFS(theta, 8, cap=cap, population=2, overflow=True)
        q.delta_in.copy_(d_in), q.delta_out.copy_(d_out)
        neuron = make_neuron("parallel", theta, d_in, d_out, 8, 2, overflow=True, cap=cap)
        neuron.inplace = True
        expected = q(x)
        assert torch.equal(neuron(x.clone()), expected)
        scale, offset, amplitude, (top, limit) = neuron._count_factors()
        assert (limit is None) == (cap is None)  # the ReLU6 site's channels get fewer levels than T above the top
        if cpu_kernel.enabled():  # the fused loop (it ran above) computes the limited counts too
            fused = cpu_kernel.cpu_count(x.clone(), scale, offset, amplitude, top, True, limit)
            assert fused is not None and torch.equal(fused, expected)


def test_config_takes_the_last_quarter_of_the_sites_with_population_coding_only():
    sites = find_sites(nets.timm_resnet().eval(), torch.zeros(1, 3, 32, 32))
    n = len(sites)
    config = CalibrationConfig(time_steps=(8,))
    assert config.overflow_sites == 0.25
    chosen = config.overflow(sites)
    assert chosen == [s.name for s in sites[n - -(-n // 4):]] and len(chosen) == -(-n // 4)
    assert CalibrationConfig(time_steps=(8,), population_budget=0).overflow_sites == 0.0
    assert CalibrationConfig(time_steps=(8,), encoding_levels=0).overflow(sites) == []
    assert CalibrationConfig(time_steps=(8,), encoding_levels=0, overflow_sites=0.01).overflow(sites) == [sites[-1].name]
    assert CalibrationConfig(time_steps=(8,), overflow_sites=1).overflow(sites) == [s.name for s in sites]
    for bad in (-0.1, 1.5, True, "a"):
        with pytest.raises(ConfigError, match="overflow sites"):
            CalibrationConfig(time_steps=(8,), overflow_sites=bad)


def test_an_overflow_snn_survives_the_file_round_trip_and_costs_its_neurons(tmp_path):
    model = nets.vgg_small().eval()
    model.pconv_source = pconv.ModelSource("factory", "nets:vgg_small")
    images = [torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))]
    # one neuron per channel otherwise, so that the overflow neuron's are the only extra ones
    calibration = pconv.calibrate(model, images, time_steps=[4], method="none", encoding_levels=0,
                                  overflow_sites=0.5)
    names = [s.name for s in calibration.sites]
    assert calibration.overflow == names[len(names) // 2:]
    again = pconv.load_calibration(pconv.save_calibration(calibration, tmp_path / "c.safetensors"))
    assert again.overflow == calibration.overflow
    snn = pconv.convert(model, again, time_steps=4)
    assert [n for n, neuron in snn.neurons().items() if neuron.overflow is not None] == calibration.overflow
    loaded = pconv.load(pconv.save(snn, tmp_path / "s.safetensors"), trust_factory=True)
    assert loaded.info.overflow == calibration.overflow
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 3
    plain = pconv.convert(model, pconv.calibrate(model, images, time_steps=[4], method="none", encoding_levels=0),
                          time_steps=4)
    with torch.inference_mode():
        assert torch.equal(loaded(x), snn(x))
        assert not torch.equal(plain(x), snn(x))  # the overflow neurons fire on these inputs
    result = evaluate(snn, [(x, torch.zeros(3, dtype=torch.long))], sop_images=3)
    plain_result = evaluate(plain, [(x, torch.zeros(3, dtype=torch.long))], sop_images=3)
    neurons = {s.name: s.neurons for s in result.sites}
    plain_neurons = {s.name: s.neurons for s in plain_result.sites}
    for name in names:  # one more neuron per channel position where there is an overflow neuron
        m = plain.neurons()[name].population
        assert m == snn.neurons()[name].population
        assert neurons[name] == plain_neurons[name] * (m + (name in calibration.overflow)) // m
    # a layer fed by a one-neuron site with an overflow neuron takes its spikes (one accumulate each, as a
    # population's), not graded values
    plain_kinds = {layer.name: layer.input for layer in plain_result.layers}
    kinds = {layer.name: layer.input for layer in result.layers}
    assert all(kinds[n] in ("spikes", "population") for n, kind in plain_kinds.items() if kind == "spikes")
    assert any(kinds[n] == "population" for n, kind in plain_kinds.items() if kind == "spikes")


@pytest.mark.parametrize("value", ['["nowhere"]', '{"a": 1}', '["features.2"]'])
def test_a_file_whose_overflow_entry_is_not_its_configs_is_refused(tmp_path, value):
    """Not a list of the file's sites, or other sites than its config's overflow_sites give."""
    assert_refused(snn_file_with_metadata(tmp_path, "overflow", value), "overflow")


def test_the_serial_neuron_catches_up_in_bursts():
    """An input of 1.5 theta: the overflow neuron starts T*theta below threshold, so it crosses only late and
    must fire several spikes in a step to count the T/2 levels above the top one."""
    T = 8
    neuron = make_neuron("serial", torch.ones(1), torch.zeros(1), torch.zeros(1), T, overflow=True)
    x = torch.full((T, 1), 1.5)
    out = neuron(x).flatten()  # spikes of amplitude theta_out = 1 per step
    assert out.sum() == 12  # floor(8 * 1.5 + 1/2) of the 16 levels, as the parallel neuron counts
    assert out.tolist() == [1, 1, 1, 1, 1, 2, 3, 2]  # the overflow neuron: 1, 2 and 1 spikes in the last 3 steps
