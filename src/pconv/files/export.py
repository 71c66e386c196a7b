"""Save and load SNNs and calibrations as self-describing safetensors files (spec: docs/format.md).

Every metadata entry goes through `format.FileMetadata`, which validates what it reads. Loading an SNN
builds the architecture the file names (a timm model, pconv's own, or, with `trust_factory=True`, the user's
factory) and the network from the file alone.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..calibration.config import CalibrationConfig
from ..calibration.state import Calibration, SiteParams
from ..errors import ConfigError, FormatError, PconvError
from ..models.checkpoints import add_missing_biases, load_weights
from ..models.source import ModelKind, ModelSource
from ..nn.network import ConversionInfo, SpikingNetwork, spiking_network
from ..nn.neurons import NEURONS
from ..observe.sites import is_site_state, module_path
from .atomic import atomic_write
from .format import (ANN_PREFIX, CALIBRATION_TENSORS, NEURON_TENSORS, REFIT_PREFIX, FileMetadata, check_tensor_shapes,
                     read_metadata)


def _portable(t: Tensor) -> Tensor:
    # safetensors wants contiguous CPU tensors that share no memory.
    return t.detach().to("cpu").contiguous().clone()


def _require_source(source: ModelSource | None) -> ModelSource:
    if source is None:
        raise PconvError("the SNN does not say how to rebuild its architecture",
                         "build the model with pconv.create_model, or pass source=ModelSource(...)")
    if source.kind is ModelKind.FACTORY:
        module = source.name.partition(":")[0]
        if module == "__main__" or "<locals>" in source.name:
            raise PconvError(f"factory {source.name!r} cannot be imported by another process",
                             "define the factory in an importable module")
    return source


def snn_metadata(info: ConversionInfo) -> FileMetadata:
    return FileMetadata(
        kind="snn", time_steps=(info.time_steps,), sites=tuple(info.sites), threshold=info.threshold,
        method=info.method, model=info.source, data_config=dict(info.data_config),
        provenance=dict(info.provenance), encoding_levels=info.encoding_levels,
        populated={info.time_steps: dict(info.populated)} if info.populated else {},
        overflow=tuple(info.overflow), neuron=info.neuron,
        num_classes=info.num_classes, config=CalibrationConfig.from_dict(info.config) if info.config else None)


def save(snn: SpikingNetwork, path: str | Path, force: bool = False) -> Path:
    """Write `snn` to one safetensors file (atomically). Refuses to overwrite without `force`."""
    info = snn.info
    _require_source(info.source)
    paths = {module_path(s) for s in info.sites}
    tensors: dict[str, Tensor] = {}
    for key, value in snn.net.state_dict().items():
        if not is_site_state(key, paths):  # the neurons' own vectors are stored by site, below
            tensors[f"weights.{key}"] = _portable(value)
    for name, neuron in snn.neurons().items():
        for leaf in NEURON_TENSORS:
            tensors[f"neurons.{name}.{leaf}"] = _portable(getattr(neuron, leaf))
    for key, value in snn.ann_weights.items():  # the ANN's own values of refitted entries
        if value is not None:
            tensors[f"{ANN_PREFIX}{key}"] = _portable(value)
    metadata = snn_metadata(info).to_metadata()
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), force)


def _load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"cannot read tensors of {str(path)!r}: {e}", "the file is corrupt or truncated") from None


def load(path: str | Path, device: str | torch.device = "cpu", trust_factory: bool = False) -> SpikingNetwork:
    """Rebuild a saved SNN offline; its outputs equal the saved network's exactly.

    The file names its architecture. A timm model or one of pconv's own is built as named; a factory of the
    user's only with `trust_factory=True` (it runs that code), else UntrustedFactoryError."""
    path = Path(path)
    meta, header = read_metadata(path)
    if meta.kind != "snn":
        raise FormatError(f"{str(path)!r} is a {meta.kind} file, not an SNN",
                          "convert it first: pconv convert MODEL --calib FILE -T 8 -o snn.safetensors")
    if meta.neuron not in NEURONS:
        raise FormatError(f"{str(path)!r} names the neuron {meta.neuron!r}, which this pconv does not know",
                          f"known neurons: {', '.join(NEURONS.names())}; upgrade pconv")
    check_tensor_shapes(header, meta.sites, "neurons.", NEURON_TENSORS)
    if meta.model is None:
        raise FormatError(f"{str(path)!r} does not say how to rebuild its architecture", "the file is corrupt")
    model = meta.model.build(trust_factory=trust_factory)  # refuses an untrusted factory before reading tensors
    tensors = _load_tensors(path)
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    pristine = set(model.state_dict())
    add_missing_biases(model, weights)
    load_weights(model, weights, f"the weights in {str(path)!r}")
    model.pconv_source = meta.model
    model.to(device).eval()
    (T,) = meta.time_steps
    info = ConversionInfo(
        time_steps=T, neuron=meta.neuron, sites=list(meta.sites), threshold=meta.threshold,
        method=meta.method, source=meta.model, data_config=dict(meta.data_config),
        provenance=dict(meta.provenance), encoding_levels=meta.encoding_levels,
        populated=dict(meta.populated.get(T, {})), overflow=list(meta.overflow), num_classes=meta.num_classes,
        config=meta.config.to_dict() if meta.config else None)
    params = {s.name: tuple(tensors[f"neurons.{s.name}.{leaf}"] for leaf in NEURON_TENSORS) for s in meta.sites}
    snn = spiking_network(model, info, params)
    snn.ann_weights = {key: None for key in weights if key not in pristine}  # entries a refit added
    snn.ann_weights.update({k[len(ANN_PREFIX):]: v.to(device) for k, v in tensors.items() if k.startswith(ANN_PREFIX)})
    return snn.eval()


def calibration_metadata(calibration: Calibration) -> FileMetadata:
    return FileMetadata(
        kind="calibration", time_steps=tuple(calibration.time_steps), sites=tuple(calibration.sites),
        threshold=calibration.threshold, method=calibration.method, model=calibration.source,
        data_config=dict(calibration.data_config), provenance=dict(calibration.provenance),
        encoding_levels=calibration.encoding_levels,
        populated={T: dict(sizes) for T, sizes in calibration.populated.items() if sizes},
        overflow=tuple(calibration.overflow), config=calibration.config)


def save_calibration(calibration: Calibration, path: str | Path, force: bool = False) -> Path:
    """Write thresholds and DA shifts for every T, plus channel maxima, atomically."""
    tensors: dict[str, Tensor] = {}
    for T, params in calibration.params.items():
        for name, p in params.items():
            for leaf in CALIBRATION_TENSORS:
                tensors[f"T{T}.{name}.{leaf}"] = _portable(getattr(p, leaf))
    for T, state in calibration.weights.items():
        for key, value in state.items():
            tensors[f"{REFIT_PREFIX}T{T}.{key}"] = _portable(value)
    for name, value in calibration.channel_max.items():
        tensors[f"stats.{name}.max"] = _portable(value)
    metadata = calibration_metadata(calibration).to_metadata()
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), force)


def load_calibration(path: str | Path) -> Calibration:
    path = Path(path)
    meta, header = read_metadata(path)
    if meta.kind != "calibration":
        raise FormatError(f"{str(path)!r} is an {meta.kind} file, not a calibration",
                          "pass a file written by `pconv calibrate`")
    for T in meta.time_steps:
        check_tensor_shapes(header, meta.sites, f"T{T}.", CALIBRATION_TENSORS)
    tensors = _load_tensors(path)
    params = {T: {s.name: SiteParams(*(tensors[f"T{T}.{s.name}.{leaf}"] for leaf in CALIBRATION_TENSORS))
                  for s in meta.sites} for T in meta.time_steps}
    weights: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(REFIT_PREFIX):
            step, _, state_key = key[len(REFIT_PREFIX):].partition(".")
            if not step.startswith("T") or not step[1:].isdigit() or int(step[1:]) not in params or not state_key:
                raise FormatError(f"tensor {key!r} names no calibrated T", "the file is corrupt")
            weights.setdefault(int(step[1:]), {})[state_key] = value
    channel_max = {s.name: tensors[f"stats.{s.name}.max"] for s in meta.sites if f"stats.{s.name}.max" in tensors}
    return Calibration(sites=list(meta.sites), config=_config_of(meta, path), params=params, channel_max=channel_max,
                       source=meta.model, data_config=dict(meta.data_config), provenance=dict(meta.provenance),
                       weights=weights, populated={T: dict(sizes) for T, sizes in meta.populated.items()},
                       overflow=list(meta.overflow))


def _config_of(meta: FileMetadata, path: Path) -> CalibrationConfig:
    """The file's configuration; files of pconv before it recorded one give theirs entry by entry."""
    if meta.config is not None:
        if meta.config.time_steps != meta.time_steps:
            raise FormatError(f"{str(path)!r}: the config's T ({list(meta.config.time_steps)}) are not the file's "
                              f"({list(meta.time_steps)})", "the file is corrupt")
        return meta.config
    if meta.overflow:  # overflow neurons came after the config entry: pconv never wrote such a file
        raise FormatError(f"{str(path)!r} names overflow sites but records no config", "the file is corrupt")
    try:
        return CalibrationConfig(time_steps=meta.time_steps, threshold=meta.threshold, method=meta.method,
                                 encoding_levels=meta.encoding_levels,
                                 population_budget=float(meta.provenance.get("population_budget", 0.0)),
                                 overflow_sites=0.0)  # written before overflow neurons
    except (ConfigError, TypeError, ValueError) as e:
        raise FormatError(f"{str(path)!r}: its threshold, method or population budget cannot be read ({e})",
                          "the file is corrupt, or made by a newer pconv") from None
