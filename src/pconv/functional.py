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


def neuron_params(theta: Tensor, delta_in: Tensor, delta_out: Tensor, time_steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """(theta_in, bias, theta_out) of a neuron from the QCFS threshold and DA shifts.

    bias = phi*theta + T*delta_in carries the calibrated input shift inside the floor;
    theta_out = theta + delta_out is the calibrated output amplitude.
    """
    theta_in = theta
    bias = theta * PHI + time_steps * delta_in
    theta_out = theta + delta_out
    return theta_in, bias, theta_out


def spike_count(x_mean: Tensor, theta_in: Tensor, bias: Tensor, time_steps: int, channel_dim: int = 1) -> Tensor:
    """k = clamp(floor((T*mean(x) + b) / theta_in), 0, T): how many of the T steps spike.

    Evaluated as floor(mean(x) * (T/theta_in) + b/theta_in): one multiply-add per element, with the
    per-channel factors computed once. QCFS and every neuron call this one function, so they agree
    bit for bit whatever the rounding of this form.
    """
    scale = per_channel(time_steps / theta_in, x_mean, channel_dim)
    offset = per_channel(bias / theta_in, x_mean, channel_dim)
    return torch.addcmul(offset, x_mean, scale).floor_().clamp_(0, time_steps)


def count_output(k: Tensor, theta_out: Tensor, time_steps: int, channel_dim: int = 1, inplace: bool = False) -> Tensor:
    """Time-mean output of a neuron that spiked k times with amplitude theta_out: k * (theta_out/T)."""
    amplitude = per_channel(theta_out / time_steps, k, channel_dim)
    return k.mul_(amplitude) if inplace else k * amplitude


def qcfs(x: Tensor, theta: Tensor, delta_in: Tensor, delta_out: Tensor, levels: int, channel_dim: int = 1) -> Tensor:
    """DA-QCFS: (theta+delta_out)/L * clamp(floor(L*(x+delta_in)/theta + phi), 0, L), per channel."""
    theta_in, bias, theta_out = neuron_params(theta, delta_in, delta_out, levels)
    k = spike_count(x, theta_in, bias, levels, channel_dim)
    return count_output(k, theta_out, levels, channel_dim, inplace=True)
