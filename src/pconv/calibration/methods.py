"""Calibration methods: a registry of them, each described by what it needs and does.

A method takes (the quantized model, its QCFS modules by site, the calibration images, the memory budget in
bytes, a Progress, and by keyword the configuration fields it names in `options`), sets the modules' parameters (and may change the model's layers), shows its own progress
stages and returns notes for the provenance. `resolve` lets a method stand for others at some T (`auto`),
`check` validates the options it reads from the configuration. Each method module registers itself with
`calibration_method`; importing `pconv.calibration` registers them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from torch import nn

from ..config import AUTO_FIT_MAX_T
from ..data.batches import ImageBatches
from ..nn.qcfs import QCFS
from ..observe.thresholds import ThresholdSpec
from ..utils.progress import Progress
from ..utils.registry import Registry

if TYPE_CHECKING:
    from .config import CalibrationConfig

RunFn = Callable[[nn.Module, Mapping[str, QCFS], ImageBatches, int, Progress], "dict[str, Any] | None"]


@dataclass(frozen=True)
class Method:
    name: str
    run: RunFn
    summary: str
    #: (threshold, method) actually run at T; None: the method itself with the configured threshold
    resolve: Callable[["CalibrationConfig", int], tuple[ThresholdSpec, str]] | None = None
    #: raises ConfigError for options of the configuration this method cannot take
    check: Callable[["CalibrationConfig"], None] | None = None
    #: CalibrationConfig fields the method reads, passed to `run` by keyword
    options: tuple[str, ...] = ()


CALIBRATIONS: Registry[Method] = Registry("calibration method")


def calibration_method(name: str, resolve=None, check=None, options: tuple[str, ...] = ()) -> Callable[[RunFn], RunFn]:
    """Register the decorated function as the calibration method `name` (its docstring's first line is its
    summary in --help)."""
    def add(run: RunFn) -> RunFn:
        summary = (run.__doc__ or "").strip().splitlines()[0] if run.__doc__ else ""
        CALIBRATIONS.register(name)(Method(name, run, summary, resolve, check, tuple(options)))
        return run
    return add


@calibration_method("none")
def no_calibration(model: nn.Module, modules: Mapping[str, QCFS], batches: ImageBatches, budget: int,
                   progress: Progress) -> None:
    """Plain QCFS: thresholds only, no shifts."""


def _auto_plan(config: "CalibrationConfig", time_steps: int) -> tuple[ThresholdSpec, str]:
    if time_steps <= AUTO_FIT_MAX_T:
        return config.threshold, "fit"
    return ThresholdSpec.parse("mse"), "none"


@calibration_method("auto", resolve=_auto_plan)
def automatic(model: nn.Module, modules: Mapping[str, QCFS], batches: ImageBatches, budget: int,
              progress: Progress) -> dict:
    """pconv's default: fit at T <= 32, the mse threshold without shifts above."""
    from .fit import fit_sites

    return fit_sites(model, modules, batches, budget, progress)
