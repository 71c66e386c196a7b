"""What an SNN costs per image: the ANN's multiply-accumulates layer by layer, which layers see the analog image,
and the synaptic operations every other layer's input triggers (see docs/usage.md for the definitions)."""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from ..nn.functional import per_channel
from ..nn.network import SpikingNetwork
from ..nn.neurons import Engine
from .results import LayerStats

_SYNAPTIC = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


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
                                  _macs(module, output, images))

    def on_neuron(module, inputs, output):
        state["spiked"] = True

    handles = [m.register_forward_hook(on_layer) for m in modules.values()]
    handles += [m.register_forward_hook(on_neuron) for m in snn.neurons().values()]
    snn.set_engine(Engine.SPIKES)
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


def count_operations(snn: SpikingNetwork, images: Tensor, layers: list[LayerStats], chunk: int,
                     on_chunk: Callable[[], None] | None = None) -> None:
    """Fill in the input kind ("spikes", "population" or "graded"), `events`, `summed_events` and `input_rate`
    of every layer that does not see the image, measured on `images` in the spike engine, `chunk` images (T
    samples each) at a time."""
    wanted = {layer.name: layer for layer in layers if layer.input != "image"}
    tally = _OperationTally(snn, wanted)
    previous = snn.engine
    device = next(snn.parameters()).device
    snn.set_engine(Engine.SPIKES)
    try:
        with tally.hooks(), torch.inference_mode():
            for start in range(0, images.shape[0], chunk):
                snn(images[start:start + chunk].to(device))
                tally.population_outputs.clear()
                if on_chunk:
                    on_chunk()
    finally:
        snn.set_engine(previous)
    tally.fill(images.shape[0])


class _OperationTally:
    """Per layer, over the batches: synaptic events, events on the time-summed input, nonzero inputs, and
    whether the nonzero inputs all carry one amplitude per channel (binary) or not (graded)."""

    def __init__(self, snn: SpikingNetwork, wanted: dict[str, LayerStats]):
        self.snn, self.wanted, self.T = snn, wanted, snn.time_steps
        modules = _synaptic_modules(snn.net)
        self.modules = {name: modules[name] for name in wanted}
        device = next(snn.parameters()).device
        self.ones = {name: _ones_like_layer(m).to(device) for name, m in self.modules.items()}
        self.events = {name: 0.0 for name in wanted}
        self.summed = {name: 0.0 for name in wanted}
        self.nonzero = {name: 0.0 for name in wanted}
        self.positions = {name: 0 for name in wanted}
        self.graded = {name: False for name in wanted}
        self.fed_by_population = {name: False for name in wanted}
        # A population (m neurons per channel) emits up to m spikes per channel and step, summed into one value
        # of (spikes * theta_out/m): a layer that takes that output directly counts every spike as an event.
        self.population_outputs: dict[int, tuple[Tensor, Tensor, int]] = {}  # id -> (output, amplitude, m)

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        handles = [m.register_forward_pre_hook(lambda m, i, n=name: self._on_layer(m, i[0], n))
                   for name, m in self.modules.items()]
        # a population, or a neuron with an overflow neuron (whose spikes carry the population's amplitude)
        populations = [n for n in self.snn.neurons().values() if n.neurons_per_channel > 1]
        handles += [n.register_forward_hook(self._on_population) for n in populations]
        if populations:
            handles += [m.register_forward_hook(self._passes_population) for m in self.snn.net.modules()
                        if isinstance(m, _SPIKE_PRESERVING)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _on_population(self, neuron: nn.Module, inputs: tuple, output: Tensor) -> None:
        self.population_outputs[id(output)] = (output, neuron.theta_out / neuron.population,
                                               neuron.neurons_per_channel)

    def _passes_population(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        # max pooling, zero padding, dropout and identity keep every value a whole number of spikes
        known = self.population_outputs.get(id(inputs[0])) if inputs and isinstance(inputs[0], Tensor) else None
        if known is not None and isinstance(output, Tensor):
            self.population_outputs[id(output)] = (output, known[1], known[2])

    def _on_layer(self, module: nn.Module, x: Tensor, name: str) -> None:
        steps = x.reshape(self.T, x.shape[0] // self.T, *x.shape[1:])
        population = self.population_outputs.get(id(x))
        if population is not None:
            _, amplitude, m = population
            unit = per_channel(torch.where(amplitude != 0, amplitude, torch.ones_like(amplitude)), steps[0])
            counts = (steps / unit).round().sum(dim=0)  # [B, ...]: spikes per input position
            slots = counts.numel() * m
            self.fed_by_population[name] = True
        else:
            counts = (steps != 0).sum(dim=0).to(x.dtype)  # [B, ...]: nonzero steps per input position
            slots = counts.numel()
            if not self.graded[name]:
                self.graded[name] = _graded(module, x)
        ones = self.ones[name]
        self.events[name] += float(ones(counts).double().sum())
        self.summed[name] += float(ones((counts != 0).to(x.dtype)).double().sum())
        self.nonzero[name] += float(counts.double().sum())
        self.positions[name] += slots

    def fill(self, images: int) -> None:
        for name, layer in self.wanted.items():
            layer.events = self.events[name] / images
            layer.summed_events = self.summed[name] / images
            positions = self.positions[name]
            layer.input_rate = self.nonzero[name] / (positions * self.T) if positions else 0.0
            layer.input = "graded" if self.graded[name] else "population" if self.fed_by_population[name] \
                else "spikes"


def _graded(module: nn.Module, x: Tensor) -> bool:
    """Whether the nonzero inputs of some channel take more than one value (binary events carry one amplitude
    per channel)."""
    channel_dim = -1 if isinstance(module, nn.Linear) else 1
    values = x.movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1)
    mask = values != 0
    hi = torch.where(mask, values, torch.full_like(values, -float("inf"))).amax(dim=1)
    lo = torch.where(mask, values, torch.full_like(values, float("inf"))).amin(dim=1)
    return bool((mask.any(dim=1) & (hi != lo)).any())
