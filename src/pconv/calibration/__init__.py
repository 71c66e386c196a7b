"""Calibrating a QCFS network: the configuration and its per-T plan (config), the result (state), the
registered methods (methods: `none`, `auto`; da; fit; refit; recon) and what they share (paired, sampling), and
which hidden sites get a population of neurons (population)."""

from . import da, fit, recon, refit  # noqa: F401  (each registers its method)
from .config import CalibrationConfig, Step
from .methods import CALIBRATIONS, Method
from .state import Calibration, SiteParams, changed_weights

__all__ = ["CALIBRATIONS", "Calibration", "CalibrationConfig", "Method", "SiteParams", "Step", "changed_weights"]
