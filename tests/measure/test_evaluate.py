"""pconv.evaluate: accuracies, agreement, firing rates, MACs and SOPs against independent computations."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import pconv
from pconv.errors import ConfigError, DataError
from pconv.measure.costs import layer_costs
from pconv.measure.energy import EnergyModel
from pconv.measure.evaluate import evaluate

import nets

T = 4


def _source(model: nn.Module, name: str) -> nn.Module:
    model.pconv_source = pconv.ModelSource("factory", name, {})
    return model


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (24,), generator=g)
    return x, y


@pytest.fixture(scope="module")
def snn(images):
    model = _source(nets.vgg_small(), "nets:vgg_small")
    return pconv.convert(model, [images[0][:12]], time_steps=T, population_budget=0)  # the stem takes ceil(64/T)


def batches(images, size=8):
    x, y = images
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def test_accuracy_and_agreement_match_direct_computation(snn, images):
    x, y = images
    result = evaluate(snn, batches(images), sop_images=0)
    with torch.inference_mode():
        out, ref = snn(x), snn.to_ann()(x)
    assert result.num_images == 24 and result.batch_size == 8 and result.topk == 5
    assert result.top1 == pytest.approx(100 * float((out.argmax(1) == y).float().mean()))
    top5 = (out.topk(5, dim=1).indices == y[:, None]).any(1).float().mean()
    assert result.top5 == pytest.approx(100 * float(top5))
    assert result.ann_top1 == pytest.approx(100 * float((ref.argmax(1) == y).float().mean()))
    assert result.top1_agreement == pytest.approx(100 * float((ref.argmax(1) == out.argmax(1)).float().mean()))
    snn_right, ann_right = out.argmax(1) == y, ref.argmax(1) == y
    diff = result.top1_diff
    assert (diff.num_images, diff.ann_only, diff.snn_only) == \
        (24, int((ann_right & ~snn_right).sum()), int((snn_right & ~ann_right).sum()))
    assert diff.points == pytest.approx(result.top1 - result.ann_top1)
    d = result.to_dict()
    assert d["top1_diff"] == pytest.approx(d["top1"] - d["ann_top1"], abs=1e-3)
    assert d["top1_diff_ci95_low"] < d["top1_diff"] < d["top1_diff_ci95_high"]
    assert result.samples_per_sec > 0 and result.step_time > 0 and result.ann_step_time > 0


def test_firing_rates_count_the_spikes(snn, images):
    """Rates from the count engine's hook equal spikes counted in the emitted spike trains."""
    x, _ = images
    result = evaluate(snn, batches(images), sop_images=0)
    spikes: dict[str, list[float]] = {}
    snn.set_engine("spikes")
    handles = []
    try:
        for name, neuron in snn.neurons().items():
            def hook(m, i, out, name=name):
                # each spike carries theta_out/m: a population's step value is its number of spikes times that
                amplitude = m.theta_out / m.population
                unit = torch.where(amplitude != 0, amplitude, 1.0).view(1, 1, -1, *[1] * (out.dim() - 2))
                s = (out.view(T, -1, *out.shape[1:]) / unit).round()
                spikes.setdefault(name, [0.0, 0])
                spikes[name][0] += float(s.sum())
                spikes[name][1] += s[0].numel() * m.population
            handles.append(neuron.register_forward_hook(hook))
        with torch.inference_mode():
            snn(x)
    finally:
        for h in handles:
            h.remove()
        snn.set_engine("counts")
    # The engines agree to float tolerance, not bit for bit: a membrane sum that lands on a threshold can
    # round to either side in a T*B-sample convolution, so a few spikes in 1e5 may differ.
    for site in result.sites:
        total, positions = spikes[site.name]
        assert site.neurons == positions // len(x)
        assert site.spikes_per_image == pytest.approx(total / len(x), rel=1e-4)
        assert site.firing_rate == pytest.approx(total / (positions * T), rel=1e-4)
        assert 0 <= site.firing_rate <= 1
    assert 0 < result.mean_firing_rate < 1


def test_macs_by_formula(snn, images):
    layers = {layer.name: layer for layer in layer_costs(snn, images[0][:1])}
    # features.0: 3->16 3x3 conv at 32x32; features.4: depthwise 16 3x3 at 16x16; fc1: 32->64.
    assert layers["features.0"].macs == 16 * 32 * 32 * 3 * 9 and layers["features.0"].input == "image"
    assert layers["features.4"].macs == 16 * 16 * 16 * 1 * 9 and layers["features.4"].input == "spikes"
    assert layers["fc1"].macs == 32 * 64 and layers["fc2"].macs == 64 * 10
    assert list(layers) == ["features.0", "features.4", "features.7", "features.12", "fc1", "fc2"]


def _fanout(module: nn.Module, shape: torch.Size) -> torch.Tensor:
    """How many outputs each input position feeds: the gradient of the all-ones layer's output sum."""
    with torch.inference_mode(False), torch.enable_grad():
        probe = torch.zeros(tuple(shape), dtype=torch.float64, requires_grad=True)
        weight = torch.ones(tuple(module.weight.shape), dtype=torch.float64)
        if isinstance(module, nn.Linear):
            out = nn.functional.linear(probe, weight)
        else:
            out = nn.functional.conv2d(probe, weight, None, module.stride, module.padding, module.dilation,
                                       module.groups)
        out.sum().backward()
        return probe.grad.clone()


def test_operations_equal_a_brute_force_count(snn, images):
    """Per layer, over the steps and input positions: events = [input != 0] x fan-out (by autograd), for the
    layer fed by the encoding population (features.4, 16 neurons per channel at T=4, through max pooling) the
    number of spikes at each input instead; and the time-summed events = [input != 0 at some step] x fan-out."""
    stem = snn.neurons()["features.2"]
    assert stem.population == 16 and snn.neurons()["features.6"].population == 1
    amplitude = stem.theta_out / stem.population
    unit = torch.where(amplitude != 0, amplitude, 1.0).view(1, -1, 1, 1)
    x, _ = images
    n = 5
    result = evaluate(snn, batches(images), sop_images=n)
    expected: dict[str, float] = {}
    summed: dict[str, float] = {}
    modules = {name: m for name, m in snn.net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    snn.set_engine("spikes")
    handles = []
    try:
        for name, module in modules.items():
            def pre(m, inputs, name=name):
                inp = inputs[0]
                fan = _fanout(m, inp[:1].shape)[0]
                events = (inp / unit).round() if name == "features.4" else (inp != 0)
                expected[name] = expected.get(name, 0.0) + float((events.double() * fan).sum())
                steps = inp.reshape(4, -1, *inp.shape[1:])
                summed[name] = summed.get(name, 0.0) + float(((steps != 0).any(dim=0).double() * fan).sum())
            handles.append(module.register_forward_pre_hook(pre))
        with torch.inference_mode():
            snn(x[:n])
    finally:
        for h in handles:
            h.remove()
        snn.set_engine("counts")
    for layer in result.layers:
        if layer.input == "image":
            assert layer.sops is None and layer.events is None
            continue
        assert layer.events == pytest.approx(expected[layer.name] / n, rel=1e-9), layer.name
        assert layer.summed_events == pytest.approx(summed[layer.name] / n, rel=1e-9), layer.name
        assert 0 <= layer.input_rate <= 1
    kinds = {layer.name: layer.input for layer in result.layers}
    # fed by the population through max pooling: its spikes; after average pooling and zero padding: graded
    assert kinds["features.4"] == "population" and kinds["features.7"] == "spikes"
    assert kinds["features.12"] == "graded" and kinds["fc1"] == "graded"
    binary = [k for k, kind in kinds.items() if kind in ("spikes", "population")]
    assert result.sops == pytest.approx(sum(expected[k] for k in binary) / n, rel=1e-9)  # binary spikes only
    graded = [k for k, kind in kinds.items() if kind == "graded"]
    assert result.graded_macs(True) == pytest.approx(sum(summed[k] for k in graded) / n, rel=1e-9)
    assert result.graded_macs(False) == pytest.approx(sum(expected[k] for k in graded) / n, rel=1e-9)


def test_energy_is_the_hand_count(snn, images):
    """SNN energy = image layers' MACs + ACs per spike + multiplies of graded inputs + neurons, priced per op."""
    result = evaluate(snn, batches(images), sop_images=4, energy=EnergyModel(pj_per_ac=0.5, pj_per_mac=3.0))
    layers = {layer.name: layer for layer in result.layers}
    image_macs = sum(layer.macs for layer in layers.values() if layer.input == "image")
    spikes = sum(layer.events for layer in layers.values() if layer.input in ("spikes", "population"))
    graded_once = sum(layer.summed_events for layer in layers.values() if layer.input == "graded")
    graded_steps = sum(layer.events for layer in layers.values() if layer.input == "graded")
    neurons = sum(site.neurons for site in result.sites)
    assert image_macs == layers["features.0"].macs > 0 and spikes > 0 and graded_once > 0
    assert result.snn_energy_pj(True) == pytest.approx(3.0 * (image_macs + graded_once + neurons) + 0.5 * spikes)
    assert result.snn_energy_pj(False) == pytest.approx(3.0 * (image_macs + graded_steps) + 0.5 * (spikes + 4 * neurons))
    assert result.ann_energy_pj == pytest.approx(3.0 * result.ann_macs)
    d = result.to_dict()
    assert d["energy_ratio"] == pytest.approx(result.snn_energy_pj(True) / result.ann_energy_pj, rel=1e-3)
    assert d["snn_energy_uj"] == pytest.approx(result.snn_energy_pj(True) / 1e6, rel=1e-3)
    assert d["pj_per_ac"] == 0.5 and d["pj_per_mac"] == 3.0
    assert sum(layer["energy_uj"] for layer in d["layers"]) == pytest.approx(
        (3.0 * (image_macs + graded_once) + 0.5 * spikes) / 1e6, rel=1e-3)


def test_ann_macs_match_torchs_flop_counter(snn, images):
    """torch.utils.flop_counter counts 2 FLOPs per multiply-accumulate of every conv and matmul."""
    from torch.utils.flop_counter import FlopCounterMode

    x, _ = images
    result = evaluate(snn, batches(images), sop_images=0)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        snn.to_ann()(x[:1])
    assert 2 * result.ann_macs == counter.get_total_flops()


def test_counts_and_spike_engines_agree(snn, images):
    a = evaluate(snn, batches(images), sop_images=3, engine="counts")
    b = evaluate(snn, batches(images), sop_images=3, engine="spikes")
    assert (a.engine, b.engine) == ("counts", "spikes")
    assert a.top1 == b.top1 and a.top1_agreement == b.top1_agreement
    # float tolerance: a membrane sum on a threshold may round either way in the T*B-sample convolution
    assert [s.firing_rate for s in a.sites] == pytest.approx([s.firing_rate for s in b.sites], rel=1e-4)
    assert a.sops == pytest.approx(b.sops, rel=1e-4)
    assert a.snn_energy_pj() == pytest.approx(b.snn_energy_pj(), rel=1e-4)
    assert snn.engine == "counts"  # restored


def test_serial_baseline_runs_in_the_spike_engine(snn, images):
    serial = snn.with_neuron("serial")
    result = evaluate(serial, batches(images), sop_images=2)
    assert result.neuron == "serial" and result.engine == "spikes"
    assert result.sops is not None and all(0 <= s.firing_rate <= 1 for s in result.sites)


def test_to_dict_is_plain_json(snn, images):
    result = evaluate(snn, batches(images), sop_images=2, ann=False)
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["ann_top1"] is None and d["top1_agreement"] is None
    assert d["top1_diff"] is None and d["top1_diff_ci95_low"] is None and d["top1_ann_only"] is None
    for key in ("top1", "top1_err", "top5", "samples_per_sec", "step_time", "param_count", "sops_per_image",
                "ann_macs_per_image", "snn_macs_per_image", "mean_firing_rate", "sites", "layers"):
        assert key in d
    assert d["top1_err"] == pytest.approx(100 - d["top1"]) and d["num_images"] == result.num_images
    assert [s["name"] for s in d["sites"]] == [s.name for s in snn.info.sites]


def test_the_callers_snn_is_left_as_it_was_also_on_error(snn, images):
    x, _ = images
    snn.set_engine("counts")
    with pytest.raises(DataError, match="outside the model's 10 classes"):
        evaluate(snn, [(x[:4], torch.tensor([0, 1, 2, 10]))], engine="spikes")
    assert snn.engine == "counts"
    assert all(neuron.count_hook is None for neuron in snn.neurons().values())
    evaluate(snn, batches(images), engine="spikes", sop_images=0)
    assert snn.engine == "counts" and next(snn.parameters()).device.type == "cpu"


def test_labels_are_required_and_checked(snn, images):
    x, y = images
    with pytest.raises(DataError, match="labelled"):
        evaluate(snn, [x[:4]])
    with pytest.raises(DataError, match="outside the model's 10 classes"):
        evaluate(snn, [(x[:4], torch.tensor([0, 1, 2, 10]))])
    with pytest.raises(DataError, match="no images"):
        evaluate(snn, [])
    with pytest.raises(ConfigError):
        evaluate(snn, batches(images), engine="analog")


def test_serial_steps_engine_matches_its_spike_engine(snn, images):
    serial = snn.with_neuron("serial")
    spikes = evaluate(serial, batches(images), sop_images=2, engine="spikes")
    steps = evaluate(serial, batches(images), sop_images=2, engine="steps")
    assert steps.engine == "steps"
    assert steps.top1 == spikes.top1 and steps.sops == spikes.sops
    assert [s.spikes_per_image for s in steps.sites] == pytest.approx([s.spikes_per_image for s in spikes.sites])
    assert [layer.macs for layer in steps.layers] == [layer.macs for layer in spikes.layers]


def test_per_step_accuracy_curve_in_the_spike_engines(snn, images):
    x, y = images
    assert evaluate(snn, batches(images), engine="counts", sop_images=0, ann=False).step_top1 is None
    result = evaluate(snn, batches(images), engine="spikes", sop_images=0, ann=False)
    with torch.inference_mode():
        steps = snn.set_engine("spikes").forward_steps(x)
    snn.set_engine("counts")
    expected = [100 * float((steps[:t].mean(0).argmax(1) == y).float().mean()) for t in range(1, T + 1)]
    assert result.step_top1 == pytest.approx(expected)
    assert len(result.step_top1) == T
    serial = evaluate(snn.with_neuron("serial"), batches(images), engine="steps", sop_images=0, ann=False)
    assert len(serial.step_top1) == T
