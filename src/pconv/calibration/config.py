"""One frozen, validated object for every choice of a calibration, and the plan it resolves to at each T.

The defaults come from pconv.config. A CalibrationConfig travels in the Calibration, in calibration files
and in SNN files (`to_dict`), so a file says exactly what was chosen and what ran at each T.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import (DEFAULT_BINS, DEFAULT_ENCODING_LEVELS, DEFAULT_METHOD, DEFAULT_POPULATION_BUDGET,
                      DEFAULT_RECON_DROP, DEFAULT_RECON_STEPS, DEFAULT_THRESHOLD, check_bins,
                      check_encoding_levels, check_overflow_sites, check_population_budget, check_recon_drop,
                      check_recon_steps, check_time_step_list, default_overflow_sites)
from ..errors import ConfigError
from ..observe.thresholds import ThresholdSpec
from .methods import CALIBRATIONS


@dataclass(frozen=True)
class Step:
    """What runs at one T: the threshold method and the calibration method (they differ from the configured
    ones where a method such as `auto` resolves per T)."""

    threshold: ThresholdSpec
    method: str

    def __str__(self) -> str:
        return f"{self.threshold}/{self.method}"


@dataclass(frozen=True)
class CalibrationConfig:
    """The choices that decide a calibration's result (how much memory it may use does not)."""

    VERSION: ClassVar[int] = 1

    time_steps: tuple[int, ...] = (8,)
    threshold: ThresholdSpec = field(default_factory=lambda: ThresholdSpec.parse(DEFAULT_THRESHOLD))
    method: str = DEFAULT_METHOD
    encoding_levels: int = DEFAULT_ENCODING_LEVELS
    population_budget: float = DEFAULT_POPULATION_BUDGET
    #: the last fraction of the sites that get an overflow neuron; None: config.default_overflow_sites
    overflow_sites: float | None = None
    bins: int = DEFAULT_BINS
    #: Adam steps per block of `recon` (read by the methods that name it in their options only)
    recon_steps: int = DEFAULT_RECON_STEPS
    #: QDrop's probability in `recon` (likewise)
    recon_drop: float = DEFAULT_RECON_DROP

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "time_steps", tuple(check_time_step_list(self.time_steps)))
        set_(self, "threshold", ThresholdSpec.parse(self.threshold))
        method = CALIBRATIONS.get(self.method)  # raises with the valid names
        set_(self, "encoding_levels", check_encoding_levels(self.encoding_levels))
        set_(self, "population_budget", check_population_budget(self.population_budget))
        overflow = self.overflow_sites
        set_(self, "overflow_sites", default_overflow_sites(self.encoding_levels, self.population_budget)
             if overflow is None else check_overflow_sites(overflow))
        set_(self, "bins", check_bins(self.bins))
        set_(self, "recon_steps", check_recon_steps(self.recon_steps))
        if self.recon_steps != DEFAULT_RECON_STEPS and not self.reads("recon_steps"):
            raise ConfigError(f"recon steps are an option of the recon method, not of {self.method}",
                              "drop --recon-steps, or pass --calibration recon")
        set_(self, "recon_drop", check_recon_drop(self.recon_drop))
        if self.recon_drop != DEFAULT_RECON_DROP and not self.reads("recon_drop"):
            raise ConfigError(f"the recon drop probability is an option of the recon method, not of {self.method}",
                              "drop --recon-drop, or pass --calibration recon")
        if method.check:
            method.check(self)

    def reads(self, option: str) -> bool:
        """Whether a method that runs at some T of the plan reads this option of the configuration."""
        return any(option in CALIBRATIONS.get(step.method).options for step in self.plan.values())

    def method_options(self, method: str) -> dict[str, Any]:
        """The configured values of the options `method` reads (passed to its run function by keyword)."""
        return {name: getattr(self, name) for name in CALIBRATIONS.get(method).options}

    def overflow(self, sites: list) -> list[str]:
        """The names of the sites that get an overflow neuron: the last `overflow_sites` of them (at least one
        when it is above 0), in network order. The last sites, because unseen images overshoot the calibration's
        range most deep in the network, where every earlier site's rounding has added up (docs/accuracy.md)."""
        if self.overflow_sites <= 0 or not sites:
            return []
        count = min(len(sites), max(1, math.ceil(self.overflow_sites * len(sites) - 1e-9)))
        return [s.name for s in sites[len(sites) - count:]]

    def step(self, time_steps: int) -> Step:
        """The threshold and method that run at T."""
        resolve = CALIBRATIONS.get(self.method).resolve
        threshold, method = resolve(self, time_steps) if resolve else (self.threshold, self.method)
        return Step(threshold, method)

    @property
    def plan(self) -> dict[int, Step]:
        return {T: self.step(T) for T in self.time_steps}

    @property
    def needs_histogram(self) -> bool:
        return any(step.threshold.needs_histogram for step in self.plan.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION, "time_steps": list(self.time_steps), "threshold": str(self.threshold),
            "method": self.method, "encoding_levels": self.encoding_levels,
            "population_budget": self.population_budget, "overflow_sites": self.overflow_sites, "bins": self.bins,
            "recon_steps": self.recon_steps,
            "recon_drop": self.recon_drop,
            "plan": {str(T): str(step) for T, step in self.plan.items()},
        }

    @classmethod
    def from_dict(cls, d: Any, provenance: dict[str, Any] | None = None) -> "CalibrationConfig":
        """Read a config a file holds (ConfigError naming what is wrong); `plan` is derived, not read.

        A config without `recon_drop` was written before it was an option: what `recon` dropped then is what
        the file's `provenance` records (since QDrop, 2026-12-02), else nothing. One without `overflow_sites` was
        written before overflow neurons (format version 7): it had none."""
        keys = {"version", "time_steps", "threshold", "method", "encoding_levels", "population_budget",
                "overflow_sites", "bins", "recon_steps", "recon_drop", "plan"}
        if not isinstance(d, dict) or not {"time_steps", "threshold", "method"} <= set(d) <= keys:
            raise ConfigError("the calibration config is malformed", "expected the keys of CalibrationConfig")
        if d.get("version", cls.VERSION) != cls.VERSION:
            raise ConfigError(f"calibration config version {d.get('version')!r} is not {cls.VERSION}",
                              "upgrade pconv")
        if not isinstance(d["threshold"], str):
            raise ConfigError("the calibration config's threshold is not text", "for example \"max\"")
        fields = {k: d[k] for k in ("encoding_levels", "population_budget", "bins", "recon_steps", "recon_drop")
                  if k in d}
        fields["overflow_sites"] = d.get("overflow_sites", 0.0)
        config = cls(time_steps=tuple(d["time_steps"]) if isinstance(d["time_steps"], list) else d["time_steps"],
                     threshold=d["threshold"], method=d["method"], **fields)
        if "recon_drop" not in d and config.reads("recon_drop"):
            config = dataclasses.replace(config, recon_drop=(provenance or {}).get("recon_drop", 0.0))
        return config
