"""`fit`: calibrate every site against the ANN itself, layer by layer, in the paired pass (paired.py).

At every site the paired pass gives the quantized network's input x_q (every earlier site already
calibrated) and the ANN's x_ann, over all calibration images. Per channel, a grid search over the threshold
(fractions of the recorded one) and the rounding shift delta_in, refined around its best point, keeps the
pair whose output, at its least-squares amplitude, is closest to the ANN's:
    k         = clamp(floor(T*(x_q + delta_in)/theta + 1/2), 0, T)      the spike count
    theta_out = T * E[k*y] / E[k^2]                                      y = ReLU(x_ann) (or ReLU6)
    error     = E[(theta_out/T * k - y)^2]
over a sample of positions: SAMPLES_PER_CHANNEL in all, the same number from every image, chosen by the
image's content (sampling.py). Only three sums per channel and candidate are needed, so the choice is the
same over several processes. Channels are searched a slice at a time, as many as a share of the memory budget
holds, so the search's memory is bounded by the budget while its result does not depend on it.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..data.batches import ImageBatches
from ..nn.qcfs import QCFS, activation
from ..observe.record import channels_last_2d
from ..utils import distributed
from ..utils.progress import Progress
from .methods import calibration_method
from .paired import PairedPass, Point, run_paired
from .sampling import per_image, sample_index

#: Thresholds tried, as fractions of the recorded threshold (the --threshold method's value).
THRESHOLD_FRACTIONS = torch.linspace(0.2, 1.0, 33).tolist()
#: Rounding shifts tried, in quantization steps (theta/T).
SHIFT_STEPS = (-0.25, 0.0, 0.25)
#: Second stage, around each channel's first-stage choice: offsets of the fraction and of the shift (both
#: include 0, so the second stage never does worse on the searched positions).
REFINE_FRACTIONS = torch.linspace(-0.0125, 0.0125, 5).tolist()
REFINE_SHIFTS = (-0.125, 0.0, 0.125)
#: Smallest threshold fraction considered.
MIN_FRACTION = 0.05
#: Positions per channel the search looks at, over all images (each image gives its share). 32,768 rather
#: than 8,192 (until 2026-12-05): with 250 images the deep sites of EfficientNet-Lite (a few dozen positions per
#: image) are then searched on every position, not on a third of them, and their rare large values, which
#: unseen images reach more often, stay in the search; Lite2's KL on unseen images at T=16 fell by a tenth in
#: about the same calibration time (docs/accuracy.md). The sample takes 8 bytes per channel and position; the
#: search over it is done a slice of channels at a time (SEARCH_BYTES_PER_SAMPLE).
SAMPLES_PER_CHANNEL = 32768
#: Bytes the search holds per channel and sample while sorting (measured with TensorMeter: the order, the
#: sorted inputs and the prefix sums in float64, and their temporaries).
SEARCH_BYTES_PER_SAMPLE = 40
#: Bytes a breakpoint lookup holds per (candidate, level, channel) element (breakpoints, ranks, counts, sums;
#: measured 38).
LOOKUP_BYTES = 40
#: The most a lookup step takes, however large the budget: larger steps are no faster.
LOOKUP_ELEMENTS = 1 << 24
#: The share of the calibration's memory budget the search of one site may hold at a time (the paired pass and
#: the kept images take the rest; the sample itself, a fixed size per site, is beside the budget).
SEARCH_BUDGET_SHARE = 0.25


class _SortedSamples:
    """One site's samples, each channel sorted by the quantized network's input, with prefix sums of the ANN's
    outputs: Σk·y and Σk² of any candidate then cost one lookup per quantization level instead of a pass over
    the samples. With k = clamp(floor(scale·q + offset), 0, L) = #{j = 1..L : q >= (j - offset)/scale},

        Σ_i k_i·y_i = Σ_j Σ_{q_i >= t_j} y_i            Σ_i k_i² = Σ_j (2j - 1)·#{q_i >= t_j}

    (the breakpoints t_j in float64, against the exact inputs)."""

    def __init__(self, q: Tensor, y: Tensor, lookup_elements: int):
        self.lookup_elements = lookup_elements
        order = q.argsort(dim=1)
        self.q = q.gather(1, order).double().contiguous()
        ys = y.gather(1, order).double()
        self.prefix = torch.cat([torch.zeros_like(ys[:, :1]), ys.cumsum(dim=1)], dim=1)
        self.count = q.shape[1]

    def sums(self, scale: Tensor, offset: Tensor, levels: int) -> Tensor:
        """[C, J, 2]: (Σk·y, Σk²) of the J candidates (scale, offset: [C, J]) of every channel."""
        channels, candidates = scale.shape
        j = torch.arange(1, levels + 1, dtype=torch.float64, device=scale.device)
        step = max(1, self.lookup_elements // max(1, channels * levels))
        out = []
        for start in range(0, candidates, step):
            sc, off = scale[:, start:start + step], offset[:, start:start + step]
            breakpoints = ((j - off.unsqueeze(2)) / sc.unsqueeze(2)).reshape(channels, -1)
            below = torch.searchsorted(self.q, breakpoints)  # samples under each breakpoint
            shape = (channels, sc.shape[1], levels)
            above = (self.count - below).view(shape).double()
            y_above = (self.prefix[:, -1:] - self.prefix.gather(1, below)).view(shape)
            out.append(torch.stack([y_above.sum(dim=2), (above * (2 * j - 1)).sum(dim=2)], dim=2))
        return torch.cat(out, dim=1)


def _candidate_sums(samples: _SortedSamples, base: Tensor, fractions: Tensor, shifts: Tensor,
                    levels: int) -> Tensor:
    """[C, J, 2]: (sum k*y, sum k^2) per channel for the J per-channel candidates (threshold fraction, shift)."""
    scale = levels / (base.unsqueeze(1) * fractions).clamp_min(1e-6)
    return samples.sums(scale, 0.5 + shifts, levels)


def _amplitude(sums: Tensor) -> Tensor:
    """Least-squares output per spike of each candidate, sum k*y / sum k^2 (0 for a silent candidate)."""
    ky, kk = sums[..., 0], sums[..., 1]
    return torch.where(kk > 0, ky / kk.clamp_min(1e-300), torch.zeros_like(kk))


def _best(sums: Tensor) -> Tensor:
    """Index of the best candidate per channel (sums [C, J, 2]): at the least-squares amplitude the error is
    sum y^2 - ky^2/kk, so the best candidate has the largest ky * amplitude."""
    return (sums[..., 0] * _amplitude(sums)).argmax(dim=1)


def search_samples(q: Tensor, y: Tensor, theta: Tensor, levels: int, budget: int | None = None,
                   samples: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(theta, delta_in, delta_out) per channel that best reproduce the ANN's outputs `y` [C, S] from the
    quantized network's inputs `q` [C, S] (this process's samples; the sums are reduced over processes).

    Channels are searched independently, so the search takes as many at a time as `budget` bytes allow for
    `samples` per channel (default S; under torchrun every process passes the same bound, so that they reduce
    the same slices). No budget: all channels at once. The result does not depend on the slicing."""
    channels = len(theta)
    # the lookups run while a slice's sorted inputs and prefix sums (16 of its 40 bytes per sample) are held:
    # half the budget for them keeps the two within it
    lookup = LOOKUP_ELEMENTS if budget is None else max(1, min(LOOKUP_ELEMENTS, budget // 2 // LOOKUP_BYTES))
    per_slice = channels if budget is None else budget // (SEARCH_BYTES_PER_SAMPLE * max(samples or q.shape[1], 1))
    per_slice = max(1, min(channels, per_slice))
    parts = [_search_slice(q[i:i + per_slice], y[i:i + per_slice], theta[i:i + per_slice], levels, lookup)
             for i in range(0, max(channels, 1), per_slice)]
    return tuple(torch.cat(values) for values in zip(*parts))


def _search_slice(q: Tensor, y: Tensor, theta: Tensor, levels: int, lookup_elements: int
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """search_samples on some channels, all at once. Two stages: the grid THRESHOLD_FRACTIONS x SHIFT_STEPS,
    then a finer grid around each channel's best (REFINE_FRACTIONS x REFINE_SHIFTS, which includes the
    first-stage choice)."""
    base = theta.double().to(q.device)
    samples = _SortedSamples(q, y, lookup_elements)
    grid = [(f, s) for f in THRESHOLD_FRACTIONS for s in SHIFT_STEPS]
    ones = torch.ones(len(base), 1, dtype=torch.float64, device=q.device)
    fractions = ones * torch.tensor([f for f, _ in grid], dtype=torch.float64, device=q.device)
    shifts = ones * torch.tensor([s for _, s in grid], dtype=torch.float64, device=q.device)
    best = _best(distributed.reduce_sum(_candidate_sums(samples, base, fractions, shifts, levels)))
    rows = torch.arange(len(base), device=q.device)
    fraction, shift = fractions[rows, best], shifts[rows, best]
    offsets = [(df, ds) for df in REFINE_FRACTIONS for ds in REFINE_SHIFTS]
    fractions = (fraction.unsqueeze(1) + torch.tensor([df for df, _ in offsets], dtype=torch.float64,
                                                      device=q.device)).clamp(MIN_FRACTION, 1.0)
    shifts = shift.unsqueeze(1) + torch.tensor([ds for _, ds in offsets], dtype=torch.float64, device=q.device)
    sums = distributed.reduce_sum(_candidate_sums(samples, base, fractions, shifts, levels))
    best = _best(sums)
    fraction, shift = fractions[rows, best], shifts[rows, best]
    new_theta = (base * fraction).clamp_min(1e-6)
    chosen = sums[rows, best]
    amplitude = torch.where(chosen[:, 1] > 0, _amplitude(chosen), new_theta / levels)
    delta_in = new_theta / levels * shift
    delta_out = amplitude * levels - new_theta
    return tuple(v.to(theta) for v in (new_theta, delta_in, delta_out))


def search_site(x_q: Tensor, x_ann: Tensor, theta: Tensor, levels: int, cap: float | None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """search_samples over every position of the [B, C, ...] inputs x_q and x_ann."""
    return search_samples(channels_last_2d(x_q), activation(channels_last_2d(x_ann), cap), theta, levels)


class SitePoint(Point):
    """A site of `fit`: gathers its sampled (input, ANN output) pairs, then searches its parameters within a
    share of the memory budget."""

    def __init__(self, name: str, module: QCFS, num_images: int, budget: int):
        self.name = name
        self.module = module
        self.count = per_image(SAMPLES_PER_CHANNEL, num_images)
        self.samples = self.count * num_images  # an upper bound, the same in every process
        self.budget = int(SEARCH_BUDGET_SHARE * budget)
        self.q: list[Tensor] = []
        self.y: list[Tensor] = []

    def collect(self, x_q: Tensor, x_ann: Tensor, keys: list[bytes], call: Any = None) -> None:
        positions = x_q[0].numel() // x_q.shape[1] if x_q.numel() else 0
        index = sample_index(keys, self.name, positions, self.count, x_q.device)
        q, a = channels_last_2d(x_q), channels_last_2d(x_ann)
        if index is not None:
            q, a = q[:, index], a[:, index]
        self.q.append(q)
        self.y.append(activation(a, self.module.cap))

    def finish(self) -> None:
        module = self.module
        empty = torch.zeros(module.theta.numel(), 0, device=module.theta.device)
        q = torch.cat(self.q, dim=1) if self.q else empty
        self.q = []  # the chunks go as soon as they are joined
        y = torch.cat(self.y, dim=1) if self.y else empty
        self.y = []
        theta, delta_in, delta_out = search_samples(q, y, module.theta, module.resolution, self.budget, self.samples)
        module.theta.copy_(theta)
        module.delta_in.copy_(delta_in)
        module.delta_out.copy_(delta_out)


def site_points(modules: Mapping[str, QCFS], num_images: int, budget: int) -> dict[QCFS, Point]:
    return {module: SitePoint(name, module, num_images, budget) for name, module in modules.items()}


@calibration_method("fit")
def fit_sites(model: nn.Module, modules: Mapping[str, QCFS], batches: ImageBatches, budget: int,
              progress: Progress) -> dict[str, Any]:
    """Per-channel threshold, rounding shift and amplitude fitted to the ANN, site by site."""
    num_images = distributed.reduce_count(batches.num_images)
    notes = run_paired(PairedPass(model, site_points(modules, num_images, budget)), batches, budget, progress, "fit")
    return {"fit_images": num_images, "fit_schedule": notes["schedule"]}
