"""The `fit` and `refit` calibrations: the search's optimum, the least-squares identities, the paired pass
and the refitted layers' round trip through files."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nets
import pconv
from pconv.files import export
from pconv.calibration import CALIBRATIONS
from pconv.data.batches import ImageBatches
from pconv.calibration.fit import (MIN_FRACTION, REFINE_FRACTIONS, REFINE_SHIFTS, SHIFT_STEPS, THRESHOLD_FRACTIONS,
                                   search_samples, search_site)
from pconv.utils.memory import peak_tensor_bytes
from pconv.utils.progress import NoProgress
from pconv.nn.qcfs import activation
from pconv.calibration import changed_weights
from pconv.nn.qcfs import quantize
from pconv.calibration.refit import _patches, normal_equations, solve
from pconv.observe.sites import find_sites


def calib_batches(n=3, b=8, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, size, size, generator=g) for _ in range(n)]


def brute_force_error(x_q, y, theta, shift, levels):
    """Mean squared error of the best amplitude for one channel, by direct evaluation."""
    k = torch.clamp(torch.floor(levels * x_q / theta + 0.5 + shift), 0, levels)
    amplitude = (k * y).sum() / (k * k).sum()
    return ((amplitude * k - y) ** 2).mean(), amplitude


def test_site_search_within_a_budget_takes_slices_of_channels_and_finds_the_same():
    """The search of 48 channels x 4,000 samples holds 7.7 MB at once; within a 1 MB budget it takes a few
    channels at a time and fewer breakpoints per lookup, stays under the budget (beyond its inputs and
    results) and chooses the same."""
    g = torch.Generator().manual_seed(1)
    y = torch.randn(48, 4000, generator=g).relu() * torch.linspace(0.5, 3.0, 48).unsqueeze(1)
    q = y + 0.1 * torch.randn(y.shape, generator=g)
    theta = y.amax(dim=1)
    whole = search_samples(q, y, theta, 8)
    budget = 1 << 20
    sliced = search_samples(q, y, theta, 8, budget)
    for a, b in zip(whole, sliced):
        assert torch.equal(a, b)
    assert peak_tensor_bytes(search_samples, q, y, theta, 8) > 7 * budget
    assert peak_tensor_bytes(search_samples, q, y, theta, 8, budget) <= budget
    # a bound on the samples (the same in every process) above the local count slices more finely
    assert peak_tensor_bytes(search_samples, q, y, theta, 8, budget, 10000) <= budget * 4000 // 10000
    # at 256 levels the breakpoint lookups of 16 channels x 500 samples would hold 16 MB at once
    args = (q[:16, :500], y[:16, :500], theta[:16], 256)
    for a, b in zip(search_samples(*args), search_samples(*args, budget)):
        assert torch.equal(a, b)
    assert peak_tensor_bytes(search_samples, *args) > 10 * budget
    assert peak_tensor_bytes(search_samples, *args, budget) <= budget


def test_site_search_finds_the_best_candidate_and_its_amplitude():
    g = torch.Generator().manual_seed(0)
    x_ann = torch.randn(64, 3, 4, 4, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    x_q = x_ann + 0.2 * torch.randn(x_ann.shape, generator=g, dtype=torch.float64)  # upstream error
    base = torch.tensor([3.0, 5.0, 1.5], dtype=torch.float64)
    levels = 4
    theta, delta_in, delta_out = search_site(x_q, x_ann, base, levels, cap=None)
    for c in range(3):
        q = x_q[:, c].reshape(-1)
        y = activation(x_ann[:, c].reshape(-1), None)
        errors = {(f, s): brute_force_error(q, y, base[c] * f, s, levels)[0]
                  for f in THRESHOLD_FRACTIONS for s in SHIFT_STEPS}
        (f1, s1), first = min(errors.items(), key=lambda kv: kv[1].item())
        # second stage: the finer grid around the first choice
        errors = {(f, s): brute_force_error(q, y, base[c] * f, s, levels)[0]
                  for f in [min(max(f1 + d, MIN_FRACTION), 1.0) for d in REFINE_FRACTIONS]
                  for s in [s1 + d for d in REFINE_SHIFTS]}
        (f, s), best = min(errors.items(), key=lambda kv: kv[1].item())
        assert best <= first  # the finer grid holds the first choice: never worse
        assert theta[c].item() == pytest.approx(base[c].item() * f, rel=1e-12)
        assert delta_in[c].item() == pytest.approx(theta[c].item() / levels * s, rel=1e-9, abs=1e-12)
        _, amplitude = brute_force_error(q, y, theta[c], s, levels)
        # the search sums in float32 (float64 accumulators): the amplitude is exact to float32 rounding
        assert (theta[c] + delta_out[c]).item() == pytest.approx(levels * amplitude.item(), rel=1e-6)
        # and the QCFS module with these parameters reaches that error
        out = pconv.nn.functional.qcfs(x_q[:, c:c + 1], theta[c:c + 1], delta_in[c:c + 1], delta_out[c:c + 1], levels)
        assert ((out.reshape(-1) - y) ** 2).mean().item() == pytest.approx(best.item(), rel=1e-6)


def test_site_search_respects_relu6():
    x = torch.linspace(-2, 9, 1000, dtype=torch.float64).view(1, 1, 1000)
    theta, _, delta_out = search_site(x, x, torch.tensor([6.0]), 8, cap=6.0)
    assert theta.item() <= 6.0
    assert (theta + delta_out).item() == pytest.approx(6.0, rel=0.05)  # the top level lands on the saturation


def test_least_squares_refit_is_exact_when_the_input_is_an_invertible_map_of_the_ann_input():
    """If x_q = A x_ann (A invertible, across channels of a 1x1 conv), the refit recovers W A^-1 exactly."""
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(4, 3, 1, bias=True).double()
    x_ann = torch.randn(16, 4, 5, 5, generator=g, dtype=torch.float64)
    mix = torch.randn(4, 4, generator=g, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
    x_q = torch.einsum("ij,bjhw->bihw", mix, x_ann) + 0.5
    call = {"weight": conv.weight, "bias": conv.bias, "stride": 1, "padding": 0, "dilation": 1, "groups": 1,
            "linear": False}
    gram, cross = normal_equations(call, x_q, x_ann)
    weight, bias = solve(gram, cross, conv.weight.detach(), conv.bias.detach(), ridge=0.0)
    refitted = nn.functional.conv2d(x_q, weight, bias)
    assert torch.allclose(refitted, conv(x_ann), atol=1e-9)


@pytest.mark.parametrize("groups,padding,stride,dilation", [(1, 1, 1, 1), (6, 1, 2, 1), (2, 0, 1, 2), (3, 2, 2, 2)])
def test_gathered_patches_times_the_weights_are_the_convolution(groups, padding, stride, dilation):
    """Each gathered row (patch plus a one), dotted with a channel's weights and bias, is that channel's conv
    output at the sampled position: stride, padding, dilation and groups all gathered right."""
    g = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(6, 12, 3, stride=stride, padding=padding, dilation=dilation, groups=groups).double()
    x = torch.randn(2, 6, 11, 11, generator=g, dtype=torch.float64)
    call = {"weight": conv.weight, "bias": conv.bias, "stride": stride, "padding": padding, "dilation": dilation,
            "groups": groups, "linear": False}
    with torch.no_grad():
        out = F.conv2d(x, conv.weight, conv.bias, stride, padding, dilation, groups)  # [2, 12, H', W']
        rows = torch.randperm(out.shape[0] * out.shape[2] * out.shape[3], generator=g)[:23]
        patches = _patches(call, x, rows)  # [G, R, K+1]
        weights = torch.cat([conv.weight.reshape(groups, 12 // groups, -1), conv.bias.reshape(groups, -1, 1)], dim=2)
        predicted = (patches @ weights.transpose(1, 2)).transpose(0, 1).reshape(len(rows), 12)
        expected = out.permute(0, 2, 3, 1).reshape(-1, 12)[rows]  # positions image-major, as the rows count
    assert torch.allclose(predicted, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["fit", "refit"])
def test_paired_pass_equals_sequential_calibration(method, monkeypatch):
    """Each site's search sees the quantized network's input with every earlier site already calibrated:
    rerunning the search on the finished network's own inputs reproduces every parameter."""
    monkeypatch.setattr(pconv.calibration.fit, "SAMPLES_PER_CHANNEL", 10**9)  # every position, as search_site takes them
    model = nets.vgg_small().double()
    batches = [b.double() for b in calib_batches(n=2)]
    sites = find_sites(model, batches[0][:1])
    thetas = {s.name: torch.full((s.channels,), 2.0) for s in sites}
    qnet = copy.deepcopy(model)
    modules = quantize(qnet, sites, thetas, 4)
    for m in modules.values():
        m.double()
    start = {n: m.theta.clone() for n, m in modules.items()}
    CALIBRATIONS.get(method).run(qnet, modules, ImageBatches(batches), 2**30, NoProgress())
    ann = copy.deepcopy(model)
    images = torch.cat(batches)
    seen_q, seen_ann = {}, {}
    for name, module in modules.items():
        module.tap = lambda x, y, name=name: seen_q.__setitem__(name, x)
    hooks = [ann.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen_ann.__setitem__(n, i[0]))
             for n in modules]
    with torch.no_grad():
        qnet(images)
        ann(images)
    for h in hooks:
        h.remove()
    for name, module in modules.items():
        theta, delta_in, delta_out = search_site(seen_q[name], seen_ann[name], start[name].double(), 4,
                                                 module.cap)
        assert torch.allclose(module.theta, theta.to(module.theta)), name
        assert torch.allclose(module.delta_in, delta_in.to(module.theta), atol=1e-12), name
        assert torch.allclose(module.delta_out, delta_out.to(module.theta), atol=1e-9), name
    changed = changed_weights(model, qnet, sites)
    if method == "fit":
        assert changed == {}
    else:  # every conv/linear after the first is refitted (weight and bias)
        layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert set(changed) == {f"{n}.{leaf}" for n in layers[1:] for leaf in ("weight", "bias")}


def test_fit_and_refit_beat_plain_qcfs_on_the_output_error():
    model = nets.vgg_small()
    batches = calib_batches(n=4)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = model(x)
    errors = {}
    for method in ("none", "fit", "refit"):
        snn = pconv.convert(model, batches, time_steps=4, threshold="max", method=method)
        with torch.no_grad():
            errors[method] = ((snn(x) - reference) ** 2).mean().item()
    assert errors["refit"] < errors["none"] / 2 and errors["fit"] < errors["none"] / 2, errors


def test_refitted_snn_round_trips_and_keeps_the_ann(tmp_path):
    model = nets.timm_resnet()
    batches = calib_batches()
    calibration = pconv.calibrate(model, batches, time_steps=[4, 8], method="refit")
    assert calibration.method == "refit" and set(calibration.weights) == {4, 8}
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    # calibration file -> same SNN
    calib_file = export.save_calibration(calibration, tmp_path / "c.safetensors")
    loaded = export.load_calibration(calib_file)
    assert set(loaded.weights) == {4, 8}
    assert all(torch.equal(loaded.weights[8][k], v) for k, v in calibration.weights[8].items())
    snn = pconv.convert(model, calibration, time_steps=8)
    again = pconv.convert(model, loaded, time_steps=8)
    snn_file = export.save(snn, tmp_path / "s.safetensors")
    reloaded = export.load(snn_file, trust_factory=True)
    with torch.no_grad():
        out = snn(x)
        assert torch.equal(out, again(x)) and torch.equal(out, reloaded(x))
        # the SNN's ANN is the source model, refit undone, before and after the file
        assert torch.equal(snn.to_ann()(x), model(x)) and torch.equal(reloaded.to_ann()(x), model(x))
    assert set(reloaded.ann_weights) == set(snn.ann_weights)
