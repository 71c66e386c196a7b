"""pconv: training-free parallel ANN-to-SNN conversion of timm classifiers."""

from .errors import (ConfigError, DataError, FormatError, ModelLoadError, OutputExistsError, PconvError,
                     UnsupportedModelError)
from .export import load, load_calibration, save, save_calibration
from .format import read_header, read_metadata
from .models import ModelSource, create_model
from .neurons import NEURONS, ParallelIF, SerialIF
from .pipeline import Calibration, calibrate, convert
from .calibrate import CALIBRATIONS
from .quantize import QCFS
from .sites import Site, find_sites
from .snn import SpikingNetwork
from .thresholds import THRESHOLDS, ThresholdSpec
from .version import __version__

__all__ = [
    "CALIBRATIONS", "NEURONS", "THRESHOLDS", "QCFS", "Calibration", "ConfigError", "DataError", "FormatError",
    "ModelLoadError", "ModelSource", "OutputExistsError", "ParallelIF", "PconvError", "SerialIF", "Site",
    "SpikingNetwork", "ThresholdSpec", "UnsupportedModelError", "__version__", "calibrate", "convert",
    "create_model", "find_sites", "load", "load_calibration", "read_header", "read_metadata", "save", "save_calibration",
]
