"""What a calibration produces: per-T, per-site parameters (and the layers a method changed), with the
configuration that made them and where they came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..models.source import ModelSource
from ..nn.population import populations
from ..observe.sites import Site, is_site_state, module_path
from .config import CalibrationConfig, Step


@dataclass
class SiteParams:
    theta: Tensor
    delta_in: Tensor
    delta_out: Tensor


@dataclass
class Calibration:
    """Thresholds and shifts for every site, for one or more T: `convert` needs no data given this."""

    sites: list[Site]
    config: CalibrationConfig
    params: dict[int, dict[str, SiteParams]]
    channel_max: dict[str, Tensor] = field(default_factory=dict)
    source: ModelSource | None = None
    data_config: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    #: per T, the state-dict entries a method replaced or added (layer refits): {T: {key: tensor}}
    weights: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    #: per T, the hidden sites also population-coded and their neurons per channel (chosen by sensitivity
    #: under a neuron budget): {T: {site: m}}
    populated: dict[int, dict[str, int]] = field(default_factory=dict)
    #: the sites with an overflow neuron per channel, at every T (CalibrationConfig.overflow)
    overflow: list[str] = field(default_factory=list)

    @property
    def time_steps(self) -> list[int]:
        return sorted(self.params)

    @property
    def threshold(self) -> str:
        return str(self.config.threshold)

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def encoding_levels(self) -> int:
        return self.config.encoding_levels

    def step(self, time_steps: int) -> Step:
        """The threshold and method that ran at T."""
        return self.config.step(time_steps)

    def populations(self, time_steps: int) -> dict[str, int]:
        """Neurons per channel of every site at T."""
        return populations(self.sites, time_steps, self.encoding_levels, self.populated.get(time_steps))


def changed_weights(original: nn.Module, calibrated: nn.Module, sites: list[Site]) -> dict[str, Tensor]:
    """State-dict entries of `calibrated` (its sites left out) that `original` lacks or holds other values for."""
    before = original.state_dict()
    paths = {module_path(s) for s in sites}
    changed = {}
    for key, value in calibrated.state_dict().items():
        if is_site_state(key, paths):
            continue
        if key not in before or not torch.equal(before[key], value):
            changed[key] = value.detach().cpu().clone()
    return changed
