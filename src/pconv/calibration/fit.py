"""`fit`: calibrate every site against the ANN itself, layer by layer, in the paired pass (paired.py).

At every site the paired pass gives the quantized network's input x_q (every earlier site already
calibrated) and the ANN's x_ann, over all calibration images. Per channel, a grid search over the threshold
(fractions of the recorded one) and the rounding shift delta_in, refined around its best point, keeps the
pair whose output, at its least-squares amplitude, is closest to the ANN's:
    k         = clamp(floor(T*(x_q + delta_in)/theta + 1/2), 0, T)      the spike count
    theta_out = T * E[k*y] / E[k^2]                                      y = ReLU(x_ann) (or ReLU6)
    error     = E[(theta_out/T * k - y)^2]
over every position of every image. Only two sums per candidate are needed, Σk·y and Σk², and k is a step
function of x_q whose steps all lie in (0, theta): so a histogram of x_q over (0, theta) per channel, with
the count and the sum of y in each bin, gives both for any candidate (within a bin the positions are taken
as spread evenly). The histogram has a fixed size per channel, adds over images, batches and processes, and
so the search sees every position whatever the number of images, in memory that does not grow with it.

A site with an overflow neuron counts up to T more levels above the top one (functional.qcfs): its k has
L + T steps, the last ones above the candidate's threshold, so its histogram spans (0, 2*theta) (the same bins,
twice as many), and on a ReLU6 site a candidate counts only the levels its threshold leaves below the cap. Searched
without them, the amplitude would be fitted to positions the overflow neuron then adds to a second time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..data.batches import ImageBatches
from ..nn import functional as PF
from ..nn.qcfs import QCFS, activation
from ..utils import distributed
from ..utils.progress import Progress
from .methods import calibration_method
from .paired import PairedPass, Point, run_paired

#: Thresholds tried, as fractions of the recorded threshold (the --threshold method's value).
THRESHOLD_FRACTIONS = torch.linspace(0.2, 1.0, 33).tolist()
#: Rounding shifts tried, in quantization steps (theta/T).
SHIFT_STEPS = (-0.25, 0.0, 0.25)
#: Second stage, around each channel's first-stage choice: offsets of the fraction and of the shift (both
#: include 0, so the second stage never does worse than the first).
REFINE_FRACTIONS = torch.linspace(-0.0125, 0.0125, 5).tolist()
REFINE_SHIFTS = (-0.125, 0.0, 0.125)
#: Smallest threshold fraction considered.
MIN_FRACTION = 0.05
#: Histogram bins per channel over (0, theta): BINS_PER_LEVEL per quantization step, at least MIN_BINS. The
#: finest move of the search, a refinement step of the threshold, shifts the top breakpoint by 0.00625 theta,
#: 25 bins of 4,096. Until 2026-12-05 the search ran on a sample of 32,768 positions per channel (8 bytes
#: each); the histogram takes 16 bytes per bin, 64 KiB per channel up to 64 levels, and no position is left
#: out, so the result no longer depends on which positions a sample drew (docs/accuracy.md).
BINS_PER_LEVEL = 64
MIN_BINS = 4096
#: Elements of a site's input binned at a time, so that collecting holds a few bounded temporaries whatever
#: the batch (about 16 bytes per element beyond the histogram, measured with TensorMeter: the bin index and
#: the ANN's output in float64).
BIN_PIECE = 1 << 20
#: Bytes a breakpoint lookup holds per (candidate, level, channel) element (breakpoints, bin positions, the
#: gathered counts and sums).
LOOKUP_BYTES = 48
#: The most a lookup step takes, however large the budget: larger steps are no faster.
LOOKUP_ELEMENTS = 1 << 24
#: The share of the calibration's memory budget the lookups of one site may hold at a time (the paired pass
#: and the kept images take the rest; the histogram, a fixed size per site, is beside the budget).
SEARCH_BUDGET_SHARE = 0.25


def histogram_bins(levels: int) -> int:
    return max(MIN_BINS, BINS_PER_LEVEL * levels)


class SiteHistogram:
    """Per channel, the positions' count and the sum of the ANN's outputs y in each of `bins` equal bins of the
    quantized network's input q over (0, theta), after a bin for q <= 0 and before one for q >= theta.

    Every breakpoint a candidate can have lies inside (0, theta): with k = clamp(floor(scale*q + offset), 0, L),
    q >= t_j = (j - offset)/scale for j = 1..L, offset = 1/2 + shift with |shift| < 1/2 and the candidate's
    threshold at most theta, so 0 < t_1 and t_L < theta. The positions in the outer bins therefore spike at no
    level, or at every level, for all candidates alike."""

    def __init__(self, theta: Tensor, bins: int):
        self.channels = len(theta)
        self.bins = bins
        self.width = (theta.detach().double() / bins).clamp_min(torch.finfo(torch.float64).tiny)
        self.row = bins + 2  # [q <= 0 | bins over (0, theta) | q >= theta]
        self.count = torch.zeros(self.channels * self.row, dtype=torch.float64, device=theta.device)
        self.y_sum = torch.zeros_like(self.count)

    def add(self, q: Tensor, y: Tensor) -> None:
        """Add the positions of q and y, both [B, C, ...]."""
        if q.numel() == 0:
            return
        q, y = q.reshape(q.shape[0], self.channels, -1), y.reshape(y.shape[0], self.channels, -1)
        images, channels, positions = q.shape
        width = self.width.to(q.device).view(1, channels, 1)
        start = (torch.arange(channels, device=q.device) * self.row).view(1, channels, 1)
        # a piece is some images whole, or some positions of one image
        per_image = channels * positions
        image_step = max(1, BIN_PIECE // per_image)
        position_step = positions if image_step > 1 else max(1, BIN_PIECE // channels)
        for i in range(0, images, image_step):
            for p in range(0, positions, position_step):
                qp = q[i:i + image_step, :, p:p + position_step]
                yp = y[i:i + image_step, :, p:p + position_step]
                inside = (qp.double() / width).floor_().clamp_(max=self.bins) + 1  # 1..bins, bins + 1 at theta
                # q <= 0 (or NaN) to bin 0
                index = (torch.where(qp > 0, inside, torch.zeros_like(inside)).long() + start).flatten()
                length = self.channels * self.row
                self.count += torch.bincount(index, minlength=length).to(self.count)
                self.y_sum += torch.bincount(index, weights=yp.double().flatten(), minlength=length)

    def reduce(self) -> None:
        """Sum the histograms of every process (they share their bins)."""
        self.count = distributed.reduce_sum(self.count)
        self.y_sum = distributed.reduce_sum(self.y_sum)

    def sums(self, scale: Tensor, offset: Tensor, levels: int, lookup_elements: int = LOOKUP_ELEMENTS,
             top: Tensor | None = None) -> Tensor:
        """[C, J, 2]: (Σk·y, Σk²) of the J candidates (scale, offset: [C, J]) of every channel, by

            Σ_i k_i·y_i = Σ_j Σ_{q_i >= t_j} y_i            Σ_i k_i² = Σ_j (2j - 1)·#{q_i >= t_j}

        with the part of t_j's own bin above t_j counted in proportion to its width. `top` ([C, J], or None for
        `levels`): each candidate's largest count, k = min(#{j: q >= t_j}, top); its breakpoints above it drop."""
        channels, candidates = scale.shape
        count = self.count.view(channels, self.row)
        y_sum = self.y_sum.view(channels, self.row)
        # the positions in bin i and later: the total less prefix[:, i - 1]
        count_prefix, y_prefix = count.cumsum(1), y_sum.cumsum(1)
        count_total, y_total = count_prefix[:, -1:], y_prefix[:, -1:]
        j = torch.arange(1, levels + 1, dtype=torch.float64, device=scale.device)
        width = self.width.to(scale.device).view(channels, 1, 1)
        step = max(1, lookup_elements // max(1, channels * levels))
        out = []
        for first in range(0, candidates, step):
            sc, off = scale[:, first:first + step], offset[:, first:first + step]
            kept = None if top is None else (j <= top[:, first:first + step].unsqueeze(2)).double()
            at = (j - off.unsqueeze(2)) / sc.unsqueeze(2) / width  # breakpoints, in bins from 0
            inner = at.floor().clamp_(0, self.bins - 1)
            share = (inner + 1 - at).clamp_(0, 1)  # of the breakpoint's bin, above it
            inner = inner.long() + 1  # the bin's place in the row
            shape = (channels, sc.shape[1], levels)
            flat, share = inner.reshape(channels, -1), share.reshape(channels, -1)
            n = (count_total - count_prefix.gather(1, flat) + share * count.gather(1, flat)).view(shape)
            ky = (y_total - y_prefix.gather(1, flat) + share * y_sum.gather(1, flat)).view(shape)
            if kept is not None:
                n, ky = n * kept, ky * kept
            out.append(torch.stack([ky.sum(dim=2), (n * (2 * j - 1)).sum(dim=2)], dim=2))
        return torch.cat(out, dim=1)


@dataclass(frozen=True)
class Overflow:
    """A site's overflow neuron as the search sees it: `extra` (T) levels above the top one, as many as fit below
    `cap` on a ReLU6 site (judged at the candidate's threshold: its amplitude is not known before the search)."""

    extra: int
    cap: float | None = None

    def top(self, thresholds: Tensor, levels: int) -> Tensor | None:
        """[C, J]: each candidate's largest count (None: every one's is levels + extra)."""
        if self.cap is None:
            return None
        return PF.overflow_levels(thresholds, levels, self.extra, self.cap) + levels


def _candidate_sums(histogram: SiteHistogram, base: Tensor, fractions: Tensor, shifts: Tensor, levels: int,
                    lookup_elements: int, overflow: Overflow | None = None) -> Tensor:
    """[C, J, 2]: (sum k*y, sum k^2) per channel for the J per-channel candidates (threshold fraction, shift)."""
    thresholds = (base.unsqueeze(1) * fractions).clamp_min(1e-6)
    top = None if overflow is None else overflow.top(thresholds, levels)
    scale = levels / thresholds
    del thresholds  # the lookups take the budget's memory: nothing else stays
    breakpoints = levels if overflow is None else levels + overflow.extra
    return histogram.sums(scale, 0.5 + shifts, breakpoints, lookup_elements, top)


def _amplitude(sums: Tensor) -> Tensor:
    """Least-squares output per spike of each candidate, sum k*y / sum k^2 (0 for a silent candidate)."""
    ky, kk = sums[..., 0], sums[..., 1]
    return torch.where(kk > 0, ky / kk.clamp_min(1e-300), torch.zeros_like(kk))


#: Candidates whose scores differ by less than this fraction of the best are tied: the first of them is taken.
TIE = 1e-9


def _best(sums: Tensor) -> Tensor:
    """Index of the best candidate per channel (sums [C, J, 2]): at the least-squares amplitude the error is
    sum y^2 - ky^2/kk, so the best candidate has the largest ky * amplitude. Of candidates tied within TIE (e.g.
    several that all reproduce a channel's few positive positions exactly, which an overflow neuron's extra
    levels make common), the first: float sums gathered in another order (other batches, processes) then choose
    the same one."""
    score = sums[..., 0] * _amplitude(sums)
    best = score.amax(dim=1, keepdim=True)
    return (score >= best - TIE * best.abs()).to(torch.uint8).argmax(dim=1)


def search_histogram(histogram: SiteHistogram, theta: Tensor, levels: int, budget: int | None = None,
                     overflow: Overflow | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(theta, delta_in, delta_out) per channel that best reproduce the ANN's outputs from the quantized
    network's inputs, as `histogram` (over (0, theta), every process's positions) holds them. Two stages: the
    grid THRESHOLD_FRACTIONS x SHIFT_STEPS, then a finer grid around each channel's best (REFINE_FRACTIONS x
    REFINE_SHIFTS, which includes the first-stage choice). `budget` bounds the breakpoint lookups (they take
    as many candidates at a time as it holds; the result does not depend on it). With `overflow`, the candidates
    count its levels too (the histogram must then span (0, 2*theta): site_histogram)."""
    lookup = LOOKUP_ELEMENTS if budget is None else max(1, min(LOOKUP_ELEMENTS, budget // LOOKUP_BYTES))
    base = theta.detach().double().to(histogram.count.device)
    grid = [(f, s) for f in THRESHOLD_FRACTIONS for s in SHIFT_STEPS]
    ones = torch.ones(len(base), 1, dtype=torch.float64, device=base.device)
    fractions = ones * torch.tensor([f for f, _ in grid], dtype=torch.float64, device=base.device)
    shifts = ones * torch.tensor([s for _, s in grid], dtype=torch.float64, device=base.device)
    best = _best(_candidate_sums(histogram, base, fractions, shifts, levels, lookup, overflow))
    rows = torch.arange(len(base), device=base.device)
    fraction, shift = fractions[rows, best], shifts[rows, best]
    offsets = [(df, ds) for df in REFINE_FRACTIONS for ds in REFINE_SHIFTS]
    fractions = (fraction.unsqueeze(1) + torch.tensor([df for df, _ in offsets], dtype=torch.float64,
                                                      device=base.device)).clamp(MIN_FRACTION, 1.0)
    shifts = shift.unsqueeze(1) + torch.tensor([ds for _, ds in offsets], dtype=torch.float64, device=base.device)
    sums = _candidate_sums(histogram, base, fractions, shifts, levels, lookup, overflow)
    best = _best(sums)
    fraction, shift = fractions[rows, best], shifts[rows, best]
    new_theta = (base * fraction).clamp_min(1e-6)
    chosen = sums[rows, best]
    amplitude = torch.where(chosen[:, 1] > 0, _amplitude(chosen), new_theta / levels)
    delta_in = new_theta / levels * shift
    delta_out = amplitude * levels - new_theta
    return tuple(v.to(theta) for v in (new_theta, delta_in, delta_out))


def site_histogram(theta: Tensor, levels: int, overflow: Overflow | None) -> SiteHistogram:
    """An empty histogram for a site's search: over (0, theta), or (0, 2*theta) with an overflow neuron (whose
    breakpoints reach up to twice the largest candidate threshold), at the same bin width."""
    bins = histogram_bins(levels)
    return SiteHistogram(theta, bins) if overflow is None else SiteHistogram(2 * theta, 2 * bins)


def search_site(x_q: Tensor, x_ann: Tensor, theta: Tensor, levels: int, cap: float | None,
                overflow: Overflow | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """search_histogram over every position of the [B, C, ...] inputs x_q and x_ann (of this process)."""
    histogram = site_histogram(theta, levels, overflow)
    histogram.add(x_q, activation(x_ann, cap))
    return search_histogram(histogram, theta, levels, overflow=overflow)


class SitePoint(Point):
    """A site of `fit`: adds its (input, ANN output) pairs to a histogram, then searches its parameters (the
    lookups within a share of the memory budget)."""

    uses_keys = False  # every position is binned: no sample to draw

    def __init__(self, name: str, module: QCFS, budget: int):
        self.name = name
        self.module = module
        self.budget = int(SEARCH_BUDGET_SHARE * budget)
        self.histogram: SiteHistogram | None = None
        self.overflow = Overflow(module.levels, module.cap) if module.overflow else None

    def collect(self, x_q: Tensor, x_ann: Tensor, keys: list[bytes], call: Any = None) -> None:
        if self.histogram is None:
            self.histogram = site_histogram(self.module.theta, self.module.resolution, self.overflow)
        self.histogram.add(x_q, activation(x_ann, self.module.cap))

    def finish(self) -> None:
        module = self.module
        histogram = self.histogram or site_histogram(module.theta, module.resolution, self.overflow)
        self.histogram = None  # it goes once searched
        histogram.reduce()
        theta, delta_in, delta_out = search_histogram(histogram, module.theta, module.resolution, self.budget,
                                                      self.overflow)
        module.theta.copy_(theta)
        module.delta_in.copy_(delta_in)
        module.delta_out.copy_(delta_out)


def site_points(modules: Mapping[str, QCFS], budget: int) -> dict[QCFS, Point]:
    return {module: SitePoint(name, module, budget) for name, module in modules.items()}


@calibration_method("fit")
def fit_sites(model: nn.Module, modules: Mapping[str, QCFS], batches: ImageBatches, budget: int,
              progress: Progress) -> dict[str, Any]:
    """Per-channel threshold, rounding shift and amplitude fitted to the ANN, site by site."""
    num_images = distributed.reduce_count(batches.num_images)
    notes = run_paired(PairedPass(model, site_points(modules, budget)), batches, budget, progress, "fit")
    return {"fit_images": num_images, "fit_schedule": notes["schedule"]}
