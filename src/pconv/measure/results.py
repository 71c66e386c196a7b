"""What `pconv eval` reports, in timm's vocabulary and units (`top1`, `top5`, `samples_per_sec`,
`step_time`, `param_count`, ...): the result types and their JSON form."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .difference import PairedDifference
from .energy import EnergyModel, Ops, layer_ops, neuron_ops


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
    """Cost of one conv/linear layer, per image (measure/energy.py)."""

    name: str
    kind: str  # "conv" | "linear"
    #: "image" (direct encoding: MACs, once) | "spikes" (binary) | "population" (summed spikes of m neurons) |
    #: "graded" (nonzero values of varying size: multiplies)
    input: str
    macs: int  # multiply-accumulates of the ANN layer
    events: float | None = None  # nonzero inputs over the T steps x fan-out; None: "image", or not measured
    summed_events: float | None = None  # inputs nonzero at some step x fan-out (one multiply on the time-sum)
    input_rate: float | None = None  # nonzero inputs per input position per step (events / (positions x T))

    @property
    def sops(self) -> float | None:
        """Synaptic operations (one accumulate per spike per synapse), for binary inputs only."""
        return self.events if self.input in ("spikes", "population") else None

    def ops(self, accumulated: bool) -> Ops | None:
        return layer_ops(self.input, self.macs, self.events, self.summed_events, accumulated)


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
    #: SNN top-1 minus the ANN's on the same images, with the counts its confidence interval comes from
    top1_diff: PairedDifference | None
    samples_per_sec: float
    step_time: float  # ms per batch (forward pass only, data loading excluded), timm's `step_time`
    ann_samples_per_sec: float | None
    ann_step_time: float | None
    sop_images: int  # images SOPs were counted on (0: not measured)
    # top-1 of the cumulative output after t = 1..T steps (spike and step engines; None in the count engine)
    step_top1: list[float] | None = None
    sites: list[SiteStats] = field(default_factory=list)
    layers: list[LayerStats] = field(default_factory=list)
    energy: EnergyModel = field(default_factory=EnergyModel)

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
        """Synaptic operations per image: spikes (binary, or a population's) x fan-out, over the T steps."""
        measured = [layer for layer in self.layers if layer.input != "image"]
        if not self.sop_images or any(layer.events is None for layer in measured):
            return None
        return float(sum(layer.sops or 0.0 for layer in measured))

    def graded_macs(self, accumulated: bool) -> float | None:
        """Multiplies per image the graded inputs need (on the time-summed input, or at every step)."""
        graded = [layer for layer in self.layers if layer.input == "graded"]
        if not self.sop_images or any(layer.events is None for layer in graded):
            return None
        return float(sum(layer.summed_events if accumulated else layer.events for layer in graded))

    def ops(self, accumulated: bool) -> Ops | None:
        """Everything the SNN does per image, layers and neurons (None before SOPs are counted)."""
        layers = [layer.ops(accumulated) for layer in self.layers]
        if not self.sop_images or any(op is None for op in layers):
            return None
        total = Ops()
        for op in layers:
            total = total + op
        for site in self.sites:
            total = total + neuron_ops(site.neurons, self.time_steps, accumulated)
        return total

    def snn_energy_pj(self, accumulated: bool = True) -> float | None:
        ops = self.ops(accumulated)
        return None if ops is None else ops.picojoules(self.energy)

    @property
    def ann_energy_pj(self) -> float:
        return Ops(macs=self.ann_macs).picojoules(self.energy)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("energy")  # its two figures are written out below
        d.update(self._difference_dict())
        d["top1_err"] = _round(100.0 - self.top1)
        d["top5_err"] = _round(100.0 - self.top5)
        d["mean_firing_rate"] = _round(self.mean_firing_rate, 6)
        d["ann_macs_per_image"] = self.ann_macs
        d["snn_macs_per_image"] = self.snn_macs
        d["sops_per_image"] = None if self.sops is None else round(self.sops, 1)
        for accumulated, key in ((True, "graded_macs_per_image"), (False, "graded_macs_per_step_per_image")):
            value = self.graded_macs(accumulated)
            d[key] = None if value is None else round(value, 1)
        d["neurons_per_image"] = sum(s.neurons for s in self.sites)
        d.update(self._energy_dict())
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
        d["layers"] = [self._layer_dict(layer) for layer in self.layers]
        return d

    def _difference_dict(self) -> dict[str, Any]:
        """SNN − ANN top-1 (points), its 95 % interval and the discordant counts it comes from (None without
        the ANN): scalars, so that CSV rows carry them too."""
        diff = self.top1_diff
        if diff is None:
            return dict.fromkeys(("top1_diff", "top1_diff_ci95_low", "top1_diff_ci95_high", "top1_ann_only",
                                  "top1_snn_only"))
        low, high = diff.interval()
        return {"top1_diff": _round(diff.points), "top1_diff_ci95_low": _round(low),
                "top1_diff_ci95_high": _round(high), "top1_ann_only": diff.ann_only,
                "top1_snn_only": diff.snn_only}

    def _energy_dict(self) -> dict[str, Any]:
        """Energy per image in µJ (accumulated schedule, and per step), the ANN's, their ratio, the model."""
        snn, per_step, ann = self.snn_energy_pj(True), self.snn_energy_pj(False), self.ann_energy_pj
        return {
            "pj_per_ac": self.energy.pj_per_ac, "pj_per_mac": self.energy.pj_per_mac,
            "ann_energy_uj": _significant(ann / 1e6),
            "snn_energy_uj": None if snn is None else _significant(snn / 1e6),
            "snn_energy_per_step_uj": None if per_step is None else _significant(per_step / 1e6),
            "energy_ratio": None if snn is None or not ann else _round(snn / ann, 4),
            "energy_ratio_per_step": None if per_step is None or not ann else _round(per_step / ann, 4),
        }

    def _layer_dict(self, layer: LayerStats) -> dict[str, Any]:
        energy = {}
        for accumulated, key in ((True, "energy_uj"), (False, "energy_per_step_uj")):
            ops = layer.ops(accumulated)
            energy[key] = None if ops is None else _significant(ops.picojoules(self.energy) / 1e6)
        graded = layer.input == "graded" and layer.events is not None
        return {
            "name": layer.name, "kind": layer.kind, "input": layer.input, "macs": layer.macs,
            "sops": None if layer.sops is None else round(layer.sops, 1),
            "graded_macs": round(layer.summed_events, 1) if graded else None,
            "graded_macs_per_step": round(layer.events, 1) if graded else None,
            "input_rate": None if layer.input_rate is None else _round(layer.input_rate, 6),
            **energy,
        }


def _round(x: float, digits: int = 4) -> float:
    return round(float(x), digits)


def _significant(x: float, digits: int = 6) -> float:
    """Energies span nJ (a toy CNN) to mJ (ImageNet): keep significant digits, not decimals."""
    return float(f"{float(x):.{digits}g}")
