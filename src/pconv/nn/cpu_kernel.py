"""The count engine's neuron as one fused loop on the CPU.

Per site the count engine computes amplitude * clamp(floor(x * scale + offset), 0, L), per channel: five
elementwise passes in eager torch (multiply, add, floor, clamp, multiply) where the ANN runs one ReLU6. On
EfficientNet-Lite0 at batch 16, one CPU thread, the passes took about 9 % of the count engine's time against 2 %
for the ANN's activations, enough to keep it above 1.15x the ANN's time (docs/benchmarks.md).

torch.compile's C++ backend (inductor) turns the five into one loop that reads and writes each value once.
It is told to compile with -ffp-contract=off (its default): multiply and add are not contracted into a fused
multiply-add, so every operation rounds as torch's own kernels do and the counts are functional.counted's, bit
for bit (tests/nn/test_cpu_kernel.py). Not written by hand: a C++ extension would need a compiler when pconv is
installed; inductor needs one (g++ on Linux) only when it compiles, and where it cannot, torch's passes run.

One compilation with dynamic shapes serves every site whose input has the same rank, dtype and layout (any
batch, channel count, map size and level count); the first takes 5-15 s on a CPU, and inductor caches it on
disk for later processes. Only maps of at least MIN_ELEMENTS values use it: below that a compiled call's
checks cost more than the five passes. A failure to compile turns it off for the process; the environment
variable PCONV_CPU_KERNEL=0 turns it off from the start.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch
from torch import Tensor

from .functional import counted, per_channel

#: smallest activation map (values) the fused loop is used for: a compiled call costs about 80 us before it
#: computes anything (its guards), which the five passes' time exceeds from about 350,000 values on the 2-core
#: development VM (at 6.4 M values: 1.3 against 5.0 ms, the ANN's ReLU6 1.1 ms)
MIN_ELEMENTS = 1 << 19
_enabled = os.environ.get("PCONV_CPU_KERNEL", "1") != "0"


def _count(x: Tensor, scale: Tensor, offset: Tensor, amplitude: Tensor | None, levels: int, in_place: bool,
           limit: Tensor | None = None) -> Tensor:
    """The count engine's eager formula itself (functional.counted with its per-channel `limit`, times the
    amplitude): compiled as it is."""
    k = counted(x, scale, offset, levels, inplace=in_place)
    if limit is not None:  # not counted's own out= form: the compiled loop is the same, without a second buffer
        k = torch.minimum(k, per_channel(limit, k))
    return k if amplitude is None else k.mul_(per_channel(amplitude, k))


# One entry point per (in place, with the amplitude, with a limit), each its own `def`: torch.compile keeps its
# compilations per code object (a closure made by a factory would share one), at most
# torch._dynamo.config.recompile_limit (8) of them, and the variants each of these meets (layouts, ranks, grad
# modes) then stay well within that limit. A limit: the overflow neurons of a ReLU6 site (functional.overflow_top).
def _out_of_place(x: Tensor, scale: Tensor, offset: Tensor, amplitude: Tensor | None, levels: int) -> Tensor:
    return _count(x, scale, offset, amplitude, levels, False)


def _in_place(x: Tensor, scale: Tensor, offset: Tensor, amplitude: Tensor | None, levels: int) -> Tensor:
    return _count(x, scale, offset, amplitude, levels, True)


def _counts_out_of_place(x: Tensor, scale: Tensor, offset: Tensor, amplitude: None, levels: int) -> Tensor:
    return _count(x, scale, offset, None, levels, False)


def _counts_in_place(x: Tensor, scale: Tensor, offset: Tensor, amplitude: None, levels: int) -> Tensor:
    return _count(x, scale, offset, None, levels, True)


def _limited_out_of_place(x: Tensor, scale: Tensor, offset: Tensor, amplitude: Tensor | None, levels: int,
                          limit: Tensor) -> Tensor:
    return _count(x, scale, offset, amplitude, levels, False, limit)


def _limited_in_place(x: Tensor, scale: Tensor, offset: Tensor, amplitude: Tensor | None, levels: int,
                      limit: Tensor) -> Tensor:
    return _count(x, scale, offset, amplitude, levels, True, limit)


def _limited_counts_out_of_place(x: Tensor, scale: Tensor, offset: Tensor, amplitude: None, levels: int,
                                 limit: Tensor) -> Tensor:
    return _count(x, scale, offset, None, levels, False, limit)


def _limited_counts_in_place(x: Tensor, scale: Tensor, offset: Tensor, amplitude: None, levels: int,
                             limit: Tensor) -> Tensor:
    return _count(x, scale, offset, None, levels, True, limit)


_ENTRY_POINTS = {(False, True, False): _out_of_place, (True, True, False): _in_place,
                 (False, False, False): _counts_out_of_place, (True, False, False): _counts_in_place,
                 (False, True, True): _limited_out_of_place, (True, True, True): _limited_in_place,
                 (False, False, True): _limited_counts_out_of_place, (True, False, True): _limited_counts_in_place}


@functools.cache
def _compiled(in_place: bool, with_amplitude: bool, with_limit: bool = False):
    # compile_threads=1: one small kernel does not pay for a pool of compiler processes; no contracted
    # multiply-add whatever the environment says (TORCHINDUCTOR_CPP_ENABLE_FLOATING_POINT_CONTRACT_FLAG)
    options = {"compile_threads": 1, "cpp.enable_floating_point_contract_flag": "off"}
    return torch.compile(_ENTRY_POINTS[in_place, with_amplitude, with_limit], dynamic=True, options=options)


def enabled() -> bool:
    return _enabled


def cpu_count(x: Tensor, scale: Tensor, offset: Tensor, amplitude: Tensor | None, levels: int,
              in_place: bool = False, limit: Tensor | None = None) -> Tensor | None:
    """amplitude * clamp(floor(x * scale + offset), 0, levels) with per-channel [C] factors (channels on dim 1),
    and at most `limit` ([C], if given) before the amplitude, in one loop, in x's memory if `in_place` (amplitude
    None: the counts alone, for a count hook); None where it does not apply (not a float32 CPU map of MIN_ELEMENTS
    values or more, under torch.compile, autograd, or turned off): the caller runs torch's passes."""
    global _enabled
    if not _enabled or x.device.type != "cpu" or x.dtype != torch.float32 or x.numel() < MIN_ELEMENTS:
        return None
    factors = tuple(p for p in (scale, offset, amplitude, limit) if p is not None)
    if torch.compiler.is_compiling() or x.requires_grad or any(p.dtype != x.dtype for p in factors):
        return None  # (torch.compile fuses the passes itself)
    try:
        with _quiet_builder():
            compiled = _compiled(in_place, amplitude is not None, limit is not None)
            if limit is None:
                return compiled(x, scale, offset, amplitude, levels)
            return compiled(x, scale, offset, amplitude, levels, limit)
    except Exception:  # compiling failed (no compiler, or one inductor cannot use): torch's passes from now on
        _enabled = False
        return None


_builder_imported = False


@contextlib.contextmanager
def _quiet_builder():
    """While torch's C++ builder is first imported, its warning that a CUDA build finds no CUDA runtime (nothing
    a user can act on) stays off stderr. Only then: setting a logger's level costs more than a small site."""
    global _builder_imported
    if _builder_imported:
        yield
        return
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
        _builder_imported = True
    finally:
        log.setLevel(level)
