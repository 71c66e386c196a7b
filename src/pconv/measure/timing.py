"""Timing as timm's benchmark does it: untimed warm-up calls, then `perf_counter` around synchronised calls."""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Adds up the synchronised time of the calls it wraps: `with watch: ...`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> "Stopwatch":
        sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds += time.perf_counter() - self._start


def time_calls(fn: Callable[[Tensor], Tensor], x: Tensor, warmup: int, iters: int) -> float:
    """Seconds per call, after `warmup` untimed calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        watch = Stopwatch(x.device)
        with watch:
            for _ in range(iters):
                fn(x)
    return watch.seconds / iters


def cuda_graphed(fn: Callable[[Tensor], Tensor], example: Tensor) -> Callable[[Tensor], Tensor]:
    """Capture `fn` on a static input once; each call copies the input in and replays the graph."""
    static_in = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.inference_mode(), torch.cuda.stream(stream):
        for _ in range(3):
            fn(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        static_out = fn(static_in)

    def replay(x: Tensor) -> Tensor:
        static_in.copy_(x)
        graph.replay()
        return static_out

    return replay
