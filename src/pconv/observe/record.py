"""Record per-channel activation statistics on calibration images (no labels).

Observers wrap each activation module, run it, and look at its *output* (timm's ReLUs are in place,
so the input is already overwritten). Two streaming passes: the channel maxima, then a histogram per
channel over [0, max]. Nothing holds the activations themselves, so memory does not grow with the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..config import DEFAULT_BINS
from ..utils import distributed
from .sites import Site, site_modules, swap_sites, unswap_sites


@dataclass
class ChannelStats:
    """Per-channel statistics of one site's output, over all calibration positions."""

    max: Tensor  # [C]
    hist: Tensor | None  # [C, bins] counts of values in [0, max], float64
    count: int  # values per channel

    @property
    def bins(self) -> int:
        return 0 if self.hist is None else self.hist.shape[1]


def channels_last_2d(y: Tensor) -> Tensor:
    """[B, C, ...] -> [C, B*...]: one row of values per channel."""
    return y.transpose(0, 1).reshape(y.shape[1], -1)


class Stage(Enum):
    """What an observer's pass records: the channel maxima first, then histograms over [0, max]."""

    MAX = "max"
    HISTOGRAM = "histogram"


class ActivationObserver(nn.Module):
    """Runs the wrapped activation and records statistics of its output; returns the output unchanged."""

    def __init__(self, activation: nn.Module, bins: int = DEFAULT_BINS):
        super().__init__()
        self.activation = activation
        self.bins = bins
        self.stage = Stage.MAX
        self.max: Tensor | None = None
        self.hist: Tensor | None = None
        self.count = 0

    def forward(self, x: Tensor) -> Tensor:
        y = self.activation(x)
        values = channels_last_2d(y.detach()).float()
        if self.stage is Stage.MAX:
            batch_max = values.amax(dim=1)
            self.max = batch_max if self.max is None else torch.maximum(self.max, batch_max)
            self.count += values.shape[1]
        else:
            self._add_to_histogram(values)
        return y

    def _add_to_histogram(self, values: Tensor) -> None:
        channels = values.shape[0]
        top = self.max.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
        idx = torch.clamp((values / top * self.bins).long(), 0, self.bins - 1)
        idx = idx + torch.arange(channels, device=values.device).unsqueeze(1) * self.bins
        counts = torch.bincount(idx.flatten(), minlength=channels * self.bins).view(channels, self.bins)
        counts = counts.to(torch.float64)
        self.hist = counts if self.hist is None else self.hist + counts

    def compute(self) -> ChannelStats:
        # Statistics live on the CPU: they are small, and threshold search should not depend on the device.
        return ChannelStats(max=self.max.cpu(), hist=None if self.hist is None else self.hist.cpu(), count=self.count)


def run_batches(model: nn.Module, batches: Sequence[Tensor], device: torch.device,
                on_batch: Callable[[], None] | None = None) -> None:
    with torch.inference_mode():
        for x in batches:
            model(x.to(device, non_blocking=True))
            if on_batch:
                on_batch()


def record_activations(
    model: nn.Module,
    sites: Sequence[Site],
    batches: Sequence[Tensor],
    histograms: bool = True,
    bins: int = DEFAULT_BINS,
    progress: Callable[[], None] | None = None,
) -> dict[str, ChannelStats]:
    """Per-site channel statistics. `model` is modified during the call and restored afterwards."""
    originals = site_modules(model, sites)
    observers = swap_sites(model, sites, lambda module, site: ActivationObserver(module, bins))
    device = next(model.parameters()).device
    try:
        run_batches(model, batches, device, progress)
        for obs in observers.values():  # under torch.distributed: the maxima over every rank's images
            obs.max = distributed.reduce_max(obs.max)
            obs.count = distributed.reduce_count(obs.count)
        if histograms:
            for obs in observers.values():
                obs.stage = Stage.HISTOGRAM
            run_batches(model, batches, device, progress)
            for obs in observers.values():  # histograms share bin edges, so they merge by addition
                obs.hist = distributed.reduce_sum(obs.hist)
    finally:
        unswap_sites(model, sites, lambda site: originals[site.name])
    return {name: obs.compute() for name, obs in observers.items()}
