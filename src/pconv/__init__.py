"""pconv: training-free parallel ANN-to-SNN conversion of timm classifiers.

Where things live: observe/ (activation sites, recording, thresholds), calibration/ (the configuration, the
methods, population choice), nn/ (QCFS, the neurons, the spiking network), files/ (the format, save and
load), data/ (image folders, labels, data configs), models/ (architectures, weights, trust), measure/
(evaluation, costs, timing, benchmark), cli/ (one module per command); pipeline runs the stages in order.
"""

from .calibration import CALIBRATIONS, Calibration, CalibrationConfig
from .errors import (ConfigError, DataError, FormatError, ModelLoadError, OutputExistsError, PconvError,
                     UnsupportedModelError)
from .files.export import load, load_calibration, save, save_calibration
from .files.format import read_header, read_metadata
from .models.source import ModelSource, UntrustedFactoryError, create_model
from .nn.network import SpikingNetwork
from .nn.neurons import NEURONS, Engine, ParallelIF, SerialIF
from .nn.qcfs import QCFS
from .observe.sites import Site, find_sites
from .observe.thresholds import THRESHOLDS, ThresholdSpec
from .pipeline import calibrate, convert
from .version import __version__

__all__ = [
    "CALIBRATIONS", "NEURONS", "THRESHOLDS", "QCFS", "Calibration", "CalibrationConfig", "ConfigError", "DataError",
    "Engine", "FormatError", "ModelLoadError", "ModelSource", "OutputExistsError", "ParallelIF", "PconvError",
    "SerialIF", "Site", "SpikingNetwork", "ThresholdSpec", "UnsupportedModelError", "UntrustedFactoryError",
    "__version__", "calibrate", "convert", "create_model", "find_sites", "load", "load_calibration", "read_header",
    "read_metadata", "save", "save_calibration",
]
