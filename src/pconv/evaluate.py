"""Evaluate an SNN against its source ANN: accuracy, agreement, speed, firing rates and synaptic operations.

Vocabulary follows timm's validate/benchmark scripts (`top1`, `top5`, `samples_per_sec`, `step_time_ms`,
`param_count`, ...). Nothing here prints; `evaluate` returns an `EvalResult` with `to_dict()`.

Definitions (see docs/usage.md):

- firing rate of a site: mean number of spikes per neuron per time step, over every evaluated image
  (spike counts k come from the neurons' `count_hook`, so the count engine measures it at no extra cost);
- synaptic operations (SOPs) of a conv/linear layer, per image: the number of synaptic events its input
  triggers over the T steps, counted exactly. An event is a nonzero input value at one step; it reaches
  every output that the layer connects to that input position. The count is the layer applied with
  all-ones weights (and no bias) to the per-position number of nonzero steps, summed. It is measured in
  the spike engine on the first `sop_images` images. A layer fed directly by a population (an encoding
  site with m neurons per channel, whose m spikes of a step arrive summed) counts each spike as an event;
- a population of m neurons per channel counts as m neurons for firing rates;
- the layers that see the image itself (direct encoding: the image is presented unchanged at every step,
  so their output is the same at every step and is computed once) cost multiply-accumulates (MACs), not
  SOPs. They are the conv/linear layers that run before the first spiking neuron;
- ANN MACs per image: for a conv, output elements x (in_channels/groups) x kernel size; for a linear
  layer, output elements x in_features. Other layers (BatchNorm, pooling, additions) are not counted.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from . import distributed
from .errors import ConfigError, DataError
from .functional import per_channel
from .neurons import ENGINES
from .progress import NoProgress, Progress
from .snn import SpikingNetwork

#: Images on which synaptic operations are counted in the spike engine by default.
DEFAULT_SOP_IMAGES = 16
_SYNAPTIC = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class SiteStats:
    """Spiking activity of one neuron layer (an activation site of the ANN)."""

    name: str
    activation: str
    neurons: int  # neurons per image (channels x positions)
    firing_rate: float  # mean spikes per neuron per time step
    spikes_per_image: float  # over all T steps


@dataclass
class LayerStats:
    """Cost of one conv/linear layer, per image."""

    name: str
    kind: str  # "conv" | "linear"
    input: str  # "image" (direct encoding, costs MACs) | "spikes" (binary events) | "graded" (nonzero, not binary)
    macs: int  # multiply-accumulates of the ANN layer
    sops: float | None  # synaptic operations over T; None for "image" layers or when not measured
    input_rate: float | None  # nonzero inputs per input position per step (events / (positions x T))


@dataclass
class EvalResult:
    """Everything `pconv eval` reports. Accuracies are percentages, as in timm's validate."""

    num_images: int
    batch_size: int
    time_steps: int
    neuron: str
    engine: str
    device: str
    param_count: int
    top1: float
    top5: float
    topk: int
    ann_top1: float | None
    ann_top5: float | None
    top1_agreement: float | None  # % of images where SNN and ANN predict the same class
    samples_per_sec: float
    step_time_ms: float  # mean time per batch (forward pass only, data loading excluded)
    ann_samples_per_sec: float | None
    ann_step_time_ms: float | None
    sop_images: int  # images SOPs were counted on (0: not measured)
    # top-1 of the cumulative output after t = 1..T steps (spike and step engines; None in the count engine)
    step_top1: list[float] | None = None
    sites: list[SiteStats] = field(default_factory=list)
    layers: list[LayerStats] = field(default_factory=list)

    @property
    def mean_firing_rate(self) -> float:
        """Spikes per neuron per step over the whole network (total spikes / total neuron-steps)."""
        neurons = sum(s.neurons for s in self.sites)
        spikes = sum(s.spikes_per_image for s in self.sites)
        return spikes / (neurons * self.time_steps) if neurons else 0.0

    @property
    def ann_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def snn_macs(self) -> int:
        """MACs the SNN still spends: the layers that see the analog image (direct encoding)."""
        return sum(layer.macs for layer in self.layers if layer.input == "image")

    @property
    def sops(self) -> float | None:
        measured = [layer.sops for layer in self.layers if layer.input != "image"]
        if not self.sop_images or any(s is None for s in measured):
            return None
        return float(sum(measured))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["top1_err"] = _round(100.0 - self.top1)
        d["top5_err"] = _round(100.0 - self.top5)
        d["mean_firing_rate"] = _round(self.mean_firing_rate, 6)
        d["ann_macs_per_image"] = self.ann_macs
        d["snn_macs_per_image"] = self.snn_macs
        d["sops_per_image"] = None if self.sops is None else round(self.sops, 1)
        spike_macs = sum(layer.macs for layer in self.layers if layer.input != "image")
        d["sops_per_mac"] = None if self.sops is None or not spike_macs else _round(self.sops / spike_macs, 6)
        for key in ("top1", "top5", "ann_top1", "ann_top5", "top1_agreement"):
            d[key] = None if d[key] is None else _round(d[key])
        if d["step_top1"] is not None:
            d["step_top1"] = [_round(a) for a in d["step_top1"]]
        for key in ("samples_per_sec", "step_time_ms", "ann_samples_per_sec", "ann_step_time_ms"):
            d[key] = None if d[key] is None else _round(d[key], 3)
        for s in d["sites"]:
            s["firing_rate"] = _round(s["firing_rate"], 6)
            s["spikes_per_image"] = round(s["spikes_per_image"], 1)
        for layer in d["layers"]:
            layer["sops"] = None if layer["sops"] is None else round(layer["sops"], 1)
            layer["input_rate"] = None if layer["input_rate"] is None else _round(layer["input_rate"], 6)
        return d


def _round(x: float, digits: int = 4) -> float:
    return round(float(x), digits)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _kind(module: nn.Module) -> str:
    return "linear" if isinstance(module, nn.Linear) else "conv"


def _macs(module: nn.Module, out: Tensor, images: int) -> int:
    per_output = module.in_features if isinstance(module, nn.Linear) else \
        module.in_channels // module.groups * int(torch.tensor(module.kernel_size).prod())
    return int(out.numel() // images) * per_output


def _synaptic_modules(net: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in net.named_modules() if isinstance(m, _SYNAPTIC)}


def layer_costs(snn: SpikingNetwork, example: Tensor) -> list[LayerStats]:
    """Conv/linear layers in execution order with their ANN MACs per image and whether they see the image.

    `example` is one input batch; a single image is enough.
    """
    modules = _synaptic_modules(snn.net)
    by_id = {id(m): name for name, m in modules.items()}
    layers: dict[str, LayerStats] = {}
    state = {"spiked": False}
    # The spike engine calls every layer once on T samples per image, whatever engine is selected.
    previous = snn.engine
    images = example.shape[0] * snn.time_steps

    def on_layer(module, inputs, output):
        name = by_id[id(module)]
        if name in layers:  # a module used twice costs twice
            layers[name].macs += _macs(module, output, images)
            return
        layers[name] = LayerStats(name, _kind(module), "spikes" if state["spiked"] else "image",
                                  _macs(module, output, images), None, None)

    def on_neuron(module, inputs, output):
        state["spiked"] = True

    handles = [m.register_forward_hook(on_layer) for m in modules.values()]
    handles += [m.register_forward_hook(on_neuron) for m in snn.neurons().values()]
    snn.set_engine("spikes")
    try:
        with torch.inference_mode():
            snn(example)
    finally:
        for h in handles:
            h.remove()
        snn.set_engine(previous)
    return list(layers.values())


def _ones_like_layer(module: nn.Module) -> nn.Module:
    """The layer's connectivity: the same module with all-ones weights and no bias."""
    ones = copy.deepcopy(module)
    with torch.no_grad():
        ones.weight.fill_(1.0)
        if getattr(ones, "bias", None) is not None:
            ones.bias.zero_()
    return ones


_SPIKE_PRESERVING = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                     nn.ZeroPad2d, nn.Identity, nn.Dropout)


def count_sops(snn: SpikingNetwork, images: Tensor, layers: list[LayerStats], chunk: int,
               on_chunk: Callable[[], None] | None = None) -> None:
    """Fill in `sops`, `input_rate` and the input kind ("spikes" or "graded") of every layer that does not
    see the image, measured on `images` in the spike engine, `chunk` images (T samples each) at a time."""
    T = snn.time_steps
    previous = snn.engine
    modules = _synaptic_modules(snn.net)
    wanted = {layer.name: layer for layer in layers if layer.input != "image"}
    ones = {name: _ones_like_layer(modules[name]) for name in wanted}
    events = {name: 0.0 for name in wanted}  # synaptic events (nonzero inputs x fan-out)
    nonzero = {name: 0.0 for name in wanted}  # nonzero inputs over all steps
    positions = {name: 0 for name in wanted}  # input positions (x T gives the input slots)
    graded = {name: False for name in wanted}

    # A population (m neurons per channel) emits up to m spikes per channel and step, summed into one value
    # of (spikes * theta_out/m): a layer that takes that output directly counts every spike as an event.
    population_outputs: dict[int, tuple[Tensor, Tensor, int]] = {}  # id -> (output kept alive, amplitude, m)

    def on_population(neuron: nn.Module, inputs: tuple, output: Tensor) -> None:
        population_outputs[id(output)] = (output, neuron.theta_out / neuron.population, neuron.population)

    def passes_population(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        # max pooling, zero padding, dropout and identity keep every value a whole number of spikes
        known = population_outputs.get(id(inputs[0])) if inputs and isinstance(inputs[0], Tensor) else None
        if known is not None and isinstance(output, Tensor):
            population_outputs[id(output)] = (output, known[1], known[2])

    def pre_hook(module: nn.Module, inputs: tuple, name: str) -> None:
        x = inputs[0]
        steps = x.reshape(T, x.shape[0] // T, *x.shape[1:])
        population = population_outputs.get(id(x))
        if population is not None:
            _, amplitude, m = population
            unit = per_channel(torch.where(amplitude != 0, amplitude, torch.ones_like(amplitude)), steps[0])
            counts = (steps / unit).round().sum(dim=0)  # [B, ...]: spikes per input position
            slots = counts.numel() * m
        else:
            counts = (steps != 0).sum(dim=0).to(x.dtype)  # [B, ...]: nonzero steps per input position
            slots = counts.numel()
        events[name] += float(ones[name](counts).double().sum())
        nonzero[name] += float(counts.double().sum())
        positions[name] += slots
        if population is None and not graded[name]:
            # binary events carry one amplitude per channel: every nonzero value of a channel is the same
            channel_dim = -1 if isinstance(module, nn.Linear) else 1
            values = x.movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1)
            mask = values != 0
            hi = torch.where(mask, values, torch.full_like(values, -float("inf"))).amax(dim=1)
            lo = torch.where(mask, values, torch.full_like(values, float("inf"))).amin(dim=1)
            graded[name] = bool((mask.any(dim=1) & (hi != lo)).any())

    device = next(snn.parameters()).device
    for m in ones.values():
        m.to(device)
    handles = [modules[name].register_forward_pre_hook(lambda m, i, n=name: pre_hook(m, i, n)) for name in wanted]
    populations = [neuron for neuron in snn.neurons().values() if neuron.population > 1]
    handles += [neuron.register_forward_hook(on_population) for neuron in populations]
    if populations:
        handles += [m.register_forward_hook(passes_population) for m in snn.net.modules()
                    if isinstance(m, _SPIKE_PRESERVING)]
    snn.set_engine("spikes")
    try:
        with torch.inference_mode():
            for start in range(0, images.shape[0], chunk):
                snn(images[start:start + chunk].to(device))
                population_outputs.clear()
                if on_chunk:
                    on_chunk()
    finally:
        for h in handles:
            h.remove()
        snn.set_engine(previous)
    n = images.shape[0]
    for name, layer in wanted.items():
        layer.sops = events[name] / n
        layer.input_rate = nonzero[name] / (positions[name] * T) if positions[name] else 0.0
        layer.input = "graded" if graded[name] else "spikes"


def _split(item: Any) -> tuple[Tensor, Tensor]:
    if isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], Tensor) \
            and isinstance(item[1], Tensor):
        return item[0], item[1]
    raise DataError("evaluation needs labelled batches of (images, labels)",
                    "pass a DataLoader over a class-subfolder image folder")


def _correct(logits: Tensor, target: Tensor, k: int) -> tuple[int, int]:
    top = logits.topk(k, dim=1).indices
    hit = top == target.unsqueeze(1)
    return int(hit[:, 0].sum()), int(hit.any(dim=1).sum())


def evaluate(
    snn: SpikingNetwork,
    data: Iterable,
    *,
    ann: nn.Module | bool = True,
    device: str | torch.device | None = None,
    engine: str | None = None,
    sop_images: int = DEFAULT_SOP_IMAGES,
    warmup: bool = True,
    progress: Progress | None = None,
) -> EvalResult:
    """Run `snn` (and its source ANN, `snn.to_ann()`, unless `ann=False`) over labelled batches.

    `engine` defaults to the SNN's current one; a serial-neuron SNN always runs in the spike engine.
    SOPs are counted on the first `sop_images` images in the spike engine (0 skips them).
    Timings cover the forward passes only (after one untimed warm-up batch, synchronised on CUDA).
    """
    if sop_images < 0:
        raise ConfigError(f"sop_images must be 0 or more, got {sop_images}", "for example 16")
    device = torch.device(device) if device is not None else next(snn.parameters()).device
    engine = engine or snn.engine
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}", f"use one of: {', '.join(ENGINES)}")
    previous_engine = snn.engine
    snn.to(device).set_engine(engine)
    ann_model: nn.Module | None
    if ann is True:
        ann_model = snn.to_ann()
    elif ann is False or ann is None:
        ann_model = None
    else:
        ann_model = ann
    if ann_model is not None:
        ann_model.to(device).eval()
    progress = progress or NoProgress()
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    advance = progress.stage(f"evaluating T={snn.time_steps}", total)

    neurons = snn.neurons()
    spike_sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in neurons}
    neuron_positions = {name: 0 for name in neurons}

    def make_hook(name: str):
        def hook(k: Tensor) -> None:
            spike_sums[name] += k.sum(dtype=torch.float64)
            neuron_positions[name] += k.numel()
        return hook

    n = correct1 = correct5 = ann1 = ann5 = agree = batches = 0
    step_correct = torch.zeros(snn.time_steps, dtype=torch.float64, device=device)
    snn_time = ann_time = 0.0
    num_classes = None
    kept: list[Tensor] = []
    kept_n = 0
    batch_size = 0
    layers: list[LayerStats] = []
    try:
        with torch.inference_mode():
            for item in data:
                x, y = _split(item)
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if batches == 0:
                    batch_size = x.shape[0]
                    layers = layer_costs(snn, x[:1])
                    if warmup:
                        snn(x)
                        if ann_model is not None:
                            ann_model(x)
                    for name, neuron in neurons.items():
                        neuron.count_hook = make_hook(name)
                _sync(device)
                start = time.perf_counter()
                if engine == "counts":
                    out = snn(x)
                else:  # per-step outputs come at no extra cost
                    steps = snn.forward_steps(x)
                    out = steps.mean(dim=0)
                _sync(device)
                snn_time += time.perf_counter() - start
                if engine != "counts":
                    cumulative = steps.cumsum(dim=0).argmax(dim=2)  # argmax of the running sum = of the mean
                    step_correct += (cumulative == y.unsqueeze(0)).sum(dim=1).double()
                if num_classes is None:
                    num_classes = out.shape[1]
                    k = min(5, num_classes)
                if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
                    raise DataError(f"label {int(y.max()) if int(y.max()) >= num_classes else int(y.min())} is "
                                    f"outside the model's {num_classes} classes",
                                    "the folder's classes must match the model's; list them in order in class_map.txt")
                c1, c5 = _correct(out, y, k)
                correct1 += c1
                correct5 += c5
                if ann_model is not None:
                    _sync(device)
                    start = time.perf_counter()
                    ref = ann_model(x)
                    _sync(device)
                    ann_time += time.perf_counter() - start
                    a1, a5 = _correct(ref, y, k)
                    ann1 += a1
                    ann5 += a5
                    agree += int((ref.argmax(dim=1) == out.argmax(dim=1)).sum())
                if kept_n < sop_images:
                    take = x[: sop_images - kept_n].cpu()
                    kept.append(take)
                    kept_n += take.shape[0]
                n += x.shape[0]
                batches += 1
                advance()
    finally:
        for neuron in neurons.values():
            neuron.count_hook = None
    # Under torch.distributed every rank saw its own shard: add up the counts (timings stay per rank).
    counts = distributed.reduce_sum(torch.tensor([n, correct1, correct5, ann1, ann5, agree], dtype=torch.float64))
    n, correct1, correct5, ann1, ann5, agree = (int(v) for v in counts.tolist())
    step_correct = distributed.reduce_sum(step_correct)
    for name in neurons:
        spike_sums[name] = distributed.reduce_sum(spike_sums[name])
        neuron_positions[name] = distributed.reduce_count(neuron_positions[name])
    if n == 0:
        raise DataError("no images to evaluate", "pass a non-empty folder")

    if kept_n:
        images = torch.cat(kept)
        chunk = max(1, batch_size // snn.time_steps)
        advance_sops = progress.stage(f"counting synaptic operations T={snn.time_steps}",
                                      -(-images.shape[0] // chunk))
        count_sops(snn, images, layers, chunk, advance_sops)
    snn.set_engine(previous_engine)

    sites = []
    for site in snn.info.sites:
        positions = neuron_positions[site.name]
        spikes = float(spike_sums[site.name])
        sites.append(SiteStats(site.name, site.activation, positions // n, spikes / (positions * snn.time_steps)
                               if positions else 0.0, spikes / n))
    return EvalResult(
        num_images=n, batch_size=batch_size, time_steps=snn.time_steps, neuron=snn.info.neuron, engine=engine,
        device=str(device), param_count=sum(p.numel() for p in snn.net.parameters()),
        top1=100.0 * correct1 / n, top5=100.0 * correct5 / n, topk=k,
        step_top1=None if engine == "counts" else (100.0 * step_correct / n).tolist(),
        ann_top1=100.0 * ann1 / n if ann_model is not None else None,
        ann_top5=100.0 * ann5 / n if ann_model is not None else None,
        top1_agreement=100.0 * agree / n if ann_model is not None else None,
        samples_per_sec=n / snn_time if snn_time else 0.0, step_time_ms=1000.0 * snn_time / batches,
        ann_samples_per_sec=(n / ann_time if ann_time else 0.0) if ann_model is not None else None,
        ann_step_time_ms=1000.0 * ann_time / batches if ann_model is not None else None,
        sop_images=kept_n, sites=sites, layers=layers,
    )
