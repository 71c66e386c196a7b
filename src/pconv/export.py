"""Save and load SNNs and calibrations as self-describing safetensors files (spec: docs/format.md)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import FormatError, PconvError
from .fileio import atomic_write
from .format import (CALIBRATION_TENSORS, FORMAT_NAME, FORMAT_VERSION, NEURON_TENSORS, REFIT_PREFIX, ANN_PREFIX,
                     Header,
                     read_header)
from .models import ModelSource, add_missing_biases, load_weights
from .neurons import NEURONS
from .pipeline import Calibration, SiteParams, build_snn
from .sites import Site
from .snn import ConversionInfo, SpikingNetwork, info_to_json
from .version import __version__


def _base_metadata(kind: str) -> dict[str, str]:
    return {
        "pconv.format": FORMAT_NAME,
        "pconv.format_version": str(FORMAT_VERSION),
        "pconv.kind": kind,
        "pconv.version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _portable(t: Tensor) -> Tensor:
    # safetensors wants contiguous CPU tensors that share no memory.
    return t.detach().to("cpu").contiguous().clone()


def _require_source(source: ModelSource | None) -> ModelSource:
    if source is None:
        raise PconvError("the SNN does not say how to rebuild its architecture",
                         "build the model with pconv.create_model, or pass source=ModelSource(...)")
    if source.kind == "factory":
        module = source.name.partition(":")[0]
        if module == "__main__" or "<locals>" in source.name:
            raise PconvError(f"factory {source.name!r} cannot be imported by another process",
                             "define the factory in an importable module")
    return source


def save(snn: SpikingNetwork, path: str | Path, force: bool = False) -> Path:
    """Write `snn` to one safetensors file (atomically). Refuses to overwrite without `force`."""
    info = snn.info
    _require_source(info.source)
    site_names = {s.name for s in info.sites}
    tensors: dict[str, Tensor] = {}
    for key, value in snn.net.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in site_names:
            continue
        tensors[f"weights.{key}"] = _portable(value)
    for name, neuron in snn.neurons().items():
        for leaf in NEURON_TENSORS:
            tensors[f"neurons.{name}.{leaf}"] = _portable(getattr(neuron, leaf))
    for key, value in snn.ann_weights.items():  # the ANN's own values of refitted entries
        if value is not None:
            tensors[f"{ANN_PREFIX}{key}"] = _portable(value)
    metadata = {**_base_metadata("snn"), **info_to_json(info)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), force)


def _load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"cannot read tensors of {str(path)!r}: {e}", "the file is corrupt or truncated") from None


def _sites(header: Header) -> list[Site]:
    try:
        return [Site.from_dict(d) for d in header.json("sites")]
    except TypeError:
        raise FormatError("the site list in the metadata is malformed", "the file is corrupt") from None


def encoding_levels_of(header: Header) -> int:
    """Absent before format version 3: one neuron per channel everywhere."""
    value = header.metadata.get("encoding_levels", "0")
    if not value.isdigit():
        raise FormatError(f"encoding_levels {value!r} in the metadata is not a count", "the file is corrupt")
    return int(value)


def populated_of(header: Header, sites: list[Site], steps: list[int]) -> dict[int, list[str]]:
    """The hidden population-coded sites per T (absent before format version 4: none).

    An SNN file stores a list (its one T), a calibration file {T: list}."""
    raw = header.metadata.get("populated")
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise FormatError("the 'populated' metadata entry is not JSON", "the file is corrupt") from None
    if isinstance(value, list) and len(steps) == 1:
        value = {str(steps[0]): value}
    names = {s.name for s in sites}
    if not isinstance(value, dict) or any(not isinstance(v, list) for v in value.values()):
        raise FormatError("the 'populated' metadata entry is malformed", "the file is corrupt")
    out: dict[int, list[str]] = {}
    for step, listed in value.items():
        if not step.isdigit() or int(step) not in steps or not all(isinstance(n, str) and n in names for n in listed):
            raise FormatError(f"the 'populated' metadata names a T or site the file does not have ({step!r})",
                              "the file is corrupt")
        if listed:
            out[int(step)] = list(listed)
    return out


def _check_shapes(tensors: dict[str, Tensor], sites: list[Site], prefix: str, leaves: tuple[str, ...]) -> None:
    for site in sites:
        for leaf in leaves:
            key = f"{prefix}{site.name}.{leaf}"
            if key not in tensors:
                raise FormatError(f"tensor {key!r} is missing", "the file's tensors do not match its metadata")
            if tuple(tensors[key].shape) != (site.channels,):
                raise FormatError(f"tensor {key!r} has shape {tuple(tensors[key].shape)}, the metadata says "
                                  f"({site.channels},)", "the file's tensors do not match its metadata")


def load(path: str | Path, device: str | torch.device = "cpu") -> SpikingNetwork:
    """Rebuild a saved SNN offline; its outputs equal the saved network's exactly."""
    path = Path(path)
    header = read_header(path)
    if header.kind != "snn":
        raise FormatError(f"{str(path)!r} is a {header.kind} file, not an SNN",
                          "convert it first: pconv convert MODEL --calib FILE -T 8 -o snn.safetensors")
    meta = header.metadata
    sites = _sites(header)
    source = ModelSource.from_json(meta["model"])
    neuron = meta["neuron"]
    NEURONS.get(neuron)
    tensors = _load_tensors(path)
    _check_shapes(tensors, sites, "neurons.", NEURON_TENSORS)
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    model = source.build().eval()
    pristine = set(model.state_dict())
    add_missing_biases(model, weights)
    load_weights(model, weights, f"the weights in {str(path)!r}")
    model.pconv_source = source
    model.to(device)
    T = int(meta["time_steps"])
    # The file stores neuron parameters; pass them through a calibration whose shifts reproduce them.
    calibration = Calibration(sites, meta["threshold"], meta["calibration"], {T: {}}, {}, source,
                              header.json("data_config"), header.json("provenance"),
                              encoding_levels=encoding_levels_of(header), populated=populated_of(header, sites, [T]))
    for site in sites:
        calibration.params[T][site.name] = SiteParams(*(torch.zeros(site.channels),) * 3)
    snn = build_snn(model, calibration, T, neuron)
    for name, module in snn.neurons().items():
        for leaf in NEURON_TENSORS:
            getattr(module, leaf).copy_(tensors[f"neurons.{name}.{leaf}"])
    snn.ann_weights = {key: None for key in weights if key not in pristine}  # entries a refit added
    snn.ann_weights.update({k[len(ANN_PREFIX):]: v.to(device) for k, v in tensors.items() if k.startswith(ANN_PREFIX)})
    return snn


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
    metadata = {
        **_base_metadata("calibration"),
        "time_steps": json.dumps(calibration.time_steps),
        "threshold": calibration.threshold,
        "calibration": calibration.method,
        "sites": json.dumps([s.to_dict() for s in calibration.sites]),
        "model": calibration.source.to_json() if calibration.source else "",
        "data_config": json.dumps(calibration.data_config, sort_keys=True),
        "provenance": json.dumps(calibration.provenance, sort_keys=True),
        "encoding_levels": str(calibration.encoding_levels),
        "populated": json.dumps({str(T): names for T, names in sorted(calibration.populated.items())}),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), force)


def load_calibration(path: str | Path) -> Calibration:
    path = Path(path)
    header = read_header(path)
    if header.kind != "calibration":
        raise FormatError(f"{str(path)!r} is an {header.kind} file, not a calibration",
                          "pass a file written by `pconv calibrate`")
    sites = _sites(header)
    tensors = _load_tensors(path)
    params: dict[int, dict[str, SiteParams]] = {}
    for T in header.json("time_steps"):
        _check_shapes(tensors, sites, f"T{T}.", CALIBRATION_TENSORS)
        params[int(T)] = {s.name: SiteParams(*(tensors[f"T{T}.{s.name}.{leaf}"] for leaf in CALIBRATION_TENSORS))
                          for s in sites}
    weights: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(REFIT_PREFIX):
            step, _, state_key = key[len(REFIT_PREFIX):].partition(".")
            if not step.startswith("T") or not step[1:].isdigit() or int(step[1:]) not in params or not state_key:
                raise FormatError(f"tensor {key!r} names no calibrated T", "the file is corrupt")
            weights.setdefault(int(step[1:]), {})[state_key] = value
    meta = header.metadata
    source = ModelSource.from_json(meta["model"]) if meta.get("model") else None
    channel_max = {s.name: tensors[f"stats.{s.name}.max"] for s in sites if f"stats.{s.name}.max" in tensors}
    return Calibration(sites, meta["threshold"], meta["calibration"], params, channel_max, source,
                       header.json("data_config"), header.json("provenance"), weights, encoding_levels_of(header),
                       populated_of(header, sites, sorted(params)))
