"""The pconv file format (see docs/format.md): one safetensors file, str->str metadata, flat tensor names.

kind "snn":         weights.<state-dict key>, neurons.<site>.{theta_in,bias,theta_out},
                    ann.<state-dict key> (the ANN's values of entries a layer refit replaced; version 2)
kind "calibration": T<t>.<site>.{theta,delta_in,delta_out}, stats.<site>.max,
                    refit.T<t>.<state-dict key> (layers a method refitted at that T; version 2)
Version 3 adds the metadata entry "encoding_levels" and the "encoding" flag of each site: encoding sites
have ceil(encoding_levels/T) neurons per channel, so a version-2 reader would build the wrong network.
Version 4 adds the metadata entry "populated": the hidden sites population-coded like the encoding sites
(a list in an SNN file, {T: list} in a calibration file); a version-3 reader would ignore it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import FormatError

FORMAT_NAME = "pconv"
FORMAT_VERSION = 4
#: Versions this pconv reads: version 1 is version 2 without refitted layers; version 2 is version 3
#: with one neuron per channel everywhere (encoding_levels 0); version 3 is version 4 with no hidden site
#: population-coded.
READABLE_VERSIONS = ("1", "2", "3", "4")
REFIT_PREFIX = "refit."
ANN_PREFIX = "ann."
KINDS = ("snn", "calibration")
NEURON_TENSORS = ("theta_in", "bias", "theta_out")
CALIBRATION_TENSORS = ("theta", "delta_in", "delta_out")
#: A safetensors header larger than this is not one pconv wrote.
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class Header:
    """What a pconv file says about itself, read without loading tensors."""

    metadata: dict[str, str]
    tensors: dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data_offsets"}
    file_size: int

    @property
    def kind(self) -> str:
        return self.metadata["pconv.kind"]

    def json(self, key: str) -> Any:
        try:
            return json.loads(self.metadata[key])
        except (KeyError, json.JSONDecodeError) as e:
            raise FormatError(f"metadata key {key!r} is missing or not JSON ({e})", "the file is corrupt") from None


def read_header(path: str | Path) -> Header:
    """Parse the safetensors header of a pconv file; checks size, format name and version."""
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
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end != size:
        raise FormatError(f"{str(path)!r} should be {8 + n + end} bytes but is {size}",
                          "the file is truncated or corrupt")
    return Header(metadata, header, size)
