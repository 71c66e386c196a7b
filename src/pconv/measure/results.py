"""What `pconv eval` reports, in timm's vocabulary and units (`top1`, `top5`, `samples_per_sec`,
`step_time`, `param_count`, ...): the result types and their JSON form."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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
    param_count: int  # parameters (to_dict: in millions, 2 decimals, as timm's validate.py writes it)
    top1: float
    top5: float
    topk: int
    ann_top1: float | None
    ann_top5: float | None
    top1_agreement: float | None  # % of images where SNN and ANN predict the same class
    samples_per_sec: float
    step_time: float  # ms per batch (forward pass only, data loading excluded), timm's `step_time`
    ann_samples_per_sec: float | None
    ann_step_time: float | None
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
        d["param_count"] = round(self.param_count / 1e6, 2)
        for key in ("samples_per_sec", "step_time", "ann_samples_per_sec", "ann_step_time"):
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
