"""Speed of one SNN run four ways: the source ANN, the serial IF baseline (T sequential passes), the
spike-domain engine (T*B samples per layer) and the count-domain engine (cost independent of T).

Timing follows timm's benchmark: warm-up calls, then synchronised `perf_counter` around a fixed number
of calls; the engines take turns over a few rounds and each reports its median round. Peak memory is the high-water mark of tensor bytes alive during one forward pass, counted at
the dispatcher (so it works on CPU and GPU alike); on CUDA the allocator's own peak is reported too.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..nn.network import SpikingNetwork
from ..nn.neurons import Engine
from ..utils.memory import peak_tensor_bytes
from .timing import cuda_graphed, time_calls

BENCH_ENGINES = ("ann", "serial", "spikes", "counts")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class EngineResult:
    engine: str
    batch_size: int
    samples_per_sec: float
    step_time: float  # ms per batch of batch_size (timm's `step_time`)
    latency_ms: float  # one image at batch 1
    peak_memory_mb: float  # tensor high-water mark of one batch_size forward
    cuda_peak_memory_mb: float | None = None
    samples_per_sec_vs_ann: float | None = None  # > 1: faster than the ANN
    latency_vs_ann: float | None = None  # > 1: slower than the ANN
    top1_agreement_vs_fp32: float | None = None  # reduced precision only


@dataclass
class BenchResult:
    model: str
    time_steps: int
    device: str
    precision: str
    channels_last: bool
    compiled: bool
    cuda_graph: bool
    input_size: list[int]
    img_size: int
    param_count: int  # to_dict: in millions, 2 decimals, as timm writes it
    rounds: int = 1
    inputs: str = "random"  # or where the real images came from (reduced-precision agreement is measured on them)
    torch_version: str = torch.__version__
    engines: list[EngineResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        """timm's field names and units: times in ms and rates rounded as its benchmark.py rounds them."""
        d = asdict(self)
        d["param_count"] = round(self.param_count / 1e6, 2)
        for engine in d["engines"]:
            for key, digits in (("samples_per_sec", 2), ("step_time", 3), ("latency_ms", 3), ("peak_memory_mb", 1),
                                ("cuda_peak_memory_mb", 1), ("samples_per_sec_vs_ann", 3), ("latency_vs_ann", 3),
                                ("top1_agreement_vs_fp32", 2)):
                if engine[key] is not None:
                    engine[key] = round(engine[key], digits)
        return d


def _runners(snn: SpikingNetwork, engines: tuple[str, ...]) -> dict[str, nn.Module]:
    runners: dict[str, nn.Module] = {}
    for engine in engines:
        if engine == "ann":
            runners[engine] = snn.to_ann()
        elif engine == "serial":
            runners[engine] = snn.with_neuron("serial").set_engine(Engine.STEPS)
        else:
            runners[engine] = snn.with_neuron("parallel").set_engine(engine)
    return runners


@dataclass(frozen=True)
class BenchConfig:
    """How `benchmark` runs: batch size, device, engines, precision and compilation, and how long it times."""

    batch_size: int = 64
    device: str = "cpu"
    engines: tuple[str, ...] = BENCH_ENGINES
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    cuda_graph: bool = False
    warmup: int = 3
    iters: int = 10
    latency_iters: int = 20
    rounds: int = 3
    spike_batch_limit: int | None = None

    def __post_init__(self):
        if self.rounds < 1:
            raise ConfigError(f"rounds must be at least 1, got {self.rounds}", "for example --rounds 3")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}", "for example --batch-size 64")
        unknown = [e for e in self.engines if e not in BENCH_ENGINES]
        if unknown:
            raise ConfigError(f"unknown engine {unknown[0]!r}", f"use some of: {', '.join(BENCH_ENGINES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}", f"use one of: {', '.join(PRECISIONS)}")
        if self.cuda_graph and torch.device(self.device).type != "cuda":
            raise ConfigError("CUDA graphs need a CUDA device", "pass --device cuda, or drop --cuda-graph")


def _inputs(config: BenchConfig, input_size: tuple[int, ...], images: Tensor | None) -> tuple[Tensor, Tensor]:
    """The batch and the single image every engine is timed on (random unless images are given)."""
    device = torch.device(config.device)
    generator = torch.Generator().manual_seed(0)
    x = images if images is not None else torch.randn(config.batch_size, *input_size, generator=generator)
    x = x[:config.batch_size].to(device)
    if x.shape[0] < config.batch_size:
        x = x.repeat((config.batch_size + x.shape[0] - 1) // x.shape[0], *([1] * (x.dim() - 1)))[:config.batch_size]
    memory_format = torch.channels_last if config.channels_last and x.dim() == 4 else torch.contiguous_format
    x = x.contiguous(memory_format=memory_format)
    return x, x[:1].contiguous(memory_format=memory_format)


def benchmark(snn: SpikingNetwork, input_size: tuple[int, ...], config: BenchConfig | None = None,
              images: Tensor | None = None, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Time every engine at `config.batch_size` and at batch 1 on the same input (median of the rounds)."""
    config = config or BenchConfig()
    device = torch.device(config.device)
    dtype = PRECISIONS[config.precision]
    x, one = _inputs(config, input_size, images)
    result = BenchResult(
        model=(snn.info.source.name if snn.info.source else type(snn.net).__name__), time_steps=snn.time_steps,
        device=str(device), precision=config.precision, channels_last=config.channels_last,
        compiled=config.compile, cuda_graph=config.cuda_graph, input_size=list(input_size),
        img_size=int(input_size[-1]), param_count=sum(p.numel() for p in snn.net.parameters()), rounds=config.rounds,
        inputs="random" if images is None else f"{min(images.shape[0], config.batch_size)} given images",
    )
    prepared = _prepare(snn, config, x, one)
    steps, latencies = _time_rounds(prepared, config, x, one, progress)
    for engine, module, plain, _, _ in prepared:
        result.engines.append(_engine_result(engine, module, plain, x, config, dtype,
                                             statistics.median(steps[engine]), statistics.median(latencies[engine])))
    ann = next((e for e in result.engines if e.engine == "ann"), None)
    if ann is not None:
        for e in result.engines:
            e.samples_per_sec_vs_ann = e.samples_per_sec / ann.samples_per_sec
            e.latency_vs_ann = e.latency_ms / ann.latency_ms
    return result


def _prepare(snn: SpikingNetwork, config: BenchConfig, x: Tensor, one: Tensor) -> list[tuple]:
    """(engine, module, plain call, batch call, batch-1 call) for every engine, on the device and format."""
    device = torch.device(config.device)
    dtype = PRECISIONS[config.precision]
    memory_format = torch.channels_last if config.channels_last and x.dim() == 4 else torch.contiguous_format
    prepared = []
    for engine, module in _runners(snn, config.engines).items():
        module = module.to(device).to(memory_format=memory_format).eval()
        if isinstance(module, SpikingNetwork):
            module.spike_batch_limit = config.spike_batch_limit

        def plain(inp: Tensor, module=module) -> Tensor:
            if dtype is None:
                return module(inp)
            with torch.autocast(device.type, dtype=dtype):
                return module(inp)

        fn = torch.compile(plain) if config.compile else plain
        batch_fn = cuda_graphed(fn, x) if config.cuda_graph else fn
        one_fn = cuda_graphed(fn, one) if config.cuda_graph else fn
        prepared.append((engine, module, plain, batch_fn, one_fn))
    return prepared


def _time_rounds(prepared: list[tuple], config: BenchConfig, x: Tensor, one: Tensor,
                 progress: Callable[[str], None] | None) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Engines take turns for `rounds` rounds: a burst of load on a shared machine then spoils one round of
    every engine instead of all rounds of one engine. Every other round runs them in reverse order, so that no
    engine always runs first (after a pause) or right after another's batch-1 calls."""
    steps: dict[str, list[float]] = {engine: [] for engine, *_ in prepared}
    latencies: dict[str, list[float]] = {engine: [] for engine, *_ in prepared}
    for round_index in range(config.rounds):
        warmup = config.warmup if round_index == 0 else 1
        for engine, module, plain, batch_fn, one_fn in (prepared if round_index % 2 == 0 else prepared[::-1]):
            if progress and round_index == 0:
                progress(engine)
            steps[engine].append(time_calls(batch_fn, x, warmup, config.iters))
            latencies[engine].append(time_calls(one_fn, one, warmup, config.latency_iters))
    return steps, latencies


def _engine_result(engine: str, module: nn.Module, plain: Callable, x: Tensor, config: BenchConfig,
                   dtype: torch.dtype | None, step: float, latency: float) -> EngineResult:
    device = x.device
    cuda_peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            plain(x)
        cuda_peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    agreement = None
    if dtype is not None:
        with torch.inference_mode():
            reduced = plain(x).float()
            full = module(x).float()
        agreement = 100.0 * (reduced.argmax(1) == full.argmax(1)).float().mean().item()
    with torch.inference_mode():
        peak = peak_tensor_bytes(plain, x)
    return EngineResult(engine=engine, batch_size=config.batch_size, samples_per_sec=config.batch_size / step,
                        step_time=1000 * step, latency_ms=1000 * latency, peak_memory_mb=peak / 2**20,
                        cuda_peak_memory_mb=cuda_peak, top1_agreement_vs_fp32=agreement)
