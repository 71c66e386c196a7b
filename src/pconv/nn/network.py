"""The converted network: the source architecture with spiking neurons at every activation site."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.source import ModelSource
from ..observe.sites import ACTIVATIONS, Site, site_modules, swap_sites, unswap_sites
from . import functional as PF
from .neurons import NEURONS, Engine, SpikingNeuron, as_engine
from .population import populations

_ACTIVATION_TYPES = {kind: cls for cls, (kind, _) in ACTIVATIONS.items()}


@dataclass
class ConversionInfo:
    """What the SNN is and how it was made; serialised into the exported file (format.FileMetadata)."""

    time_steps: int
    neuron: str
    sites: list[Site]
    #: the threshold method and calibration method that ran at this T (for `auto`, what it resolved to)
    threshold: str = "max"
    method: str = "none"
    source: ModelSource | None = None
    data_config: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    #: no site has more than ceil(encoding_levels/T) neurons per channel; 0: one everywhere
    encoding_levels: int = 0
    #: the sites whose neurons per channel the calibration chose by sensitivity under its budget (hidden sites
    #: with more than one, encoding sites with any); an encoding site not in it has ceil(encoding_levels/T)
    populated: dict[str, int] = field(default_factory=dict)
    #: the sites with an overflow neuron per channel (functional.overflow_count), in network order
    overflow: list[str] = field(default_factory=list)
    #: outputs of the classifier (None: not recorded, files before it was)
    num_classes: int | None = None
    #: the calibration's configuration as JSON (calibration.CalibrationConfig.to_dict), when it is known
    config: dict[str, Any] | None = None

    def populations(self) -> dict[str, int]:
        """Neurons per channel of every site."""
        return populations(self.sites, self.time_steps, self.encoding_levels, self.populated)


#: (theta_in, bias, theta_out) of one site's neurons, per channel.
NeuronParams = tuple[Tensor, Tensor, Tensor]


def spiking_network(net: nn.Module, info: ConversionInfo, params: Mapping[str, NeuronParams]) -> "SpikingNetwork":
    """Swap every site of `net` (in place) for `info.neuron` neurons with `params`; the SNN around it.

    Refuses a network that lacks one of `info.sites` (or has another activation there)."""
    cls = NEURONS.get(info.neuron)
    populations = info.populations()
    overflow = set(info.overflow)
    device = next(net.parameters()).device

    def make(module: nn.Module, site: Site) -> SpikingNeuron:
        if ACTIVATIONS.get(type(module), ("",))[0] != site.activation:
            raise ConfigError(f"site {site.name} is a {site.activation} in the SNN description but "
                              f"{type(module).__name__} in the model", "use the calibration or file made for this model")
        theta_in, bias, theta_out = (t.to(device) for t in params[site.name])
        inplace = bool(getattr(module, "inplace", False))  # the model's own choice for this activation
        m, T = populations[site.name], info.time_steps
        extra = PF.overflow_levels(theta_out, m * T, T, site.cap) if site.name in overflow else None
        return cls(theta_in, bias, theta_out, T, m, inplace=inplace, overflow=extra)

    try:
        swap_sites(net, info.sites, make)
    except KeyError as e:
        raise ConfigError(f"the SNN description names activation sites the model does not have (e.g. {e.args[0]})",
                          "use the calibration or file made for this model") from None
    return SpikingNetwork(net, info)


class SpikingNetwork(nn.Module):
    """Calling it on [B, ...] returns the time-mean of its T-step output, [B, classes].

    engine "counts": each neuron emits its time-mean (cost independent of T);
    engine "spikes": T*B samples flow through every layer (per-step outputs available);
    engine "steps":  T sequential passes of B samples, neurons keep state (serial neurons only).
    `spike_batch_limit` bounds the samples of one spike-domain pass: larger batches run in chunks.
    """

    def __init__(self, net: nn.Module, info: ConversionInfo):
        super().__init__()
        self.net = net
        self.info = info
        self.spike_batch_limit: int | None = None
        #: the ANN's values of the state-dict entries a layer refit replaced; None: an entry it added
        self.ann_weights: dict[str, Tensor | None] = {}
        kinds = {type(m).type_name for m in self.neurons().values()}
        counts = all(Engine.COUNTS in NEURONS.get(k).engines for k in kinds)
        self._engine = Engine.COUNTS if counts else Engine.SPIKES
        self.set_engine(self._engine)

    @property
    def time_steps(self) -> int:
        return self.info.time_steps

    @property
    def engine(self) -> Engine:
        return self._engine

    def set_engine(self, engine: Engine | str) -> "SpikingNetwork":
        engine = as_engine(engine)
        for neuron in self.neurons().values():
            neuron.set_engine(engine)
        self._engine = engine
        return self

    def neurons(self) -> dict[str, SpikingNeuron]:
        return site_modules(self.net, self.info.sites)

    def forward(self, x: Tensor) -> Tensor:
        if self._engine is Engine.COUNTS:
            return self.net(x)
        return self.forward_steps(x).mean(dim=0)

    def forward_steps(self, x: Tensor) -> Tensor:
        """Per-step outputs [T, B, ...] (spike or step engine): the image is presented at every step."""
        if self._engine is Engine.COUNTS:
            raise ConfigError("per-step outputs need the spike-domain engine", "call snn.set_engine('spikes')")
        if self._engine is Engine.STEPS:
            return self._run_steps(x)
        T, B = self.time_steps, x.shape[0]
        chunk = B if not self.spike_batch_limit else max(1, self.spike_batch_limit // T)
        outs = []
        for part in x.split(chunk):
            repeated = part.unsqueeze(0).expand(T, *part.shape).reshape(T * part.shape[0], *part.shape[1:])
            out = self.net(repeated)
            outs.append(out.view(T, part.shape[0], *out.shape[1:]))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _run_steps(self, x: Tensor) -> Tensor:
        neurons = self.neurons().values()
        for neuron in neurons:
            neuron.reset()
        try:
            return torch.stack([self.net(x) for _ in range(self.time_steps)])
        finally:
            for neuron in neurons:
                neuron.reset()

    def to_ann(self) -> nn.Module:
        """A copy of the source ANN: the same weights with the original activations back."""
        ann = copy.deepcopy(self.net)
        neurons = self.neurons()
        unswap_sites(ann, self.info.sites,
                     lambda site: _ACTIVATION_TYPES[site.activation](inplace=neurons[site.name].inplace))
        with torch.no_grad():
            for key, value in self.ann_weights.items():  # undo a layer refit
                owner, _, leaf = key.rpartition(".")
                module = ann.get_submodule(owner)
                if value is None:
                    setattr(module, leaf, None)
                else:
                    getattr(module, leaf).copy_(value)
        return ann.eval()

    def with_neuron(self, kind: str) -> "SpikingNetwork":
        """The same SNN (same parameters, same T) with another neuron type, e.g. the serial baseline."""
        cls = NEURONS.get(kind)
        net = copy.deepcopy(self.net)

        def rebuild(old: SpikingNeuron, site: Site) -> SpikingNeuron:
            return cls(old.theta_in, old.bias, old.theta_out, old.time_steps, old.population, inplace=old.inplace,
                       overflow=old.overflow)

        swap_sites(net, self.info.sites, rebuild)
        info = copy.copy(self.info)
        info.neuron = kind
        snn = SpikingNetwork(net, info)
        snn.ann_weights = dict(self.ann_weights)
        return snn.eval()

    def extra_repr(self) -> str:
        return (f"T={self.time_steps}, neuron={self.info.neuron}, engine={self._engine.value}, "
                f"sites={len(self.info.sites)}")
