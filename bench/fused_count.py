"""An experiment for bench/gpu.py: the count engine's neuron as one fused GPU kernel.

In eager mode (and replayed from a CUDA graph) the count engine spends five elementwise kernels per site —
multiply, add, floor, clamp, multiply by the amplitude — where the ANN spends one ReLU; on a GPU each is a
pass over the activation map. This Triton kernel does the five in one pass. `patched()` swaps it into
`ParallelIF.forward` (count engine only) for the duration of a `with` block, so bench/gpu.py can time the
same files with and without it. Not part of pconv: it is measured first (docs/benchmarks.md).

Rounding: the kernel may contract the multiply and add into one fused multiply-add, so a value within rounding
of a level boundary can land on the other side than in pconv's two-step form; bench/gpu.py reports the
agreement of the two.

    TRITON_INTERPRET=1 python bench/fused_count.py   # checks the kernel on the CPU (Triton's interpreter)
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

from pconv.nn import functional as PF
from pconv.nn.neurons import Engine, ParallelIF

BLOCK = 1024


@triton.jit
def _count_kernel(x_ptr, out_ptr, scale_ptr, offset_ptr, amplitude_ptr, n, inner, channels, levels,
                  BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    c = (offsets // inner) % channels
    x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    scale = tl.load(scale_ptr + c, mask=mask)
    offset = tl.load(offset_ptr + c, mask=mask)
    amplitude = tl.load(amplitude_ptr + c, mask=mask)
    k = tl.minimum(tl.maximum(tl.floor(x * scale + offset), 0.0), levels)
    tl.store(out_ptr + offsets, (k * amplitude).to(out_ptr.dtype.element_ty), mask=mask)


def fused_count(x: Tensor, scale: Tensor, offset: Tensor, amplitude: Tensor, levels: int) -> Tensor:
    """amplitude * clamp(floor(x * scale + offset), 0, levels), per channel (dim 1), in one pass."""
    if x.dim() > 2 and x.is_contiguous(memory_format=torch.channels_last):
        inner = 1  # channels vary fastest
        channels = x.shape[1]
    else:
        x = x.contiguous()
        channels = x.shape[1]
        inner = x[0, 0].numel()
    if x.dim() == 2:
        inner = 1
    out = torch.empty_like(x)
    n = x.numel()
    params = [p.float().contiguous() for p in (scale, offset, amplitude)]
    _count_kernel[(triton.cdiv(n, BLOCK),)](x, out, *params, n, inner, channels, float(levels), BLOCK=BLOCK)
    return out


def _forward(self: ParallelIF, x: Tensor, original=ParallelIF.forward) -> Tensor:
    if self.engine is not Engine.COUNTS or self.count_hook is not None or x.device.type != "cuda":
        return original(self, x)
    scale, offset, amplitude = self._count_factors()
    return fused_count(x, scale, offset, amplitude, self.time_steps * self.population)


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """ParallelIF's count engine through the fused kernel inside the block."""
    original = ParallelIF.forward
    ParallelIF.forward = _forward
    try:
        yield
    finally:
        ParallelIF.forward = original


def _check() -> None:
    """The kernel against pconv's count form on random per-channel factors, NCHW, channels-last and [N, C]."""
    g = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for shape, memory_format in (((3, 5, 7, 9), torch.contiguous_format), ((3, 5, 7, 9), torch.channels_last),
                                 ((4, 6), torch.contiguous_format)):
        x = (torch.randn(*shape, generator=g) * 3).to(device)
        if len(shape) == 4:
            x = x.contiguous(memory_format=memory_format)
        scale, offset, amplitude = (torch.rand(shape[1], generator=g).to(device) + 0.5 for _ in range(3))
        want = PF.counted(x, scale, offset, 8)
        want = want * PF.per_channel(amplitude, want)
        got = fused_count(x, scale, offset, amplitude, 8)
        print(shape, memory_format, "max |diff|", (got - want).abs().max().item())


if __name__ == "__main__":
    _check()
