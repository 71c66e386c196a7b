"""The count engine's neuron as one GPU kernel, for forwards captured into a CUDA graph.

Per site the count engine computes amplitude * clamp(floor(x * scale + offset), 0, L), per channel: five
elementwise passes in torch (multiply, add, floor, clamp, multiply) where the ANN runs one ReLU. On a GPU each
pass reads and writes the whole activation map, so even with the launches out of the way (a CUDA graph) the
count engine took 1.4-1.7x the ANN's time; with the five passes as this one Triton kernel, 1.07-1.13x
(docs/benchmarks.md, H200). Written by hand because torch has no such fused op outside torch.compile.

It runs only while a CUDA graph is being captured. Launched from Python one by one, as in eager mode, a
Triton kernel costs more than torch's five launches at small sizes (ResNet-20 at batch 64: 4.7 against
2.8 ms), and a kernel is compiled on its first launch, which must not happen inside a capture. So the eager
forwards that precede a capture (CUDA graphs need warm-up calls) launch it once per kind of input to compile
it; a capture uses it when it is compiled and falls back to torch's passes otherwise. (Each eager CUDA forward
thus pays a few Python checks per site; their cost was not measured.)

Rounding: multiply and add are not contracted into a fused multiply-add (`enable_fp_fusion=False`), so each
rounds as torch's separate kernels do and the counts are functional.counted's, bit for bit.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

BLOCK = 1024
#: Inputs of a kind the kernel has compiled for (see _key).
_compiled: set[tuple] = set()


@functools.cache
def _kernel():
    """The Triton kernel, or None where Triton is not installed (it comes with torch's CUDA builds)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    # n, inner and channels vary from site to site: not specialised on, so one compilation serves every site
    @triton.jit(do_not_specialize=["n", "inner", "channels"])
    def count_kernel(x_ptr, out_ptr, scale_ptr, offset_ptr, amplitude_ptr, n, inner, channels, levels,
                     BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        c = (offsets // inner) % channels
        x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
        scale = tl.load(scale_ptr + c, mask=mask)
        offset = tl.load(offset_ptr + c, mask=mask)
        amplitude = tl.load(amplitude_ptr + c, mask=mask)
        k = tl.minimum(tl.maximum(tl.floor(x * scale + offset), 0.0), levels)
        tl.store(out_ptr + offsets, (k * amplitude).to(out_ptr.dtype.element_ty), mask=mask)

    return count_kernel


def _layout(x: Tensor) -> int | None:
    """Elements between one channel and the next in memory (1 for channels-last), None for other layouts."""
    if x.dim() < 2:
        return None
    if x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last):
        return 1
    if x.is_contiguous():
        return math.prod(x.shape[2:])
    return None


def _key(x: Tensor, params: tuple[Tensor, ...]) -> tuple | None:
    """What Triton compiles the kernel for (dtypes, device, which pointers are 16-byte aligned), or None where
    the kernel does not apply (other dtypes or layouts, no elements or 2**31 and more)."""
    if not 0 < x.numel() < 2**31 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or _layout(x) is None:
        return None
    if any(p.dtype != torch.float32 or not p.is_contiguous() or p.device != x.device for p in params):
        return None
    return (x.dtype, torch.result_type(x, params[0]), x.device.index,
            tuple(t.data_ptr() % 16 == 0 for t in (x, *params)))


def fused_count(x: Tensor, scale: Tensor, offset: Tensor, amplitude: Tensor, levels: int) -> Tensor:
    """amplitude * clamp(floor(x * scale + offset), 0, levels), per channel (dim 1), in one pass; the result
    has the dtype torch's passes would give (float32 for a half-precision x and float32 factors)."""
    out = torch.empty_like(x, dtype=torch.result_type(x, scale))
    n = x.numel()
    _kernel()[(-(-n // BLOCK),)](x, out, scale, offset, amplitude, n, _layout(x), x.shape[1], float(levels),
                                 BLOCK=BLOCK, enable_fp_fusion=False)
    return out


def capturing_count(x: Tensor, scale: Tensor, offset: Tensor, amplitude: Tensor, levels: int) -> Tensor | None:
    """The kernel's result while a CUDA graph is being captured and it is compiled for `x`, else None (the
    caller runs torch's passes). Outside a capture, on CUDA, it compiles the kernel for `x`'s kind once."""
    if not x.is_cuda or torch.compiler.is_compiling() or _kernel() is None:
        return None  # (torch.compile fuses the passes itself)
    key = _key(x, (scale, offset, amplitude))
    if key is None:
        return None
    if torch.cuda.is_current_stream_capturing():
        return fused_count(x, scale, offset, amplitude, levels) if key in _compiled else None
    if key not in _compiled:
        fused_count(x[:1], scale, offset, amplitude, levels)  # compiles it; the result is not used
        _compiled.add(key)
    return None
