"""Threshold methods: turn recorded channel statistics into per-channel QCFS thresholds theta."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..errors import ConfigError
from ..utils.registry import Registry
from .record import ChannelStats

#: No threshold is allowed to be zero or negative: a dead channel gets this tiny positive one.
MIN_THETA = 1e-6


@dataclass(frozen=True)
class ThresholdMethod:
    """A registered threshold method: how it turns statistics into thresholds, and what it needs."""

    name: str
    compute: Callable[[ChannelStats, int, "ThresholdSpec"], Tensor]
    needs_histogram: bool  # the statistics must hold per-channel histograms (a second recording pass)
    takes_value: bool = False  # written NAME:VALUE, e.g. percentile:99.99
    summary: str = ""


THRESHOLDS: Registry[ThresholdMethod] = Registry("threshold method")


def threshold_method(name: str, needs_histogram: bool, takes_value: bool = False):
    """Register the decorated function as the threshold method `name`."""
    def add(fn: Callable[[ChannelStats, int, "ThresholdSpec"], Tensor]) -> Callable:
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        THRESHOLDS.register(name)(ThresholdMethod(name, fn, needs_histogram, takes_value, summary))
        return fn
    return add


@dataclass(frozen=True)
class ThresholdSpec:
    """A parsed threshold method such as `max`, `percentile:99.99` or `mse`."""

    method: str
    value: float | None = None

    def __post_init__(self):
        method = THRESHOLDS.get(self.method)  # raises with suggestions
        if method.takes_value:
            if self.value is None or not (0.0 < self.value <= 100.0):
                raise ConfigError(f"{self.method} needs a value in (0, 100], got {self.value}",
                                  f"write it as {self.method}:99.99")
        elif self.value is not None:
            raise ConfigError(f"threshold method {self.method!r} takes no value", f"write it as {self.method}")

    @classmethod
    def parse(cls, text: "str | ThresholdSpec") -> "ThresholdSpec":
        if isinstance(text, ThresholdSpec):
            return text
        method, _, value = text.strip().partition(":")
        if value:
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"bad threshold value in {text!r}", "write it as percentile:99.99") from None
            return cls(method, number)
        return cls(method)

    def __str__(self) -> str:
        return self.method if self.value is None else f"{self.method}:{self.value:g}"

    @property
    def needs_histogram(self) -> bool:
        return THRESHOLDS.get(self.method).needs_histogram

    def compute(self, stats: ChannelStats, levels: int) -> Tensor:
        theta = THRESHOLDS.get(self.method).compute(stats, levels, self)
        return theta.clamp_min(MIN_THETA).float()


def _bin_edges(stats: ChannelStats) -> Tensor:
    """Upper bin edges, [C, bins]."""
    steps = torch.arange(1, stats.bins + 1, dtype=torch.float64) / stats.bins
    return stats.max.double().unsqueeze(1) * steps


@threshold_method("max", needs_histogram=False)
def max_threshold(stats: ChannelStats, levels: int, spec: ThresholdSpec) -> Tensor:
    """The channel maximum over the calibration set (the paper's choice)."""
    return stats.max


@threshold_method("percentile", needs_histogram=True, takes_value=True)
def percentile_threshold(stats: ChannelStats, levels: int, spec: ThresholdSpec) -> Tensor:
    """Smallest histogram edge below which q% of the channel's values lie (exact to max/bins)."""
    cdf = stats.hist.cumsum(dim=1) / stats.hist.sum(dim=1, keepdim=True).clamp_min(1)
    idx = torch.searchsorted(cdf, torch.full((cdf.shape[0], 1), spec.value / 100.0, dtype=cdf.dtype) - 1e-12)
    idx = idx.clamp(max=stats.bins - 1)
    return _bin_edges(stats).gather(1, idx).squeeze(1)


def _qcfs_error(centers: Tensor, hist: Tensor, theta: Tensor, levels: int) -> Tensor:
    """Expected squared error of QCFS (phi = 1/2) on the histogram, for one candidate theta per channel."""
    t = theta.unsqueeze(1)
    q = t / levels * torch.clamp(torch.floor(levels * centers / t + 0.5), 0, levels)
    return ((q - centers) ** 2 * hist).sum(dim=1)


@threshold_method("mse", needs_histogram=True)
def mse_threshold(stats: ChannelStats, levels: int, spec: ThresholdSpec, candidates: int = 200) -> Tensor:
    """The theta in (0, max] that minimises the QCFS quantization error at L = T on this channel."""
    edges = _bin_edges(stats)
    centers = edges - stats.max.double().unsqueeze(1) / (2 * stats.bins)
    best_err = torch.full((stats.hist.shape[0],), float("inf"), dtype=torch.float64)
    best = stats.max.double().clone()
    for fraction in torch.linspace(1.0 / candidates, 1.0, candidates, dtype=torch.float64):
        theta = stats.max.double() * fraction
        err = _qcfs_error(centers, stats.hist, theta.clamp_min(MIN_THETA), levels)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, theta, best)
    return best
