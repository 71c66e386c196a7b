"""`fit`: calibrate every site against the ANN itself, layer by layer, in one paired forward pass.

The calibration images go through the network once, doubled into one batch: the first half runs the
quantized network as calibrated so far, the second half the ANN (each site computes its ReLU/ReLU6
exactly). Layers are shared and act on each image separately, so at every site both halves hold the
same images: the quantized network's input there, with every earlier site already calibrated, and the
ANN's. The site is calibrated on that pair before the forward goes on, which makes the calibration
sequential over layers (each site corrects what its predecessors left) at the cost of one pass.

Per channel, a grid search over the threshold (fractions of the recorded one) and the rounding shift
delta_in, refined around its best point, keeps the pair whose output, at its least-squares amplitude, is
closest to the ANN's:
    k         = clamp(floor(T*(x_q + delta_in)/theta + 1/2), 0, T)      the spike count
    theta_out = T * E[k*y] / E[k^2]                                      y = ReLU(x_ann) (or ReLU6)
    error     = E[(theta_out/T * k - y)^2]
Only three sums per channel and candidate are needed, so the choice is exact over several processes.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import distributed
from .quantize import QCFS
from .record import channels_last_2d

Progress = Callable[[], None] | None

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
#: Positions per channel the search looks at, drawn at random (seeded) from the calibration set.
SAMPLES_PER_CHANNEL = 8192
#: The doubled calibration batch is capped so that its largest site input takes at most this many bytes;
#: the images past the cap are used for thresholds only.
PAIRED_BYTES = 3 * 1024**3


def activation(x: Tensor, cap: float | None) -> Tensor:
    """The ANN's activation at a site: ReLU, or ReLU6 when cap = 6."""
    return x.clamp_min(0) if cap is None else x.clamp(0, cap)


def _sample(x: Tensor, index: Tensor | None) -> Tensor:
    rows = channels_last_2d(x)
    return rows if index is None else rows[:, index]


def _candidate_sums(q: Tensor, y: Tensor, base: Tensor, fractions: Tensor, shifts: Tensor,
                    levels: int) -> Tensor:
    """[C, 2]: (sum k*y, sum k^2) per channel for the per-channel candidate (threshold fraction, shift)."""
    scale = (levels / (base * fractions).clamp_min(1e-6)).float().unsqueeze(1)
    offset = (0.5 + shifts).float().unsqueeze(1)
    k = torch.addcmul(offset, q, scale).floor_().clamp_(0, levels)
    return torch.stack([(k * y).sum(dim=1, dtype=torch.float64), (k * k).sum(dim=1, dtype=torch.float64)], dim=1)


def _amplitude(sums: Tensor) -> Tensor:
    """Least-squares output per spike of each candidate, sum k*y / sum k^2 (0 for a silent candidate)."""
    ky, kk = sums[..., 0], sums[..., 1]
    return torch.where(kk > 0, ky / kk.clamp_min(1e-300), torch.zeros_like(kk))


def _best(sums: Tensor) -> Tensor:
    """Index of the best candidate per channel (sums [C, J, 2]): at the least-squares amplitude the error is
    sum y^2 - ky^2/kk, so the best candidate has the largest ky * amplitude."""
    return (sums[..., 0] * _amplitude(sums)).argmax(dim=1)


def search_site(x_q: Tensor, x_ann: Tensor, theta: Tensor, levels: int, cap: float | None,
                samples: int = SAMPLES_PER_CHANNEL) -> tuple[Tensor, Tensor, Tensor]:
    """(theta, delta_in, delta_out) per channel that best reproduce activation(x_ann) from x_q.

    Two stages: the grid THRESHOLD_FRACTIONS x SHIFT_STEPS, then a finer grid around each channel's best
    (REFINE_FRACTIONS x REFINE_SHIFTS, which includes the first-stage choice)."""
    positions = x_q.numel() // x_q.shape[1] if x_q.numel() else 0
    index = None
    if positions > samples:
        generator = torch.Generator(device="cpu").manual_seed(positions)
        index = torch.randint(0, positions, (samples,), generator=generator).to(x_q.device)
    q = _sample(x_q, index).float()
    y = activation(_sample(x_ann, index), cap).float()
    base = theta.double()
    ones = torch.ones_like(base)
    grid = [(f, s) for f in THRESHOLD_FRACTIONS for s in SHIFT_STEPS]
    sums = torch.stack([_candidate_sums(q, y, base, ones * f, ones * s, levels) for f, s in grid], dim=1)
    best = _best(distributed.reduce_sum(sums))
    fraction = torch.tensor([f for f, _ in grid], dtype=torch.float64, device=q.device)[best]
    shift = torch.tensor([s for _, s in grid], dtype=torch.float64, device=q.device)[best]
    fine = [((fraction + df).clamp(MIN_FRACTION, 1.0), shift + ds) for df in REFINE_FRACTIONS for ds in REFINE_SHIFTS]
    sums = torch.stack([_candidate_sums(q, y, base, f, s, levels) for f, s in fine], dim=1)
    sums = distributed.reduce_sum(sums)
    best = _best(sums)
    rows = torch.arange(len(base), device=q.device)
    fraction = torch.stack([f for f, _ in fine], dim=1)[rows, best]
    shift = torch.stack([s for _, s in fine], dim=1)[rows, best]
    new_theta = (base * fraction).clamp_min(1e-6)
    chosen = sums[rows, best]
    amplitude = torch.where(chosen[:, 1] > 0, _amplitude(chosen), new_theta / levels)
    delta_in = new_theta / levels * shift
    delta_out = amplitude * levels - new_theta
    return new_theta.to(theta), delta_in.to(theta), delta_out.to(theta)


def _site_hook(half: int, progress: Progress) -> Callable:
    def hook(module: QCFS, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = inputs[0]
        x_q, x_ann = x[:half], x[half:]
        theta, delta_in, delta_out = search_site(x_q, x_ann, module.theta, module.resolution, module.cap)
        module.theta.copy_(theta)
        module.delta_in.copy_(delta_in)
        module.delta_out.copy_(delta_out)
        y_q = module.quantized(x_q)
        if progress:
            progress()
        return torch.cat([y_q, activation(x_ann, module.cap)])

    return hook


def _largest_site_bytes(model: nn.Module, modules: Mapping[str, QCFS], example: Tensor) -> float:
    """Bytes per image of the largest site input (one probe forward on one image)."""
    sizes = [0.0]

    def tap(x: Tensor, y: Tensor) -> None:
        sizes.append(x.numel() * x.element_size() / max(x.shape[0], 1))

    for module in modules.values():
        module.tap = tap
    try:
        with torch.inference_mode():
            model(example[:1])
    finally:
        for module in modules.values():
            module.tap = None
    return max(sizes)


def paired_images(model: nn.Module, modules: Mapping[str, QCFS], batches: Sequence[Tensor]) -> Tensor:
    """The calibration images for the paired pass, as one tensor, capped by PAIRED_BYTES."""
    device = next(model.parameters()).device
    first = next(iter(batches)).to(device)
    per_image = 2 * _largest_site_bytes(model, modules, first)
    limit = max(1, int(PAIRED_BYTES // max(per_image, 1.0)))
    held, count = [], 0
    for x in batches:
        x = x[: limit - count].to(device)
        held.append(x)
        count += x.shape[0]
        if count >= limit:
            break
    return torch.cat(held)


def paired_pass(model: nn.Module, modules: Mapping[str, QCFS], images: Tensor, progress: Progress = None,
                mode: Any = None) -> None:
    """One forward of [images; images] with every site calibrated on the pair as it is reached.

    `mode`, if given, is a TorchFunctionMode active during the pass (the layer refit uses one)."""
    hooks = [module.register_forward_hook(_site_hook(images.shape[0], progress)) for module in modules.values()]
    try:
        with torch.no_grad():
            if mode is None:
                model(torch.cat([images, images]))
            else:
                with mode:
                    model(torch.cat([images, images]))
    finally:
        for hook in hooks:
            hook.remove()


def fit_sites(model: nn.Module, modules: Mapping[str, QCFS], batches: Sequence[Tensor],
              progress: Progress = None) -> dict[str, Any]:
    """The `fit` calibration: every site searched against the ANN, layer by layer, in one paired pass."""
    images = paired_images(model, modules, batches)
    paired_pass(model, modules, images, progress)
    return {"fit_images": distributed.reduce_count(images.shape[0])}
