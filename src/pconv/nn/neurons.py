"""Spiking neurons. Each carries per-channel theta_in, bias b and theta_out, and knows T.

Engines (how a neuron sees time):
  counts: the input is the time-mean [B, ...]; the output is the time-mean theta_out*k/T.
  spikes: the input is [T*B, ...] (step-major); the output is the T spike maps, same layout.
  steps:  one call per time step, [B, ...] in and out; the neuron keeps its membrane between calls
          (serial neurons only: the classic SNN schedule of T sequential passes).

A population (encoding sites, Site.population) is m neurons per channel that see the same input, with
biases spread by theta_in/m; each spike carries theta_out/m and a channel's output at a step is the sum
of its m neurons' spikes. The count hook sees every neuron's count, stacked: [m, B, ...].

`inplace` is the flag of the activation a neuron replaced (timm builds most of its activations with
inplace=True): where the model let that activation overwrite its input, the count engine does too, and saves
allocating and filling a new activation map per site, which on a CPU costs more than its arithmetic.
"""

from __future__ import annotations

from enum import Enum
from typing import Type

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..utils.registry import Registry
from . import functional as PF
from .count_kernel import capturing_count
from .cpu_kernel import cpu_count

NEURONS: Registry[Type["SpikingNeuron"]] = Registry("neuron")


class Engine(str, Enum):
    """How a neuron (and the SNN) sees time; the values are the CLI's and the JSON's names."""

    COUNTS = "counts"  # the input is the time-mean [B, ...]; the output its time-mean theta_out*k/T
    SPIKES = "spikes"  # the input is [T*B, ...] (step-major); the output the T spike maps, same layout
    STEPS = "steps"  # one call per time step; the neuron keeps its membrane (serial neurons only)


ENGINES = tuple(e.value for e in Engine)


def as_engine(engine: Engine | str) -> Engine:
    try:
        return Engine(engine)
    except ValueError:
        raise ConfigError(f"unknown engine {engine!r}", f"use one of: {', '.join(ENGINES)}") from None


class SpikingNeuron(nn.Module):
    """Shared parameters and layout helpers; subclasses define the dynamics."""

    #: Engines the neuron can run in.
    engines: tuple[Engine, ...] = (Engine.COUNTS, Engine.SPIKES)
    type_name = ""

    #: whether the neuron can have an overflow neuron (functional.overflow_count)
    overflows = False

    def __init__(self, theta_in: Tensor, bias: Tensor, theta_out: Tensor, time_steps: int, population: int = 1,
                 inplace: bool = False, overflow: Tensor | None = None):
        super().__init__()
        if overflow is not None and not self.overflows:
            raise ConfigError(f"the {self.type_name} neuron has no overflow neuron",
                              "use the parallel neuron for a network calibrated with overflow sites")
        self.time_steps = int(time_steps)
        self.population = int(population)
        #: the count engine may overwrite its input (as the activation it replaced did)
        self.inplace = bool(inplace)
        self.register_buffer("theta_in", theta_in.detach().clone())
        self.register_buffer("bias", bias.detach().clone())
        self.register_buffer("theta_out", theta_out.detach().clone())
        #: [C] levels the overflow neuron adds above the top one (functional.overflow_levels); None: no overflow
        self.register_buffer("overflow", None if overflow is None else overflow.detach().clone())
        self.engine = Engine.COUNTS if Engine.COUNTS in self.engines else Engine.SPIKES
        #: When set, called with (spikes per channel position over all steps and all of its m neurons, m) on every
        #: forward (firing-rate statistics).
        self.count_hook = None

    def set_engine(self, engine: Engine | str) -> None:
        engine = as_engine(engine)
        if engine not in self.engines:
            raise ConfigError(f"the {self.type_name} neuron cannot run in the {engine.value!r} engine",
                              f"use one of: {', '.join(e.value for e in self.engines)}")
        self.engine = engine

    def steps_view(self, x: Tensor) -> Tensor:
        """[T*B, ...] -> [T, B, ...]."""
        return x.view(self.time_steps, x.shape[0] // self.time_steps, *x.shape[1:])

    def biases(self, like: Tensor) -> Tensor:
        """[m, 1, C, 1, ...]: the bias of each of the m neurons of a channel, shaped against `like`."""
        return torch.stack([PF.per_channel(b, like) for b in
                            PF.population_biases(self.theta_in, self.bias, self.population)])

    @property
    def neurons_per_channel(self) -> int:
        """The population's m, and one more with an overflow neuron."""
        return self.population + (self.overflow is not None)

    def extra_repr(self) -> str:
        pop = f", population={self.population}" if self.population > 1 else ""
        over = ", overflow=True" if self.overflow is not None else ""
        inplace = ", inplace=True" if self.inplace else ""
        return f"channels={self.theta_in.numel()}, T={self.time_steps}{pop}{over}, engine={self.engine.value}{inplace}"


@NEURONS.register("parallel")
class ParallelIF(SpikingNeuron):
    """Parallel IF neuron: spikes at steps 1..k, k = clamp(floor((T*mean(x) + b)/theta_in), 0, T)."""

    type_name = "parallel"
    overflows = True
    #: (key of the parameters, the parameters, their count-engine factors), see _count_factors
    _factors: tuple | None = None

    def forward(self, x: Tensor) -> Tensor:
        T, m = self.time_steps, self.population
        if self.engine is Engine.COUNTS:  # one pass, whatever the population (Hermite's identity)
            scale, offset, amplitude, (top, limit) = self._count_factors()
            # never in place on a tensor autograd may need (the activation's own in-place ops take the same care)
            inplace = self.inplace and not x.requires_grad
            if self.count_hook is None:  # one kernel instead of five passes: inside a CUDA graph, or on the CPU
                fused = capturing_count(x, scale, offset, amplitude, top) if limit is None else None
                if fused is None:
                    fused = cpu_count(x, scale, offset, amplitude, top, inplace, limit)
                if fused is not None:
                    return fused
                k = PF.counted(x, scale, offset, top, inplace=inplace, limit=limit)
            else:  # the hook needs the counts themselves: fused on the CPU up to them, the amplitude after
                k = cpu_count(x, scale, offset, None, top, inplace, limit)
                if k is None:
                    k = PF.counted(x, scale, offset, top, inplace=inplace, limit=limit)
                self.count_hook(k, self.neurons_per_channel)
                return k * PF.per_channel(amplitude, k)
            return k.mul_(PF.per_channel(amplitude, k))
        x_mean = self.steps_view(x).mean(dim=0)
        counts = PF.population_counts(x_mean, self.theta_in, self.bias, T, m)
        if self.overflow is not None:  # the overflow neuron spikes with the population's amplitude
            counts.append(PF.overflow_count(x_mean, self.theta_in, self.bias, self.overflow, T, m))
        if self.count_hook is not None:
            self.count_hook(sum(counts[1:], counts[0].clone()) if len(counts) > 1 else counts[0],
                            self.neurons_per_channel)
        steps = torch.arange(1, T + 1, device=x.device, dtype=x.dtype).view(T, *([1] * x_mean.dim()))
        fired = (steps <= counts[0].unsqueeze(0)).to(x.dtype)
        for k in counts[1:]:  # spikes of a channel's m neurons at each step
            fired += (steps <= k.unsqueeze(0)).to(x.dtype)
        amplitude = PF.per_channel(self.theta_out / m, x_mean).unsqueeze(0)
        return (fired * amplitude).reshape(x.shape)

    def _count_factors(self) -> tuple[Tensor, Tensor, Tensor, tuple[int, Tensor | None]]:
        """functional.count_engine_factors of this neuron and the top of its count (functional.overflow_top),
        computed once while the parameters stay the same tensors with the same values: at batch 1 recomputing
        them at every site cost as much as the site's arithmetic. Recomputed under torch.compile, which folds
        them."""
        params = (self.theta_in, self.bias, self.theta_out) + (() if self.overflow is None else (self.overflow,))
        # inference tensors have no version counter to tell a change by: those are not cached
        cached = not torch.compiler.is_compiling() and not any(p.is_inference() for p in params)
        key = (self.time_steps, self.population) + tuple((id(p), p._version) for p in params) if cached else None
        if key is None or self._factors is None or self._factors[0] != key:
            factors = (*PF.count_engine_factors(*params[:3], self.time_steps, self.population),
                       PF.overflow_top(self.overflow, self.time_steps * self.population, self.time_steps))
            if key is None:
                return factors
            self._factors = (key, params, factors)  # params held: their ids stay theirs while the key lives
        return self._factors[2]


@NEURONS.register("serial")
class SerialIF(SpikingNeuron):
    """Classic IF neuron, one step after another: v_0 = b, v += x_t, spike when v >= theta_in,
    reset by subtraction. Equal to the parallel neuron on time-constant input.

    Its overflow neuron (functional.overflow_count) starts T*theta_in below the first neuron and may fire
    several spikes in one step (a burst, up to its `overflow` in all): one spike per step could not catch up on
    the steps it spent climbing, which the parallel neuron, seeing the whole input at once, never has to."""

    type_name = "serial"
    engines = (Engine.SPIKES, Engine.STEPS)
    overflows = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.membrane: Tensor | None = None  # state of the "steps" engine
        self.fired: Tensor | None = None
        self.overflow_membrane: Tensor | None = None
        self.overflow_fired: Tensor | None = None

    def _overflow_step(self, x: Tensor) -> Tensor | None:
        """The overflow neuron's spikes at this step (None without one); keeps its membrane and count."""
        if self.overflow is None:
            return None
        T, m = self.time_steps, self.population
        theta = PF.per_channel(self.theta_in / m, x)
        if self.overflow_membrane is None:
            self.overflow_membrane = PF.per_channel(self.bias - T * self.theta_in, x).expand_as(x).clone()
            self.overflow_fired = torch.zeros_like(x)
        self.overflow_membrane = self.overflow_membrane + x
        room = PF.per_channel(self.overflow, x) - self.overflow_fired
        fired = torch.minimum((self.overflow_membrane / theta).floor().clamp_min(0), room)
        self.overflow_membrane = self.overflow_membrane - fired * theta
        self.overflow_fired = self.overflow_fired + fired
        return fired

    def reset(self) -> None:
        """Forget the membrane: call before each new batch in the "steps" engine. Reports the spike
        counts of the finished batch to `count_hook` first."""
        if self.fired is not None and self.count_hook is not None:
            total = self.fired.sum(dim=0)
            self.count_hook(total if self.overflow_fired is None else total + self.overflow_fired,
                            self.neurons_per_channel)
        self.membrane = None
        self.fired = None
        self.overflow_membrane = None
        self.overflow_fired = None

    def forward(self, x: Tensor) -> Tensor:
        if self.engine is Engine.STEPS:
            return self._one_step(x)
        steps = self.steps_view(x)
        m = self.population
        theta_in = PF.per_channel(self.theta_in, steps[0])
        theta_out = PF.per_channel(self.theta_out / m, steps[0])
        v = self.biases(steps[0]).expand(m, *steps[0].shape).clone()  # [m, B, ...]: one membrane per neuron
        out = torch.empty_like(steps)
        count = torch.zeros_like(v) if self.count_hook is not None else None
        self.overflow_membrane = self.overflow_fired = None
        for t in range(self.time_steps):
            v = v + steps[t]
            fired = (v >= theta_in).to(x.dtype)
            v = v - fired * theta_in
            spikes = fired.sum(dim=0)
            burst = self._overflow_step(steps[t])
            out[t] = (spikes if burst is None else spikes + burst) * theta_out
            if count is not None:
                count += fired
        if count is not None:
            total = count.sum(dim=0)
            self.count_hook(total if self.overflow_fired is None else total + self.overflow_fired,
                            self.neurons_per_channel)
        self.overflow_membrane = self.overflow_fired = None
        return out.view(x.shape)

    def _one_step(self, x: Tensor) -> Tensor:
        m = self.population
        if self.membrane is None:
            self.membrane = self.biases(x).expand(m, *x.shape).clone()
            self.fired = torch.zeros_like(self.membrane)
        self.membrane = self.membrane + x
        fired = (self.membrane >= PF.per_channel(self.theta_in, x)).to(x.dtype)
        self.membrane = self.membrane - fired * PF.per_channel(self.theta_in, x)
        self.fired += fired
        spikes = fired.sum(dim=0)
        burst = self._overflow_step(x)
        return (spikes if burst is None else spikes + burst) * PF.per_channel(self.theta_out / m, x)


def make_neuron(kind: str, theta: Tensor, delta_in: Tensor, delta_out: Tensor, time_steps: int,
                population: int = 1, overflow: bool = False, cap: float | None = None) -> SpikingNeuron:
    """A neuron of the registered `kind` from QCFS threshold and DA shifts (DESIGN §2), with an overflow neuron
    if `overflow` (`cap`: the site's, ReLU6's 6)."""
    cls = NEURONS.get(kind)
    theta_in, bias, theta_out = PF.neuron_params(theta, delta_in, delta_out, time_steps, population)
    extra = PF.overflow_levels(theta_out, time_steps * population, time_steps, cap) if overflow else None
    return cls(theta_in, bias, theta_out, time_steps, population, overflow=extra)
