"""The arithmetic shared by QCFS and the spiking neurons.

QCFS and the parallel neuron must agree bit for bit, so both call the same two functions here
instead of writing the formula twice (see docs/math.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The QCFS shift phi: rounds to the nearest level instead of flooring.
PHI = 0.5


def per_channel(param: Tensor, like: Tensor, channel_dim: int = 1) -> Tensor:
    """View a [C] parameter so it broadcasts against `like` along `channel_dim`."""
    shape = [1] * like.dim()
    shape[channel_dim] = -1
    return param.view(shape)


def neuron_params(theta: Tensor, delta_in: Tensor, delta_out: Tensor, time_steps: int,
                  population: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """(theta_in, bias, theta_out) of a neuron from the QCFS threshold and DA shifts.

    bias = phi*theta + T*delta_in carries the calibrated input shift inside the floor;
    theta_out = theta + delta_out is the calibrated output amplitude.
    With a population of m neurons per channel, `bias` is the first neuron's, phi*theta/m + T*delta_in;
    neuron j adds j*theta/m (see population_count).
    """
    theta_in = theta
    bias = theta * (PHI / population) + time_steps * delta_in
    theta_out = theta + delta_out
    return theta_in, bias, theta_out


def spike_count(x_mean: Tensor, theta_in: Tensor, bias: Tensor, time_steps: int, channel_dim: int = 1) -> Tensor:
    """k = clamp(floor((T*mean(x) + b) / theta_in), 0, T): how many of the T steps spike.

    Evaluated as floor(mean(x) * (T/theta_in) + b/theta_in), with the per-channel factors computed once, as a
    multiply and then an in-place add: torch's addcmul against two per-channel (broadcast) factors is not
    vectorised on the CPU and costs three times the two passes (docs/benchmarks.md). QCFS and every neuron call
    this one function, so they agree bit for bit whatever the rounding of this form.
    """
    scale, offset = count_factors(theta_in, bias, time_steps)
    return counted(x_mean, scale, offset, time_steps, channel_dim)


def count_factors(theta_in: Tensor, bias: Tensor, time_steps: int) -> tuple[Tensor, Tensor]:
    """The per-channel factors of spike_count: (T/theta_in, b/theta_in)."""
    return time_steps / theta_in, bias / theta_in


def counted(x_mean: Tensor, scale: Tensor, offset: Tensor, levels: int, channel_dim: int = 1,
            inplace: bool = False, limit: Tensor | None = None) -> Tensor:
    """clamp(floor(mean(x) * scale + offset), 0, levels) per channel: spike_count with its factors given.
    `inplace`: computed in x_mean's memory (the same operations, so the same values). `limit` ([C], or None):
    a lower top per channel (an overflow neuron on a ReLU6 site, see overflow_top)."""
    scale, offset = per_channel(scale, x_mean, channel_dim), per_channel(offset, x_mean, channel_dim)
    scaled = x_mean.mul_(scale) if inplace else x_mean * scale
    k = scaled.add_(offset).floor_().clamp_(0, levels)
    return k if limit is None else limit_counts(k, limit, channel_dim)


def limit_counts(k: Tensor, limit: Tensor, channel_dim: int = 1) -> Tensor:
    """min(k, limit) per channel, in k's memory (counts and limits are whole numbers: exact in any order)."""
    return torch.minimum(k, per_channel(limit, k, channel_dim), out=k)


def overflow_levels(theta_out: Tensor, resolution: int, time_steps: int, cap: float | None) -> Tensor:
    """[C]: the levels an overflow neuron adds above a site's top level L = m*T, each of the site's own step
    theta_out/L: T, or on a ReLU6 site as many as fit below the cap (the ANN's activation never exceeds it), 0
    where none does."""
    full = torch.full_like(theta_out, float(time_steps))
    if cap is None:
        return full
    room = ((cap - theta_out) * resolution / theta_out.clamp_min(torch.finfo(theta_out.dtype).tiny)).floor()
    return torch.where(theta_out > 0, room.clamp(0, time_steps), torch.zeros_like(full))


def overflow_top(extra: Tensor | None, resolution: int, time_steps: int) -> tuple[int, Tensor | None]:
    """(levels, limit) of `counted` for a site with L = `resolution` levels and, unless `extra` is None, an
    overflow neuron adding `extra` ([C], overflow_levels) levels: the count is clamp(floor(.), 0, L + T),
    then at most L + extra per channel where that is lower (limit None where it never is)."""
    if extra is None:
        return resolution, None
    if bool((extra >= time_steps).all()):
        return resolution + time_steps, None
    return resolution + time_steps, extra + resolution


def population_biases(theta_in: Tensor, bias: Tensor, population: int) -> list[Tensor]:
    """Biases of the m neurons of a channel: the first one's, then spread by theta_in/m."""
    return [bias if j == 0 else bias + theta_in * (j / population) for j in range(population)]


def population_counts(x_mean: Tensor, theta_in: Tensor, bias: Tensor, time_steps: int, population: int,
                      channel_dim: int = 1) -> list[Tensor]:
    """The spike count of each of the m neurons of every channel (all see the same input)."""
    return [spike_count(x_mean, theta_in, b, time_steps, channel_dim)
            for b in population_biases(theta_in, bias, population)]


def population_count(x_mean: Tensor, theta_in: Tensor, bias: Tensor, time_steps: int, population: int,
                     channel_dim: int = 1) -> Tensor:
    """Total spikes of a population of m neurons per channel, in [0, m*T], in one pass.

    Neuron j counts clamp(floor(u + j/m), 0, T) with u = (T*mean(x) + b)/theta_in; Hermite's identity,
    sum_j floor(u + j/m) = floor(m*u), clamps included, makes the total that of one neuron with m*T levels,
    clamp(floor(m*u), 0, m*T) = clamp(floor(m*T*(x + delta_in)/theta + phi), 0, m*T) (docs/math.md). Computed so,
    the count engine costs one neuron's arithmetic whatever m; the spike engine, which must emit every neuron's
    spikes, sums them (population_counts): the two differ only where a value falls within rounding of a
    level boundary."""
    theta_in, bias, levels = population_neuron(theta_in, bias, time_steps, population)
    return spike_count(x_mean, theta_in, bias, levels, channel_dim)


def population_neuron(theta_in: Tensor, bias: Tensor, time_steps: int, population: int) -> tuple[Tensor, Tensor, int]:
    """(theta_in, bias, levels) of the one neuron with m*T levels whose count is a population's total."""
    if population == 1:
        return theta_in, bias, time_steps
    return theta_in, bias * population, time_steps * population


def count_engine_factors(theta_in: Tensor, bias: Tensor, theta_out: Tensor, time_steps: int,
                         population: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """The per-channel factors of a site's count form: (scale, offset) of `counted` for the population's one
    neuron with m*T levels, and the amplitude theta_out/(m*T) its count is multiplied by. QCFS and the count
    engine both take them from here (the engine keeps them between calls)."""
    theta_in, bias, levels = population_neuron(theta_in, bias, time_steps, population)
    return (*count_factors(theta_in, bias, levels), theta_out / levels)


def count_output(k: Tensor, theta_out: Tensor, time_steps: int, channel_dim: int = 1, inplace: bool = False) -> Tensor:
    """Time-mean output of a neuron that spiked k times with amplitude theta_out: k * (theta_out/T)."""
    amplitude = per_channel(theta_out / time_steps, k, channel_dim)
    return k.mul_(amplitude) if inplace else k * amplitude


def qcfs(x: Tensor, theta: Tensor, delta_in: Tensor, delta_out: Tensor, levels: int, channel_dim: int = 1,
         population: int = 1, overflow: bool = False, cap: float | None = None) -> Tensor:
    """DA-QCFS: (theta+delta_out)/L * clamp(floor(L*(x+delta_in)/theta + phi), 0, L), per channel.

    With a population of m neurons per channel it is computed as their summed counts, which equals the
    formula with m*L levels (population_count). With `overflow`, the site's overflow neuron adds up to T levels
    of the same step above the top one (overflow_levels, which reads the site's `cap`): the clamp's top is
    m*L + T, or lower per channel on a ReLU6 site (docs/math.md)."""
    theta_in, bias, theta_out = neuron_params(theta, delta_in, delta_out, levels, population)
    scale, offset, amplitude = count_engine_factors(theta_in, bias, theta_out, levels, population)
    resolution = levels * population
    extra = overflow_levels(theta_out, resolution, levels, cap) if overflow else None
    top, limit = overflow_top(extra, resolution, levels)
    k = counted(x, scale, offset, top, channel_dim, limit=limit)
    return k.mul_(per_channel(amplitude, k, channel_dim))


def overflow_count(x_mean: Tensor, theta_in: Tensor, bias: Tensor, extra: Tensor, time_steps: int,
                   population: int, channel_dim: int = 1) -> Tensor:
    """The spike count of a site's overflow neuron: one more neuron per channel after the population's m, with
    threshold theta_in/m and bias b - T*theta_in, so that it counts the levels of m*u above the top one,
    clamp(floor(m*u) - m*T, 0, T) (u as in population_count), and at most `extra` per channel. Its spikes carry
    the amplitude of the population's (theta_out/m): the site's total is the count form's clamp(floor(m*u), 0,
    m*T + extra) up to rounding. Its large negative bias is why only the parallel neuron has one: a serial
    neuron would spend its first steps climbing to threshold and could not fire at every later one."""
    k = spike_count(x_mean, theta_in / population, bias - time_steps * theta_in, time_steps, channel_dim)
    return limit_counts(k, extra, channel_dim)


def qcfs_straight_through(x: Tensor, theta: Tensor, delta_in: Tensor, delta_out: Tensor, levels: int,
                          channel_dim: int = 1, relaxed: Tensor | None = None) -> Tensor:
    """DA-QCFS with L = `levels` (m*T for a population), differentiable: clamp(floor(u), 0, L) is computed as
    floor(clamp(u, 0, L)) (the same integers), the clamp's gradient 1 inside [0, L] and the floor's taken as 1
    (the straight-through estimator, as LSQ does), so inputs that round to level 0 still pass a gradient. Its
    values are QCFS's up to rounding; only calibration by gradient descent uses it, never an SNN.

    `relaxed` (a bool mask broadcasting against x): where True, the value is qcfs_relaxed's instead, the
    unrounded one (recon's QDrop), with that function's gradient."""
    return _StraightThrough.apply(x, theta, delta_in, delta_out, levels, channel_dim, relaxed)


class _StraightThrough(torch.autograd.Function):
    """qcfs_straight_through with its gradient written out. The same formula through autograd records every
    elementwise step and differentiates each one over the whole activation map (about twenty passes over it
    per site and step, half of recon's time on EfficientNet-Lite0's large early maps); by hand the backward
    needs a masked gradient and three sums per channel. tests/nn/test_straight_through.py holds both
    directions to autograd's on the formula itself."""

    @staticmethod
    def forward(ctx, x, theta, delta_in, delta_out, levels, channel_dim, relaxed):
        t, d_in, d_out = (per_channel(p, x, channel_dim) for p in (theta, delta_in, delta_out))
        v = (x + d_in).mul_(levels).div_(t)  # L*(x + delta_in)/theta, rounded as the formula is
        u = v + PHI
        z = u.clamp(0, levels)
        inside = z == u  # where the clamp passes the gradient (its bounds included, as torch's clamp does)
        z.floor_()
        if relaxed is not None:
            unrounded = v.clamp(0, levels)
            inside = torch.where(relaxed, unrounded == v, inside)
            z = torch.where(relaxed, unrounded, z)
        amplitude = (t + d_out) / levels
        ctx.save_for_backward(v, z, inside, t, amplitude)
        ctx.levels, ctx.channel_dim = levels, channel_dim
        ctx.params = [(p.shape, p.dtype, view.shape) for p, view in ((theta, t), (delta_in, d_in), (delta_out, d_out))]
        return z * amplitude

    @staticmethod
    def backward(ctx, grad):
        v, z, inside, t, amplitude = ctx.saved_tensors
        levels = ctx.levels
        need_x, need_theta, need_in, need_out = ctx.needs_input_grad[:4]
        others = [d for d in range(grad.dim()) if d != ctx.channel_dim]

        def channel_sums(values: Tensor) -> Tensor:  # kept as [1, C, 1, 1]: per-channel factors broadcast on it
            return values.sum(others, keepdim=True) if others else values

        def as_param(g: Tensor, which: int) -> Tensor:  # a parameter of one value for every channel sums them
            shape, dtype, view = ctx.params[which]
            return g.sum_to_size(view).reshape(shape).to(dtype)

        # out = z * amplitude with z = clamp(L*(x + delta_in)/theta), rounded straight through, and amplitude =
        # (theta + delta_out)/L. Inside the clamp: d out/dx = d out/d delta_in = amplitude*L/theta and
        # d out/d theta = z/L - amplitude*v/theta; outside it only the z/L; d out/d delta_out = z/L.
        masked = grad * inside
        slope = amplitude * levels / t
        grad_x = masked * slope if need_x else None
        grad_in = as_param(channel_sums(masked) * slope, 1) if need_in else None
        by_level = channel_sums(grad * z) / levels if (need_out or need_theta) else None
        grad_out = as_param(by_level, 2) if need_out else None
        grad_theta = as_param(by_level - channel_sums(masked * v) * (amplitude / t), 0) if need_theta else None
        return grad_x, grad_theta, grad_in, grad_out, None, None, None


def qcfs_relaxed(x: Tensor, theta: Tensor, delta_in: Tensor, delta_out: Tensor, levels: int,
                 channel_dim: int = 1) -> Tensor:
    """What DA-QCFS rounds, unrounded: (theta+delta_out)/L * clamp(L*(x+delta_in)/theta, 0, L), the value of
    the level that floor(. + phi) rounds it to before the rounding (x clipped to [0, theta] when the shifts are
    0). Differentiable in x, theta and the shifts. recon's QDrop passes this value instead of the rounded one for
    a random half of the activations while a block trains; it computes it inside qcfs_straight_through (its
    `relaxed` mask), which the tests hold to this formula, values and gradients."""
    t, d_in, d_out = (per_channel(p, x, channel_dim) for p in (theta, delta_in, delta_out))
    return (levels * (x + d_in) / t).clamp(0, levels) * ((t + d_out) / levels)
