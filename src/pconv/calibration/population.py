"""How many neurons per channel each site gets, the encoding sites included: a label-free sensitivity estimate
and a neuron budget.

Quantizing site s with L levels changes the ANN's output. To first order, the log-probability of the
class the ANN itself predicts moves by

    d_s(L) = sum over the site's positions of  g * e_L,     e_L = QCFS_L(x) - act(x),

where g is the gradient of that log-probability with respect to the site's output (one backward pass
serves every site) and e_L the site's quantization error at L levels, thresholds at the recorded channel
maxima. Its mean square over all the calibration images, S_s(L) = E[d_s(L)^2], is the site's sensitivity: the
same Fisher-weighted error the expected KL divergence between ANN and quantized network grows with. The
ANN's own prediction stands in for a label, so no label is needed.

A population of m neurons per channel gives a site m*T levels, for (m - 1) * neurons_s more neurons. Each
site's m is one of `population_choices` (1, 2, 3, 4, 6, 8, ... up to ceil(encoding_levels/T)).
`choose_populated` starts every site at m = 1 and repeatedly takes the one step, over every site and every
larger m, that gains the most S per added neuron, while the added neurons stay within the pool: `budget`
times the network's neurons, plus the ceil(encoding_levels/T) - 1 neurons per channel the encoding sites
would have without a budget. So a budget never costs the encoding population's neurons twice: the network
has as many neurons as when the encoding sites took theirs outright (until format version 6), and the
sensitivity decides where they go (at T=4 the stems of ResNet-20 and EfficientNet-Lite0 keep 4-6 of their 16
neurons per channel; the rest go to hidden sites, and the SNN's KL divergence from the ANN halves). Since S
falls about as 1/L^2, the first extra neuron of a site gains the most per neuron (3/4 of its S at m = 2), so
the pool spreads over many sites at small m before it deepens any.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..data.batches import ImageBatches
from ..nn import functional as PF
from ..nn.population import population_size
from ..observe.sites import Site, module_path, site_name
from ..utils import distributed
from ..utils.memory import TensorMeter
from ..utils.progress import Progress

Tick = Callable[[], None]

#: At most this many images per forward/backward (fewer when the memory budget says so).
MAX_CHUNK_IMAGES = 64


class _Sensitivity:
    """Accumulates S_site(L) over chunks of images (one forward and backward each)."""

    def __init__(self, model: nn.Module, sites: Sequence[Site], channel_max: Mapping[str, Tensor],
                 resolutions: Sequence[int]):
        self.model, self.sites, self.resolutions = model, list(sites), list(resolutions)
        self.device = next(model.parameters()).device
        self.theta = {}
        for site in self.sites:
            theta = channel_max[site.name].to(self.device).float().clamp_min(1e-6)
            self.theta[site.name] = theta if site.cap is None else theta.clamp(max=site.cap)
        self.totals = torch.zeros(len(self.sites), len(self.resolutions), dtype=torch.float64)
        self.neurons: dict[str, int] = {}
        self.images = 0

    def add(self, x: Tensor) -> None:
        captured: dict[str, tuple[Tensor, Tensor]] = {}
        calls: dict[str, int] = {}

        def tap(path: str):  # a module called at several places: its k-th call is the site path#k
            def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                calls[path] = calls.get(path, 0) + 1
                captured[site_name(path, calls[path])] = (inputs[0].detach(), output)
            return hook

        paths = sorted({module_path(s) for s in self.sites})
        handles = [self.model.get_submodule(path).register_forward_hook(tap(path)) for path in paths]
        try:
            with torch.enable_grad():
                x = x.to(self.device).detach().requires_grad_(True)  # every site output joins the graph
                logits = self.model(x.clone())  # a copy: a first activation in place may not write into a leaf
                own = logits.argmax(dim=1, keepdim=True)  # the ANN's prediction stands in for a label
                log_prob = logits.log_softmax(dim=1).gather(1, own).sum()
                outputs = [captured[s.name][1] for s in self.sites]
                grads = torch.autograd.grad(log_prob, outputs)
        finally:
            for handle in handles:
                handle.remove()
        with torch.no_grad():
            for i, (site, g) in enumerate(zip(self.sites, grads)):
                x_in, y = captured[site.name][0], outputs[i].detach()
                self.neurons[site.name] = y[0].numel()
                theta = self.theta[site.name]
                zero = torch.zeros_like(theta)
                for j, levels in enumerate(self.resolutions):
                    error = PF.qcfs(x_in, theta, zero, zero, levels) - y
                    shift = (g * error).flatten(1).sum(dim=1, dtype=torch.float64)
                    self.totals[i, j] += (shift * shift).sum().cpu()
        self.images += x.shape[0]


def site_sensitivity(model: nn.Module, sites: Sequence[Site], channel_max: Mapping[str, Tensor],
                     batches: Iterable[Tensor], resolutions: Sequence[int], budget: int,
                     progress: Tick | None = None) -> tuple[dict[tuple[str, int], float], dict[str, int]]:
    """({(site, L): S_site(L)} for every L in `resolutions`, {site: neurons per image}), over every image of
    `batches`, in chunks as large as `budget` allows (measured on one image), one tick per batch.

    `model` is the ANN with its activations in place (the sites' modules); it is not modified."""
    estimate = _Sensitivity(model, sites, channel_max, resolutions)
    batches = iter(batches)
    first = next(batches)
    meter = TensorMeter()
    with meter:
        estimate.add(first[:1])
    chunk = int(max(1, min(MAX_CHUNK_IMAGES, budget // max(meter.peak, 1))))
    for x in itertools.chain([first[1:]], batches):
        for part in x.split(chunk) if x.shape[0] else ():
            estimate.add(part)
        if progress:
            progress()
    totals = distributed.reduce_sum(estimate.totals.to(estimate.device)).cpu()
    count = max(distributed.reduce_count(estimate.images), 1)
    sensitivity = {(s.name, L): float(totals[i, j]) / count
                   for i, s in enumerate(sites) for j, L in enumerate(resolutions)}
    return sensitivity, estimate.neurons


def population_choices(largest: int) -> list[int]:
    """The neurons per channel a hidden site may get: 1, 2, 3, 4, 6, 8, 12, ... (2^k and 3 * 2^k) below
    `largest`, and `largest` itself. A geometric set keeps the sensitivity pass to a few resolutions per T
    (every m up to 64 at T=1 would be 64 of them) while the steps that matter most, the first few, are all there."""
    sizes, k = {1, largest}, 1
    while k < largest:
        sizes.update(m for m in (k, 3 * k // 2) if m < largest)
        k *= 2
    return sorted(sizes)


def choose_populated(sites: Sequence[Site], sensitivity: Mapping[tuple[str, int], float],
                     neurons: Mapping[str, int], time_steps: int, largest: int, budget: float) -> dict[str, int]:
    """{site: neurons per channel} at T, each at most `largest`: repeatedly the step (a site, a larger m among
    population_choices) with the best gain in sensitivity per added neuron, while the added neurons stay
    within the pool (`budget` times the network's neurons plus the encoding sites' largest - 1 neurons per
    channel). Every encoding site is in the result, with 1 if it gained nothing; a hidden site only with
    m > 1. Ties go to the earlier site, then the smaller m. No budget: {} (the encoding sites keep `largest`)."""
    if largest <= 1 or budget <= 0:
        return {}
    encoding_pool = sum((largest - 1) * neurons[s.name] for s in sites if s.encoding)
    allowed = budget * sum(neurons[s.name] for s in sites) + encoding_pool
    choices = population_choices(largest)
    size = {s.name: 1 for s in sites}
    used = 0
    while True:
        best = None  # (gain per neuron, site, m, added neurons)
        for name, current in size.items():
            for m in choices:
                added = (m - current) * neurons[name]
                if m <= current or used + added > allowed:
                    continue
                gain = sensitivity[(name, current * time_steps)] - sensitivity[(name, m * time_steps)]
                if gain > 0 and (best is None or gain / added > best[0]):
                    best = (gain / added, name, m, added)
        if best is None:
            break
        _, name, m, added = best
        size[name] = m
        used += added
    encoding = {s.name for s in sites if s.encoding}
    return {name: m for name, m in size.items() if m > 1 or name in encoding}


def choose_population(model: nn.Module, sites: list[Site], channel_max: Mapping[str, Tensor], batches: ImageBatches,
                      steps: Sequence[int], encoding_levels: int, budget: float, memory_budget: int,
                      progress: Progress) -> dict[int, dict[str, int]]:
    """Per T, {site: neurons per channel} within the neuron `budget` (none when it is 0: the encoding sites then
    take ceil(encoding_levels/T) outright), from one sensitivity pass over every image; `model` is the ANN."""
    size = {T: population_size(T, encoding_levels) for T in steps}
    wanted = [T for T in steps if size[T] > 1]
    if budget <= 0 or not wanted:
        return {}
    resolutions = sorted({m * T for T in wanted for m in population_choices(size[T])})
    ticks = progress.stage("measuring site sensitivity", len(batches))
    sensitivity, neurons = site_sensitivity(model, sites, channel_max, batches, resolutions,
                                            max(memory_budget - batches.held_bytes, 0), ticks)
    chosen = {T: choose_populated(sites, sensitivity, neurons, T, size[T], budget) for T in wanted}
    return {T: sizes for T, sizes in chosen.items() if sizes}
