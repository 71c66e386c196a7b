"""Which hidden sites to population-code: a label-free sensitivity estimate and a neuron budget.

Quantizing site s with L levels changes the ANN's output. To first order, the log-probability of the
class the ANN itself predicts moves by

    d_s(L) = sum over the site's positions of  g * e_L,     e_L = QCFS_L(x) - act(x),

where g is the gradient of that log-probability with respect to the site's output (one backward pass
serves every site) and e_L the site's quantization error at L levels, thresholds at the recorded channel
maxima. Its mean square over all the calibration images, S_s(L) = E[d_s(L)^2], is the site's sensitivity: the
same Fisher-weighted error the expected KL divergence between ANN and quantized network grows with. The
ANN's own prediction stands in for a label, so no label is needed.

A population of m neurons per channel gives a site m*T levels. Coding site s that way gains
S_s(T) - S_s(m*T) for (m - 1) * neurons_s more neurons. `choose_populated` takes the sites with the
largest gain per added neuron until the extra neurons would exceed `budget` times the network's neurons.
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
                logits = self.model(x)
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


def choose_populated(sites: Sequence[Site], sensitivity: Mapping[tuple[str, int], float],
                     neurons: Mapping[str, int], time_steps: int, population: int, budget: float) -> list[str]:
    """The hidden (non-encoding) sites to give `population` neurons per channel at T, best gain per added
    neuron first, while the added neurons stay within `budget` times the network's neurons."""
    if population <= 1 or budget <= 0:
        return []
    allowed = budget * sum(neurons[s.name] for s in sites)
    levels = population * time_steps
    ranked = []
    for site in sites:
        if site.encoding:
            continue
        gain = sensitivity[(site.name, time_steps)] - sensitivity[(site.name, levels)]
        cost = (population - 1) * neurons[site.name]
        if gain > 0:
            ranked.append((gain / cost, site.name, cost))
    ranked.sort(key=lambda r: (-r[0], r[1]))
    chosen, used = [], 0
    for _, name, cost in ranked:
        if used + cost <= allowed:
            chosen.append(name)
            used += cost
    order = {s.name: i for i, s in enumerate(sites)}
    return sorted(chosen, key=order.get)


def choose_population(model: nn.Module, sites: list[Site], channel_max: Mapping[str, Tensor], batches: ImageBatches,
                      steps: Sequence[int], encoding_levels: int, budget: float, memory_budget: int,
                      progress: Progress) -> dict[int, list[str]]:
    """Per T, the hidden sites to population-code within the neuron `budget` (none when it is 0), from one
    sensitivity pass over every image; `model` is the ANN."""
    size = {T: population_size(T, encoding_levels) for T in steps}
    wanted = [T for T in steps if size[T] > 1]
    if budget <= 0 or not wanted:
        return {}
    resolutions = sorted({L for T in wanted for L in (T, size[T] * T)})
    ticks = progress.stage("measuring site sensitivity", len(batches))
    sensitivity, neurons = site_sensitivity(model, sites, channel_max, batches, resolutions,
                                            max(memory_budget - batches.held_bytes, 0), ticks)
    chosen = {T: choose_populated(sites, sensitivity, neurons, T, size[T], budget) for T in wanted}
    return {T: names for T, names in chosen.items() if names}
