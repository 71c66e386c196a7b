"""What an image costs in energy, layer by layer: the cost model every evaluation reports (docs/usage.md).

A conv/linear layer's cost depends on what reaches it:

- the analog image (layers before the first spiking neuron: direct encoding presents the same image at every
  step, so they run once): one multiply-accumulate (MAC) per synapse, as in the ANN;
- binary spikes, or the summed spikes of a population (every spike of a channel has that channel's amplitude,
  which folds into the weights): one accumulate (AC) per spike per synapse, the synaptic operations (SOPs);
- graded values (after BatchNorm, a residual sum or average pooling with no neuron in between): a multiply per
  nonzero input per synapse. Run step by step, as the spike engine does, that is once per step (`per_step`).
  The parallel neuron needs only the time-mean of its input, so the layer may run once on the time-summed
  input (`accumulated`): a multiply per position that is nonzero at any step.

Neurons cost too: a serial integrate-and-fire neuron adds its input every step (T ACs); the parallel neuron
turns the time-summed input into a spike count once (one MAC). A population of m neurons per channel counts m,
an overflow neuron (nn.functional.overflow_count) one more.

Two schedules follow: `per_step` (the classic SNN: per-step multiplies for graded inputs, serial neurons) and
`accumulated` (what pconv's parallel SNN needs: graded inputs multiplied once, parallel neurons), the headline.
The ANN spends its MACs (conv and linear layers; BatchNorm folds into them, pooling and additions are not
counted on either side). Energies use 0.9 pJ per AC and 4.6 pJ per MAC by default (32-bit floating point at
45 nm: Horowitz, "Computing's energy problem", ISSCC 2014), the figures the SNN literature compares with.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

PJ_PER_AC = 0.9
PJ_PER_MAC = 4.6


@dataclass(frozen=True)
class EnergyModel:
    """Picojoules per accumulate and per multiply-accumulate."""

    pj_per_ac: float = PJ_PER_AC
    pj_per_mac: float = PJ_PER_MAC

    def __post_init__(self):
        for name in ("pj_per_ac", "pj_per_mac"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{name} must be a positive number of picojoules, got {value!r}",
                                  f"the defaults are {PJ_PER_AC} and {PJ_PER_MAC} (Horowitz, ISSCC 2014)")


@dataclass(frozen=True)
class Ops:
    """Operations per image: accumulates and multiply-accumulates."""

    acs: float = 0.0
    macs: float = 0.0

    def __add__(self, other: "Ops") -> "Ops":
        return Ops(self.acs + other.acs, self.macs + other.macs)

    def picojoules(self, model: EnergyModel) -> float:
        return self.acs * model.pj_per_ac + self.macs * model.pj_per_mac


def layer_ops(input_kind: str, macs: float, events: float | None, summed_macs: float | None,
              accumulated: bool) -> Ops | None:
    """What one conv/linear layer costs per image (None when its inputs were not measured)."""
    if input_kind == "image":
        return Ops(macs=macs)
    if events is None:
        return None
    if input_kind in ("spikes", "population"):
        return Ops(acs=events)
    return Ops(macs=summed_macs if accumulated else events)  # graded


def neuron_ops(neurons: float, time_steps: int, accumulated: bool) -> Ops:
    """What the neurons of one site cost per image: one MAC each (parallel), or one AC each per step (serial)."""
    return Ops(macs=neurons) if accumulated else Ops(acs=neurons * time_steps)
