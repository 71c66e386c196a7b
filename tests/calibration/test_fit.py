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
                                   BIN_PIECE, SiteHistogram, histogram_bins, search_histogram, search_site)
from pconv.utils.memory import peak_tensor_bytes, tensor_bytes
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


def direct_sums(q, y, scale, offset, levels):
    """(sum k*y, sum k^2) of one channel's candidates by evaluating k at every position."""
    k = torch.clamp(torch.floor(scale.unsqueeze(1) * q + offset.unsqueeze(1)), 0, levels)
    return torch.stack([(k * y).sum(dim=1), (k * k).sum(dim=1)], dim=1)


def test_histogram_sums_are_exact_at_bin_edges_and_spread_positions_evenly_within_a_bin():
    """Breakpoints on bin edges: the histogram's sums are the direct ones. Inside a bin it counts the part of
    the bin above the breakpoint: exact in the limit of positions spread evenly, off by a fraction of one
    bin's positions otherwise."""
    bins, levels = 64, 4
    theta = torch.tensor([2.0, 3.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    # channel 0: positions evenly spread, 1,000 per bin (and some beyond theta, some negative); channel 1: random
    even = (torch.arange(-5000, 70000, dtype=torch.float64) + 0.5) / 1000 * 2.0 / bins
    rand = torch.rand(75000, generator=g, dtype=torch.float64) * 3.6 - 0.3
    q = torch.stack([even, rand])
    y = (q + 0.1 * torch.randn(q.shape, generator=g, dtype=torch.float64)).relu()
    histogram = SiteHistogram(theta, bins)
    histogram.add(q.unsqueeze(0), y.unsqueeze(0))
    assert histogram.count.sum().item() == q.numel()  # every position is in some bin
    # breakpoints (j - offset)/scale on edges: scale = levels/theta, offsets 0.5 + shift, shift a multiple of 1/16
    edge_offsets = torch.tensor([[0.5, 0.25, 0.6875]], dtype=torch.float64).expand(2, 3)
    edge_scales = (levels / theta).unsqueeze(1).expand(2, 3)
    sums = histogram.sums(edge_scales, edge_offsets, levels)
    for c in range(2):
        assert torch.allclose(sums[c], direct_sums(q[c], y[c], edge_scales[c], edge_offsets[c], levels), rtol=1e-12)
    # breakpoints anywhere: near-exact for the evenly spread channel, within one bin's share for the random one
    scales = levels / (theta.unsqueeze(1) * torch.tensor([[0.33, 0.71, 0.97]], dtype=torch.float64))
    offsets = torch.tensor([[0.41, 0.5, 0.77]], dtype=torch.float64).expand(2, 3)
    sums = histogram.sums(scales, offsets, levels)
    exact = direct_sums(q[0], y[0], scales[0], offsets[0], levels)
    assert torch.allclose(sums[0], exact, rtol=2e-4)
    exact = direct_sums(q[1], y[1], scales[1], offsets[1], levels)
    per_bin = histogram.count.view(2, -1)[1, 1:-1].max()
    assert ((sums[1, :, 1] - exact[:, 1]).abs() <= levels ** 2 * per_bin).all()
    assert not torch.allclose(sums[1], exact, rtol=1e-9)  # and not exact there


def test_histogram_adds_up_over_batches_and_pieces(monkeypatch):
    """Binned in pieces of a few thousand elements, in two batches, or all at once: the same histogram."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(6, 5, 7, 9, generator=g)
    y = q.relu() * 1.5
    theta = torch.full((5,), 1.5)
    whole = SiteHistogram(theta, 128)
    whole.add(q, y)
    monkeypatch.setattr(pconv.calibration.fit, "BIN_PIECE", 100)  # fewer elements than one image has
    pieces = SiteHistogram(theta, 128)
    pieces.add(q[:2], y[:2])
    pieces.add(q[2:], y[2:])
    assert torch.equal(pieces.count, whole.count)
    assert torch.allclose(pieces.y_sum, whole.y_sum, rtol=1e-12)
    rows = whole.count.view(5, -1)
    assert torch.equal(rows[:, 0], (q <= 0).sum(dim=(0, 2, 3)).double())  # at or below 0: no spike
    assert torch.equal(rows[:, -1], (q >= 1.5).sum(dim=(0, 2, 3)).double())  # theta and above: every level


def test_search_lookups_within_a_budget_choose_the_same_and_collecting_holds_a_bounded_piece():
    """The breakpoint lookups of 48 channels at 256 levels hold 80 MB at once; within a 1 MB budget they
    take a few candidates at a time, hold the budget beyond the histogram's cumulative sums (its own size),
    and choose the same. Binning a large batch holds a bounded piece of it at a time."""
    g = torch.Generator().manual_seed(1)
    y = torch.randn(48, 4000, generator=g).relu() * torch.linspace(0.5, 3.0, 48).unsqueeze(1)
    q = y + 0.1 * torch.randn(y.shape, generator=g)
    theta = y.amax(dim=1)
    histogram = SiteHistogram(theta, histogram_bins(256))
    histogram.add(q.unsqueeze(0), y.unsqueeze(0))
    size = tensor_bytes(histogram.count) + tensor_bytes(histogram.y_sum)
    budget = 1 << 20
    for a, b in zip(search_histogram(histogram, theta, 256), search_histogram(histogram, theta, 256, budget)):
        assert torch.equal(a, b)
    assert peak_tensor_bytes(search_histogram, histogram, theta, 256) > size + 40 * budget
    assert peak_tensor_bytes(search_histogram, histogram, theta, 256, budget) <= size + budget
    batch = torch.randn(16, 64, 100, 100, generator=g)  # 10 M elements, 41 MB
    histogram = SiteHistogram(torch.ones(64), 4096)
    assert peak_tensor_bytes(histogram.add, batch, batch.relu()) <= 2 * tensor_bytes(histogram.count) + 20 * BIN_PIECE


def test_site_search_finds_the_best_candidate_and_its_amplitude():
    """Against the direct evaluation of every candidate at every position (65,536 per channel, 16 per bin
    on average): the histogram's search makes the same choice, and its amplitude is the least-squares one to
    within the bins' resolution."""
    g = torch.Generator().manual_seed(0)
    x_ann = torch.randn(64, 3, 32, 32, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    x_q = x_ann + 0.2 * torch.randn(x_ann.shape, generator=g, dtype=torch.float64)  # upstream error
    base = torch.tensor([3.0, 5.0, 1.5], dtype=torch.float64)
    levels = 4
    theta, delta_in, delta_out = search_site(x_q, x_ann, base, levels, cap=None)
    shifts = set()
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
        shifts.add(s)
        _, amplitude = brute_force_error(q, y, theta[c], s, levels)
        assert (theta[c] + delta_out[c]).item() == pytest.approx(levels * amplitude.item(), rel=2e-5)
        # and the QCFS module with these parameters reaches that error
        out = pconv.nn.functional.qcfs(x_q[:, c:c + 1], theta[c:c + 1], delta_in[c:c + 1], delta_out[c:c + 1], levels)
        assert ((out.reshape(-1) - y) ** 2).mean().item() == pytest.approx(best.item(), rel=1e-8)
    assert len(shifts) > 1  # the channels chose different shifts: the test sees the shift's effect


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
def test_paired_pass_equals_sequential_calibration(method):
    """Each site's search sees the quantized network's input with every earlier site already calibrated:
    rerunning the search on the finished network's own inputs reproduces every parameter."""
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


def test_histogram_sums_count_the_overflow_levels_and_stop_at_each_candidates_top():
    """With an overflow neuron a candidate's k has levels + T steps over a histogram spanning (0, 2*theta); on
    a ReLU6 site each candidate stops at its own top. Breakpoints on bin edges: the sums are the direct ones."""
    bins, levels, extra = 64, 4, 4
    theta = torch.tensor([2.0, 3.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    q = torch.rand(2, 40000, generator=g, dtype=torch.float64) * 6.5 - 0.2
    y = (q + 0.1 * torch.randn(q.shape, generator=g, dtype=torch.float64)).relu()
    histogram = SiteHistogram(2 * theta, 2 * bins)
    histogram.add(q.unsqueeze(0), y.unsqueeze(0))
    offsets = torch.tensor([[0.5, 0.25, 0.6875]], dtype=torch.float64).expand(2, 3)
    scales = (levels / theta).unsqueeze(1).expand(2, 3)  # breakpoints on edges of bins of theta/64
    sums = histogram.sums(scales, offsets, levels + extra)
    for c in range(2):
        assert torch.allclose(sums[c], direct_sums(q[c], y[c], scales[c], offsets[c], levels + extra), rtol=1e-12)
    plain = histogram.sums(scales, offsets, levels)
    assert (sums[..., 1] > plain[..., 1]).all()  # the overflow levels count
    top = torch.tensor([[4.0, 6.0, 8.0], [5.0, 4.0, 7.0]], dtype=torch.float64)
    capped = histogram.sums(scales, offsets, levels + extra, top=top)
    for c in range(2):
        for j in range(3):
            k = torch.clamp(torch.floor(scales[c, j] * q[c] + offsets[c, j]), 0, top[c, j])
            assert torch.allclose(capped[c, j], torch.stack([(k * y[c]).sum(), (k * k).sum()]), rtol=1e-12)


def test_fit_searches_with_the_overflow_neuron_in_place():
    """Inputs that run past the recorded maximum (as unseen images' do): searched with its overflow neuron in
    place, a site reproduces the ANN better with that neuron than a search made without it, and no worse than
    the plain site searched for itself."""
    from pconv.calibration.fit import Overflow
    from pconv.nn import functional as PF
    g = torch.Generator().manual_seed(3)
    T = 4
    x_ann = torch.randn(64, 6, 8, 8, generator=g) * torch.linspace(0.5, 2.0, 6).view(1, 6, 1, 1) + 0.3
    x_q = x_ann + 0.05 * torch.randn(x_ann.shape, generator=g)
    theta = x_ann[:32].clamp_min(0).amax(dim=(0, 2, 3))  # the first half's maxima: the rest overshoots them
    y = activation(x_ann, None)

    def error(params, overflow):
        out = PF.qcfs(x_q, *params, T, overflow=overflow)
        return ((out - y) ** 2).mean().item()

    aware = search_site(x_q, x_ann, theta, T, None, Overflow(T))
    unaware = search_site(x_q, x_ann, theta, T, None)
    assert error(aware, True) < error(unaware, True)
    assert error(aware, True) < error(unaware, False)
