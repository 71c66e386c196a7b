"""Distribution-error calibration of a QCFS network, layer by layer, with exact means.

The reference is the same network with every activation clipped, clamp(x, 0, theta). For each site in
execution order (each one seeing its already-calibrated predecessors):
    delta_in  = mean over the calibration set of (x_ref - x_q), per channel  (shift inside the floor)
    delta_out = mean of (y_ref - y_q) once delta_in is in place             (added to the amplitude)
Means are linear, so the reference sums are taken once for all sites; each site then needs one
forward pass of the quantized network that stops right after the site, plus a pass over that site's
cached inputs (or a second truncated forward when they would not fit in the memory budget).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..data.batches import ImageBatches
from ..nn.qcfs import QCFS, QCFSMode
from ..observe.record import channels_last_2d
from ..utils import distributed
from ..utils.progress import Progress
from .methods import calibration_method

Tick = Callable[[], None] | None

#: The calibrated output amplitude is kept at least this fraction of theta, so it stays positive.
MIN_AMPLITUDE_FRACTION = 1e-3


class _StopForward(Exception):
    """Raised by a tap to end a forward pass once the site of interest has run."""


def channel_sum(t: Tensor) -> Tensor:
    return channels_last_2d(t).double().sum(dim=1)


def global_mean(total: Tensor, count: int) -> Tensor:
    """Per-channel mean over every rank's calibration images (just total/count in one process)."""
    return distributed.reduce_sum(total) / distributed.reduce_count(count)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _run(model: nn.Module, batches: Sequence[Tensor], progress: Tick, stop_early: bool) -> None:
    device = _device(model)
    with torch.inference_mode():
        for x in batches:
            try:
                model(x.to(device, non_blocking=True))
            except _StopForward:
                if not stop_early:
                    raise
            if progress:
                progress()


def reference_means(model: nn.Module, modules: Mapping[str, QCFS], batches: Sequence[Tensor],
                    progress: Tick = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-site channel means of (input, output) in the clipped full-precision reference network."""
    memo: dict[int, Any] = {}
    reference = copy.deepcopy(model, memo)  # memo: each QCFS module -> its copy in the reference
    sums: dict[str, list] = {}
    for name, original in modules.items():
        module = memo[id(original)]
        module.mode = QCFSMode.CLIP
        sums[name] = [0.0, 0.0, 0]

        def tap(x, y, acc=sums[name]):
            acc[0] = acc[0] + channel_sum(x)
            acc[1] = acc[1] + channel_sum(y)
            acc[2] += x.numel() // x.shape[1]

        module.tap = tap
    _run(reference, batches, progress, stop_early=False)
    return {name: (global_mean(sx, n), global_mean(sy, n)) for name, (sx, sy, n) in sums.items()}


def _site_inputs_mean(model: nn.Module, module: QCFS, batches: Sequence[Tensor], progress: Tick,
                      cache: list[Tensor] | None) -> Tensor:
    """Mean input of one site over the calibration set, from a forward pass that stops at the site."""
    acc = [0.0, 0]

    def tap(x, y):
        acc[0] = acc[0] + channel_sum(x)
        acc[1] += x.numel() // x.shape[1]
        if cache is not None:
            cache.append(x.clone())
        raise _StopForward

    module.tap = tap
    try:
        _run(model, batches, progress, stop_early=True)
    finally:
        module.tap = None
    return global_mean(acc[0], acc[1])


def _site_outputs_mean(model: nn.Module, module: QCFS, batches: Sequence[Tensor], progress: Tick,
                       cache: list[Tensor] | None) -> Tensor:
    if cache is not None:
        total, n = 0.0, 0
        with torch.inference_mode():
            for x in cache:
                y = module(x)
                total = total + channel_sum(y)
                n += x.numel() // x.shape[1]
                if progress:
                    progress()
        return global_mean(total, n)
    acc = [0.0, 0]

    def tap(x, y):
        acc[0] = acc[0] + channel_sum(y)
        acc[1] += y.numel() // y.shape[1]
        raise _StopForward

    module.tap = tap
    try:
        _run(model, batches, progress, stop_early=True)
    finally:
        module.tap = None
    return global_mean(acc[0], acc[1])


def _fits_in_cache(model: nn.Module, module: QCFS, batches: ImageBatches, budget: int) -> bool:
    """Whether the site's inputs over all images (measured on the first batch) fit in `budget` bytes."""
    seen = []

    def tap(x, y):
        seen.append(x.numel() * x.element_size() / x.shape[0])
        raise _StopForward

    module.tap = tap
    try:
        _run(model, [next(iter(batches))], None, stop_early=True)
    finally:
        module.tap = None
    return bool(seen) and seen[0] * batches.num_images <= budget


@calibration_method("da")
def distribution_aware(model: nn.Module, modules: Mapping[str, QCFS], batches: ImageBatches, budget: int,
                       progress: Progress) -> None:
    """The paper's DA calibration: per-channel input and output-amplitude shifts, exact means. A site's inputs
    are cached between its two passes while they fit in the budget (what the images take aside)."""
    tick = progress.stage("calibrating (da)", (1 + 2 * len(modules)) * len(batches))
    targets = reference_means(model, modules, batches, tick)
    cache_budget = max(0, budget - batches.held_bytes)
    for name, module in modules.items():
        module.delta_in.zero_()
        module.delta_out.zero_()
        cache: list[Tensor] | None = [] if _fits_in_cache(model, module, batches, cache_budget) else None
        ref_in, ref_out = targets[name]
        q_in = _site_inputs_mean(model, module, batches, tick, cache)
        module.delta_in.copy_((ref_in - q_in).to(module.delta_in))
        q_out = _site_outputs_mean(model, module, batches, tick, cache)
        delta_out = (ref_out - q_out).to(module.delta_out)
        floor = module.theta * (MIN_AMPLITUDE_FRACTION - 1.0)
        module.delta_out.copy_(torch.maximum(delta_out, floor))
