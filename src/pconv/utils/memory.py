"""Memory: the calibration budget, and counting what tensors take.

One budget bounds what calibration holds beyond the model and one batch of the data loader: the decoded
calibration images it keeps between passes (at most half the budget), the inputs of one site it caches
(`da`), the images it runs through the network at once in the passes that must see the whole set
(`fit`, `refit`, the sensitivity pass), and the breakpoint lookups of `fit`'s search at one site. `fit`'s
histogram of a site's inputs (and its cumulative sums while searching) is not counted against it: its size is
fixed per site (fit.py: at least MIN_BINS bins per channel, 16 bytes each). Past the budget pconv recomputes instead of holding, so what it holds
depends on the model, the batch size and the budget, never on the number of images.

Tensor bytes are counted at the dispatcher (`TensorMeter`): every tensor storage created while the meter is
on, until it is freed. That works on the CPU and on CUDA alike, and it is what the budget is checked against.
"""

from __future__ import annotations

import os
import re
import resource
import sys
import weakref
from typing import Any, Callable

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..errors import ConfigError

GiB = 1024**3
MiB = 1024**2
#: The default budget is this fraction of the machine's memory, within the bounds below.
DEFAULT_FRACTION = 0.2
DEFAULT_MIN_BYTES = 1 * GiB
DEFAULT_MAX_BYTES = 8 * GiB
#: Smallest budget accepted: below it nothing useful fits.
MIN_BUDGET_BYTES = 256 * 1024
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": MiB, "mb": MiB, "mib": MiB, "g": GiB, "gb": GiB,
          "gib": GiB, "t": 1024 * GiB, "tb": 1024 * GiB, "tib": 1024 * GiB}


def physical_memory() -> int:
    """Bytes of RAM of this machine (0 when unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def default_budget() -> int:
    """A fifth of the machine's memory, between 1 and 8 GiB (4.8 GiB on a 24 GiB machine)."""
    total = physical_memory()
    if not total:
        return 4 * GiB
    return int(min(DEFAULT_MAX_BYTES, max(DEFAULT_MIN_BYTES, DEFAULT_FRACTION * total)))


def parse_budget(text: str | int | float) -> int:
    """`4GiB`, `512M`, `2.5G`, or a number of bytes -> bytes (binary units: 1G = 1 GiB)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = int(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise ConfigError(f"memory budget {text!r} is not a size", "write it as e.g. 4GiB, 512MiB or 2.5G")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value < MIN_BUDGET_BYTES:
        raise ConfigError(f"memory budget {text!r} is below {MIN_BUDGET_BYTES // 1024} KiB",
                          "give at least 256KiB; the default is a fifth of the machine's memory")
    return value


def tune_malloc(calibrating: bool) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel at once.

    PyTorch has no caching allocator on the CPU, so each large tensor is a fresh mmap whose pages the kernel
    faults in and zeroes: on EfficientNet-Lite0 that kernel time exceeded the compute (one thread, batch 64,
    two forwards: 4.1 s system against 2.4 s user). Evaluating and benchmarking (`calibrating=False`) keep every
    freed block (no mmap, no trimming): 3.5 s instead of 6.5 s there. A calibration holds long-lived tensors
    (images, kept cuts) among short-lived ones, and keeping everything would also keep the holes between them
    (7.5 GiB resident instead of 5.8 GiB for Lite0 under the default budget), so it keeps blocks up to 32 MiB
    only (glibc's largest mmap threshold) and still returns larger ones. The process keeps its peak resident
    memory until it ends, which suits a command. Does nothing (False) where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4  # glibc's <malloc.h>
    mapped = mallopt(m_mmap_threshold, 32 * MiB) if calibrating else mallopt(m_mmap_max, 0)
    return bool(mapped) and bool(mallopt(m_trim_threshold, 1 << 30))


def tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class TensorMeter(TorchDispatchMode):
    """Counts the bytes of tensor storages created inside the mode and still alive; keeps the maximum.

    torch has no allocator statistics on the CPU, so the count is taken at the dispatcher: each new storage
    once (a view or an in-place result shares its input's), released when the tensor that created it is freed
    (a view that outlives it is not counted on). Every operator of a calibration passes through here, so the
    common cases are decided without torch's pytree: operators that return views or write into an argument are
    known from their schema once, and inputs are looked for one list deep (where operators take tensors)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[int, weakref.ref]] = {}
        self.current = 0
        self.peak = 0
        self._aliasing: dict[Any, bool] = {}  # operator -> its results share an argument's storage

    def _release(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliasing = self._aliasing.get(func)
        if aliasing is None:
            aliasing = self._aliasing[func] = bool(getattr(func, "is_view", False) or func._schema.is_mutable)
        if aliasing:
            return out
        outputs = (out,) if isinstance(out, Tensor) else tree_flatten(out)[0]
        inputs = None
        for t in outputs:
            if not isinstance(t, Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if not key or key in self.live:
                continue
            if inputs is None:
                inputs = _storages(args, kwargs)
            if key in inputs:  # an input returned as it is
                continue
            nbytes = storage.nbytes()
            self.live[key] = (nbytes, weakref.ref(t, lambda _, key=key: self._release(key)))
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


def _storages(args: tuple, kwargs: dict | None) -> set[int]:
    """The storages of the tensors among an operator's arguments (and in the lists among them)."""
    found = set()
    for value in (*args, *(kwargs or {}).values()):
        if isinstance(value, Tensor):
            if value.device.type != "meta":
                found.add(value.untyped_storage().data_ptr())
        elif isinstance(value, (list, tuple)):
            found.update(v.untyped_storage().data_ptr() for v in value
                         if isinstance(v, Tensor) and v.device.type != "meta")
    return found


def peak_tensor_bytes(fn: Callable[..., Any], *args: Any) -> int:
    """Peak bytes of the tensors `fn(*args)` creates (its result included while it is alive)."""
    meter = TensorMeter()
    with meter:
        out = fn(*args)
    del out
    return meter.peak


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark so far (what `top` and the kernel's OOM killer see)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024
