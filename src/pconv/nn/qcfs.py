"""Replace each activation site by DA-QCFS with L levels (the count-domain twin of the SNN)."""

from __future__ import annotations

from enum import Enum
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..observe.sites import Site, swap_sites
from . import functional as PF


def activation(x: Tensor, cap: float | None) -> Tensor:
    """The ANN's activation at a site: ReLU, or ReLU6 when cap = 6."""
    return x.clamp_min(0) if cap is None else x.clamp(0, cap)


class QCFSMode(Enum):
    QUANT = "quant"  # DA-QCFS, the count-domain twin of the site's neurons
    CLIP = "clip"  # clamp(x, 0, theta) (or the overflow levels' top): the reference DA calibration aims at
    STE = "ste"  # QUANT's values, with the floor's gradient passed straight through (recon trains through it)
    ANN = "ann"  # the ANN activation the site replaces (the reference recon reconstructs)


class QCFS(nn.Module):
    """Per-channel DA-QCFS activation.

    QCFSMode.QUANT: (theta+delta_out)/L * clamp(floor(L*(x+delta_in)/theta + 1/2), 0, L)
    QCFSMode.CLIP:  clamp(x, 0, theta), the full-precision reference that calibration aims at (up to the
                    top of the overflow neuron's levels where the site has one).
    A `tap` callback, when set, sees (input, output) of every call; calibration uses it. With `bypass` set,
    the module returns its input unchanged (the paired pass computes the output in a hook instead).
    With a population of m neurons per channel (an encoding site), L = m*T: `levels` stays T and
    `resolution` is m*T, the levels calibration works with.
    """

    def __init__(self, theta: Tensor, levels: int, cap: float | None = None, population: int = 1,
                 overflow: bool = False):
        super().__init__()
        self.cap = cap  # ReLU6: 6.0; the ANN activation this site replaces is clamp(x, 0, cap)
        self.levels = int(levels)
        self.population = int(population)
        #: the site has an overflow neuron: up to T more levels above the top one (functional.qcfs)
        self.overflow = bool(overflow)
        self.register_buffer("theta", theta.detach().clone().float())
        self.register_buffer("delta_in", torch.zeros_like(self.theta))
        self.register_buffer("delta_out", torch.zeros_like(self.theta))
        self.mode = QCFSMode.QUANT
        self.bypass = False
        self.tap: Callable[[Tensor, Tensor], None] | None = None
        #: in STE mode, a bool mask (of the input's shape) of the values that pass unrounded (recon's QDrop)
        self.relaxed: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.bypass:
            return x
        if self.mode is QCFSMode.CLIP:
            y = torch.minimum(x.clamp_min(0), PF.per_channel(self.top_value(), x))
        elif self.mode is QCFSMode.STE:
            y = PF.qcfs_straight_through(x, self.theta, self.delta_in, self.delta_out, self.resolution,
                                         relaxed=self.relaxed)
            if self.overflow:  # the overflow neuron's levels, as constants: recon trains the site without them
                y = y + (self.quantized(x.detach()) - PF.qcfs(x.detach(), self.theta, self.delta_in, self.delta_out,
                                                              self.levels, population=self.population)).detach()
        elif self.mode is QCFSMode.ANN:
            y = self.activation(x)
        else:
            y = self.quantized(x)
        if self.tap is not None:
            self.tap(x, y)
        return y

    def activation(self, x: Tensor) -> Tensor:
        """The ANN activation this site replaces."""
        return activation(x, self.cap)

    def quantized(self, x: Tensor) -> Tensor:
        """The count-domain output, bit for bit the one of the site's spiking neurons."""
        return PF.qcfs(x, self.theta, self.delta_in, self.delta_out, self.levels, population=self.population,
                       overflow=self.overflow, cap=self.cap)

    def top_value(self) -> Tensor:
        """[C]: the largest input the site represents: theta, and with an overflow neuron the levels it adds
        above (theta*(L + E)/L, functional.overflow_levels at the threshold); CLIP mode clips there."""
        if not self.overflow:
            return self.theta
        L = self.resolution
        return self.theta * (L + PF.overflow_levels(self.theta, L, self.levels, self.cap)) / L

    @property
    def resolution(self) -> int:
        """Quantization levels of the site: T, or m*T for a population of m neurons per channel."""
        return self.levels * self.population

    def extra_repr(self) -> str:
        pop = f", population={self.population}" if self.population > 1 else ""
        over = ", overflow=True" if self.overflow else ""
        return f"channels={self.theta.numel()}, L={self.levels}{pop}{over}, mode={self.mode.value}"


def quantize(model: nn.Module, sites: Sequence[Site], thetas: Mapping[str, Tensor], levels: int,
             populations: Mapping[str, int] | None = None, overflow: Sequence[str] = ()) -> dict[str, QCFS]:
    """Swap every site of `model` (in place) for QCFS with its threshold; returns the new modules.
    `populations` gives the neurons per channel of the population-coded sites (Calibration.populations);
    a site it leaves out has one. The sites named in `overflow` have an overflow neuron."""
    populations = populations or {}
    overflow = set(overflow)
    device = next(model.parameters()).device

    def make(module: nn.Module, site: Site) -> QCFS:
        theta = thetas[site.name].to(device)
        if site.cap is not None:
            theta = theta.clamp(max=site.cap)
        return QCFS(theta, levels, site.cap, populations.get(site.name, 1), site.name in overflow)

    return swap_sites(model, sites, make)
