"""What the commands load: the device, the model and its data config, the image folders, and a calibration
run on a folder (with the provenance of where everything came from)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..calibration import Calibration, CalibrationConfig
from ..config import DEFAULT_CALIBRATION_IMAGES
from ..data.config import check_data_config, data_config_of
from ..data.folders import image_dataset, subset
from ..errors import ConfigError
from ..models.source import create_model
from ..observe.sites import Site, find_sites
from ..pipeline import calibrate
from ..utils import distributed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}", "use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} but CUDA is not available here", "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name} but there are {torch.cuda.device_count()} CUDA devices",
                              "use --device cuda:0")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps but MPS is not available here", "use --device cpu")
    return device


def apply_overrides(data_config: dict[str, Any], mean=None, std=None, input_size=None) -> dict[str, Any]:
    """The data config with --mean/--std/--input-size applied (single values broadcast over channels); a
    value that does not fit is a usage error naming the option."""
    cfg = dict(data_config)
    if input_size is not None:
        channels = (cfg.get("input_size") or (3,))[0]
        size = tuple(input_size)
        cfg["input_size"] = size if len(size) == 3 else (channels, *(size * 2 if len(size) == 1 else size))
    channels = (cfg.get("input_size") or (3,))[0]
    for key, value in (("mean", mean), ("std", std)):
        if value is None:
            continue
        if len(value) == 1:
            value = value * channels
        if len(value) != channels:
            raise click.BadParameter(f"{len(value)} values for {channels} input channels — give one value or "
                                     f"{channels}", param_hint=f"'--{key}'")
        if key == "std" and min(value) <= 0:
            raise click.BadParameter("std values must be positive — for example --std 0.229,0.224,0.225",
                                     param_hint="'--std'")
        cfg[key] = tuple(value)
    return check_data_config(cfg)


def make_loader(root: Path, data_config: dict[str, Any], batch_size: int, num_images: int | None, seed: int,
                workers: int, cap: int | None = None, num_classes: int | None = None,
                class_map: Path | None = None, labelled: bool = True) -> DataLoader:
    """A loader over `num_images` images of `root` drawn with `seed` (all, up to `cap`, when None); labels
    matched to `num_classes` outputs unless `labelled` is False (see pconv.data)."""
    dataset = image_dataset(root, data_config, num_classes, class_map, labelled)
    if num_images is None and cap is not None and len(dataset) > cap:
        num_images = cap
    dataset = subset(dataset, num_images, seed)
    if distributed.active():  # each rank reads its own shard; statistics are reduced across ranks
        dataset = Subset(dataset, distributed.shard(range(len(dataset))))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=False, persistent_workers=False)


class FirstPassProgress:
    """A re-iterable view of a loader whose first pass (decoding every image) is shown as a progress stage;
    calibration keeps the decoded images while they fit its memory budget, else reads the loader again."""

    def __init__(self, loader: DataLoader, progress):
        self.loader = loader
        self.progress = progress
        self._first = True

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        advance = self.progress.stage("reading images", len(self.loader)) if self._first else None
        self._first = False
        for item in self.loader:
            yield item
            if advance is not None:
                advance()


def model_label(spec: str, checkpoint: Path | None) -> str:
    return f"{spec} + {checkpoint.name}" if checkpoint else spec


def load_model(spec: str, checkpoint: Path | None, num_classes: int | None, random_weights: bool,
               device: torch.device, overrides: dict[str, Any]) -> tuple[nn.Module, dict[str, Any], list[Site]]:
    """The source ANN on `device`, its data config (with the --mean/--std/--input-size `overrides`) and its
    activation sites, from a probe on one blank input, so an unsupported network is refused before any
    image is read."""
    model = create_model(spec, checkpoint=checkpoint, num_classes=num_classes, random_weights=random_weights)
    data_config = apply_overrides(data_config_of(model), **overrides)
    model.to(device)
    sites = find_sites(model, torch.zeros(1, *data_config["input_size"], device=device))
    return model, data_config, sites


def calibration_config(time_steps: list[int], threshold: str, method: str, encoding_levels: int,
                       population_budget: float) -> CalibrationConfig:
    """The command line's calibration choices, checked together (a bad combination is a usage error)."""
    try:
        return CalibrationConfig(time_steps=tuple(time_steps), threshold=threshold, method=method,
                                 encoding_levels=encoding_levels, population_budget=population_budget)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


@dataclass(frozen=True)
class FolderRun:
    """Where and how a calibration reads its images: the folder, the subset and the loader."""

    data: Path
    num_images: int | None = None
    batch_size: int = 64
    seed: int = 0
    workers: int = 0
    memory_budget: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


def calibrate_on_folder(model: nn.Module, data_config: dict[str, Any], config: CalibrationConfig, run: FolderRun,
                        progress) -> Calibration:
    """Calibrate `model` on images of the folder `run.data`; provenance says where everything came from."""
    torch.manual_seed(run.seed)
    loader = make_loader(run.data, data_config, run.batch_size, run.num_images, run.seed, run.workers,
                         cap=DEFAULT_CALIBRATION_IMAGES, labelled=False)
    calibration = calibrate(model, FirstPassProgress(loader, progress), config, memory_budget=run.memory_budget,
                            progress=progress)
    calibration.data_config = dict(data_config)
    calibration.provenance.update({"data": str(run.data), "seed": run.seed, **run.provenance})
    return calibration
