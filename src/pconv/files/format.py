"""The pconv file format (see docs/format.md): one safetensors file, str->str metadata, flat tensor names.

kind "snn":         weights.<state-dict key>, neurons.<site>.{theta_in,bias,theta_out},
                    ann.<state-dict key> (the ANN's values of entries a layer refit replaced; version 2)
kind "calibration": T<t>.<site>.{theta,delta_in,delta_out}, stats.<site>.max,
                    refit.T<t>.<state-dict key> (layers a method refitted at that T; version 2)
Version 3 adds the metadata entry "encoding_levels" and the "encoding" flag of each site: encoding sites
have ceil(encoding_levels/T) neurons per channel, so a version-2 reader would build the wrong network.
Version 4 adds the metadata entry "populated": the hidden sites population-coded like the encoding sites
(a list in an SNN file, {T: list} in a calibration file); a version-3 reader would ignore it.
Version 5 gives each of them its own neurons per channel: "populated" is {site: m} in an SNN file and
{T: {site: m}} in a calibration file; a version-4 list means m = ceil(encoding_levels/T) for every site in it.
Version 6 lets "populated" name the encoding sites too (1 to ceil(encoding_levels/T) neurons per channel, chosen
under the budget); an encoding site it does not name has ceil(encoding_levels/T), as in every earlier version.
A version-5 reader would give a named encoding site the wrong size.
Version 7 adds the metadata entry "overflow": the sites with an overflow neuron per channel (a list, the same at
every T); a version-6 reader would build them without it. Absent: none.

`FileMetadata` is the one description of both kinds: `to_metadata()` writes it, `from_metadata()` reads and
validates every value (a wrong one is a FormatError naming the field), `read_metadata(path)` reads it
without loading tensors. save, load and inspect all go through it.
"""

from __future__ import annotations

import json
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..calibration.config import CalibrationConfig
from ..config import MAX_TIME_STEPS
from ..data.config import check_data_config
from ..errors import ConfigError, FormatError, ModelLoadError
from ..models.source import ModelSource
from ..nn.population import population_size
from ..observe.sites import ACTIVATIONS, Site
from ..version import __version__

FORMAT_NAME = "pconv"
FORMAT_VERSION = 7
#: Versions this pconv reads: version 1 is version 2 without refitted layers; version 2 is version 3
#: with one neuron per channel everywhere (encoding_levels 0); version 3 is version 4 with no hidden site
#: population-coded; version 4 is version 5 with the encoding sites' population size at every populated site;
#: version 5 is version 6 with no encoding site in "populated"; version 6 is version 7 without overflow neurons.
READABLE_VERSIONS = ("1", "2", "3", "4", "5", "6", "7")
REFIT_PREFIX = "refit."
ANN_PREFIX = "ann."
KINDS = ("snn", "calibration")
NEURON_TENSORS = ("theta_in", "bias", "theta_out")
CALIBRATION_TENSORS = ("theta", "delta_in", "delta_out")
#: A safetensors header larger than this is not one pconv wrote.
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_STEPS = MAX_TIME_STEPS
#: A method or neuron name as pconv writes them (`max`, `percentile:99.99`, `refit`): informative text only.
_NAME = re.compile(r"^[A-Za-z0-9_.:+-]{1,64}$")
_SITE_KEYS = {"name", "activation", "channels", "ndim", "cap", "encoding"}


@dataclass(frozen=True)
class Header:
    """The raw safetensors header of a pconv file, read without loading tensors."""

    metadata: dict[str, str]
    tensors: dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data_offsets"}
    file_size: int

    @property
    def kind(self) -> str:
        return self.metadata["pconv.kind"]


def read_header(path: str | Path) -> Header:
    """Parse the safetensors header of a pconv file; checks size, format name, version and kind."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{str(path)!r} does not exist", "check the path")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise FormatError(f"{str(path)!r} is too short to be a safetensors file", "the file is truncated")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise FormatError(f"{str(path)!r} has a header of {n} bytes in a {size}-byte file",
                              "the file is truncated or not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FormatError(f"{str(path)!r} has an unreadable header", "the file is corrupt") from None
    if not isinstance(header, dict):
        raise FormatError(f"{str(path)!r} has an unreadable header", "the file is corrupt")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{str(path)!r} has metadata that is not a map of strings", "the file is corrupt")
    if metadata.get("pconv.format") != FORMAT_NAME:
        raise FormatError(f"{str(path)!r} is a safetensors file but not a pconv file",
                          "pass a file written by `pconv convert` or `pconv calibrate`")
    version = metadata.get("pconv.format_version", "")
    if version not in READABLE_VERSIONS:
        raise FormatError(f"{str(path)!r} has format version {version!r}; "
                          f"this pconv reads versions {', '.join(READABLE_VERSIONS)}",
                          "upgrade pconv, or re-export the file with this version")
    if metadata.get("pconv.kind") not in KINDS:
        raise FormatError(f"{str(path)!r} has unknown kind {metadata.get('pconv.kind')!r}", "the file is corrupt")
    try:
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise FormatError(f"{str(path)!r} has an unreadable tensor table", "the file is corrupt") from None
    if 8 + n + end != size:
        raise FormatError(f"{str(path)!r} should be {8 + n + end} bytes but is {size}",
                          "the file is truncated or corrupt")
    return Header(metadata, header, size)


@dataclass(frozen=True)
class FileMetadata:
    """What a pconv file (either kind) says about itself.

    `time_steps` holds the one T of an SNN file or every T of a calibration file; `populated` maps each T to
    the sites whose neurons per channel the budget chose (hidden sites with more than one, encoding sites with
    any; nn.population.populations reads it); `neuron` is set for SNN files
    only. `threshold` and `method` (the metadata entry `calibration`) are what ran: in an SNN file, at its T
    (for `auto`, what it resolved to); in a calibration file, the configured ones. `config` is the whole
    configuration (absent in files of pconv before it recorded one)."""

    kind: str
    time_steps: tuple[int, ...]
    sites: tuple[Site, ...]
    threshold: str
    method: str
    model: ModelSource | None = None
    data_config: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    encoding_levels: int = 0
    populated: dict[int, dict[str, int]] = field(default_factory=dict)
    #: the sites with an overflow neuron per channel (at every T)
    overflow: tuple[str, ...] = ()
    neuron: str | None = None
    num_classes: int | None = None
    config: CalibrationConfig | None = None
    format_version: int = FORMAT_VERSION
    pconv_version: str = __version__
    created: str = ""

    def to_metadata(self) -> dict[str, str]:
        """The str -> str safetensors metadata of this description (always the current format version)."""
        meta = {
            "pconv.format": FORMAT_NAME,
            "pconv.format_version": str(FORMAT_VERSION),
            "pconv.kind": self.kind,
            "pconv.version": __version__,
            "created": self.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "threshold": self.threshold,
            "calibration": self.method,
            "sites": json.dumps([s.to_dict() for s in self.sites]),
            "model": self.model.to_json() if self.model else "",
            "data_config": json.dumps(self.data_config, sort_keys=True),
            "provenance": json.dumps(self.provenance, sort_keys=True),
            "encoding_levels": str(self.encoding_levels),
            "overflow": json.dumps(list(self.overflow)),
        }
        if self.kind == "snn":
            (T,) = self.time_steps
            meta["time_steps"] = str(T)
            meta["neuron"] = str(self.neuron)
            meta["populated"] = json.dumps(dict(self.populated.get(T, {})))
        else:
            meta["time_steps"] = json.dumps(list(self.time_steps))
            meta["populated"] = json.dumps({str(t): dict(n) for t, n in sorted(self.populated.items()) if n})
        if self.num_classes is not None:
            meta["num_classes"] = str(self.num_classes)
        if self.config is not None:
            meta["config"] = json.dumps(self.config.to_dict(), sort_keys=True)
        return meta

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], where: str = "the file") -> "FileMetadata":
        """Read and validate every entry; a bad one raises FormatError naming it."""
        read = _Reader(meta, where)
        kind = read.text("pconv.kind", choices=KINDS)
        steps = (read.count("time_steps", 1, MAX_STEPS),) if kind == "snn" else read.steps("time_steps")
        sites = read.sites("sites")
        provenance = read.json_object("provenance")
        encoding_levels = read.count("encoding_levels", 0, MAX_STEPS, default=0)
        overflow = read.overflow("overflow", sites)
        config = read.config("config", provenance)
        if config is not None and list(overflow) != config.overflow(list(sites)):
            raise read.fail("overflow", f"names other sites than its config's overflow_sites "
                                        f"({config.overflow_sites}) gives")
        return cls(
            kind=kind, time_steps=steps, sites=sites,
            threshold=read.name("threshold"), method=read.name("calibration"),
            model=read.model("model"), data_config=read.data_config("data_config"),
            provenance=provenance,
            encoding_levels=encoding_levels,
            populated=read.populated("populated", kind, steps, sites, encoding_levels,
                                     int(meta["pconv.format_version"])),
            overflow=overflow,
            neuron=read.name("neuron") if kind == "snn" else None,
            num_classes=read.count("num_classes", 1, 10**7, default=None),
            config=config,
            format_version=int(meta["pconv.format_version"]),
            pconv_version=read.name("pconv.version", default="?"),
            created=meta.get("created", ""),
        )


class _Reader:
    """Validating accessors for the metadata entries of one file."""

    def __init__(self, meta: Mapping[str, str], where: str):
        self.meta = meta
        self.where = where

    def fail(self, key: str, problem: str) -> FormatError:
        return FormatError(f"{self.where}: metadata entry {key!r} {problem}", "the file is corrupt")

    def raw(self, key: str, default: Any = ...) -> Any:
        if key in self.meta:
            return self.meta[key]
        if default is ...:
            raise self.fail(key, "is missing")
        return default

    def json(self, key: str, default: Any = ...) -> Any:
        if key not in self.meta:
            return self.raw(key, default)
        try:
            return json.loads(self.meta[key])
        except json.JSONDecodeError:
            raise self.fail(key, "is not JSON") from None

    def text(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.raw(key)
        if value not in choices:
            raise self.fail(key, f"is {value!r}, not one of {', '.join(choices)}")
        return value

    def name(self, key: str, default: Any = ...) -> str:
        if key not in self.meta:
            return self.raw(key, default)
        value = self.meta[key]
        if not _NAME.match(value):
            raise self.fail(key, f"is {value[:40]!r}, not a method or neuron name")
        return value

    def count(self, key: str, low: int, high: int, default: Any = ...) -> int | None:
        if key not in self.meta:
            return self.raw(key, default)
        value = self.meta[key]
        if not value.isdigit() or not low <= int(value) <= high:
            raise self.fail(key, f"is {value[:40]!r}, not a whole number from {low} to {high}")
        return int(value)

    def steps(self, key: str) -> tuple[int, ...]:
        value = self.json(key)
        if not isinstance(value, list) or not value or not all(
                isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= MAX_STEPS for t in value) \
                or len(set(value)) != len(value):
            raise self.fail(key, f"is {self.meta[key][:40]!r}, not a list of distinct T from 1 to {MAX_STEPS}")
        return tuple(sorted(value))

    def sites(self, key: str) -> tuple[Site, ...]:
        value = self.json(key)
        if not isinstance(value, list) or not value:
            raise self.fail(key, "is not a non-empty list of sites")
        sites = []
        activations = {kind for kind, _ in ACTIVATIONS.values()}
        for entry in value:
            ok = isinstance(entry, dict) and {"name", "activation", "channels", "ndim"} <= set(entry) <= _SITE_KEYS
            ok = ok and isinstance(entry["name"], str) and bool(entry["name"]) and entry["activation"] in activations
            ok = ok and all(isinstance(entry[k], int) and not isinstance(entry[k], bool) for k in ("channels", "ndim"))
            ok = ok and entry["channels"] >= 1 and entry["ndim"] >= 2
            ok = ok and (entry.get("cap") is None or isinstance(entry["cap"], (int, float))
                         and not isinstance(entry["cap"], bool) and entry["cap"] > 0)
            ok = ok and isinstance(entry.get("encoding", False), bool)
            if not ok:
                raise self.fail(key, f"holds a malformed site ({json.dumps(entry)[:80]})")
            sites.append(Site.from_dict(entry))
        names = [s.name for s in sites]
        if len(set(names)) != len(names):
            raise self.fail(key, "names a site twice")
        return tuple(sites)

    def model(self, key: str) -> ModelSource | None:
        text = self.raw(key, "")
        if not text:
            return None
        try:
            return ModelSource.from_json(text)
        except ModelLoadError as e:
            raise FormatError(f"{self.where}: {e.message}", e.hint) from None

    def data_config(self, key: str) -> dict[str, Any]:
        value = self.json(key, {})
        try:
            return check_data_config(value, partial=True)
        except ConfigError as e:
            raise self.fail(key, f"is invalid: {e.message}") from None

    def config(self, key: str, provenance: dict[str, Any]) -> CalibrationConfig | None:
        value = self.json(key, None)
        if value is None:
            return None
        try:
            return CalibrationConfig.from_dict(value, provenance)
        except ConfigError as e:
            raise self.fail(key, f"is invalid: {e.message}") from None

    def json_object(self, key: str) -> dict[str, Any]:
        value = self.json(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, "is not a JSON object")
        return value

    def overflow(self, key: str, sites: tuple[Site, ...]) -> tuple[str, ...]:
        value = self.json(key, [])  # absent before format version 7: no overflow neuron
        names = [s.name for s in sites]
        if not isinstance(value, list) or not all(isinstance(n, str) and n in names for n in value) \
                or len(set(value)) != len(value):
            raise self.fail(key, "is not a list of distinct sites of the file")
        return tuple(sorted(value, key=names.index))

    def populated(self, key: str, kind: str, steps: tuple[int, ...], sites: tuple[Site, ...],
                  encoding_levels: int, version: int) -> dict[int, dict[str, int]]:
        value = self.json(key, None)
        if value is None:  # absent before format version 4: no hidden site population-coded
            return {}
        if kind == "snn":
            value = {str(steps[0]): value}
        shape = list if version <= 4 else dict  # version 4 lists the sites, version 5 maps them to m
        if not isinstance(value, dict) or any(not isinstance(v, shape) for v in value.values()):
            raise self.fail(key, "is malformed")
        hidden = {s.name for s in sites if not s.encoding}
        named = hidden if version <= 5 else {s.name for s in sites}  # encoding sites since version 6
        out: dict[int, dict[str, int]] = {}
        for step, listed in value.items():
            if not step.isdigit() or int(step) not in steps or not all(isinstance(n, str) and n in named
                                                                       for n in listed):
                raise self.fail(key, f"names a T or site the file does not have, or an encoding site before "
                                     f"format version 6 ({step!r})")
            largest = population_size(int(step), encoding_levels)
            sizes = {n: largest for n in listed} if shape is list else listed
            for n, m in sizes.items():
                least = 2 if n in hidden else 1  # a hidden site with one neuron is not listed
                if isinstance(m, bool) or not isinstance(m, int) or not least <= m <= largest:
                    raise self.fail(key, f"gives {n!r} at T={step} a population outside {least} to {largest} "
                                         "neurons per channel")
            if sizes:
                out[int(step)] = dict(sizes)
        return out


def read_metadata(path: str | Path) -> tuple[FileMetadata, Header]:
    """The validated description of a pconv file and its raw header, without loading tensors."""
    header = read_header(path)
    return FileMetadata.from_metadata(header.metadata, repr(str(path))), header


def check_tensor_shapes(header: Header, sites: tuple[Site, ...], prefix: str, leaves: tuple[str, ...]) -> None:
    """Every per-site tensor the metadata implies exists, as a [channels] vector."""
    for site in sites:
        for leaf in leaves:
            key = f"{prefix}{site.name}.{leaf}"
            if key not in header.tensors:
                raise FormatError(f"tensor {key!r} is missing", "the file's tensors do not match its metadata")
            shape = tuple(header.tensors[key].get("shape", ()))
            if shape != (site.channels,):
                raise FormatError(f"tensor {key!r} has shape {shape}, the metadata says ({site.channels},)",
                                  "the file's tensors do not match its metadata")
