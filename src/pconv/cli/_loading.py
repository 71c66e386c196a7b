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
from ..data.config import data_config_of, override_data_config
from ..data.folders import image_dataset, subset
from ..errors import ConfigError
from ..models.source import create_model
from ..observe.sites import Site, find_sites
from ..pipeline import calibrate
from ..utils import distributed


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
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
        full_fp32_convolutions()
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps but MPS is not available here", "use --device cpu")
    return device


def full_fp32_convolutions() -> None:
    """Convolutions and matrix products in IEEE float32, not TF32 (torch's default for cuDNN convolutions).
    TF32 rounds a pre-activation to 10 bits of mantissa, often enough to move it across a neuron's level
    boundary. On an H200, with TF32 the SNN's top-1 disagreed with the same file's on the CPU for 1 of 64 images
    (ResNet-20, T=8) and 6 of 64 (EfficientNet-Lite0, T=8), in IEEE float32 for 0 and 1, and `eval` of
    ResNet-20 at T=8 on 1,000 images then gave the CPU's figures exactly (docs/benchmarks.md). The ANN and the
    SNN run alike, so bench's ratios stay fair."""
    if hasattr(torch.backends.cudnn, "fp32_precision"):  # torch 2.9 and later: cuDNN's setting covers its convs
        torch.backends.cudnn.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:  # torch before 2.9
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def apply_overrides(data_config: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The data config with the preprocessing options given on the command line (None: not given); a value that
    does not fit (two means for three channels, a std of 0) is a usage error naming the option."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return override_data_config(data_config, **given)
    except ConfigError as e:
        option = next((f"--{k.replace('_', '-')}" for k in given if k in e.message), None)
        if option is None and not given:
            raise  # the model's own config is incomplete: not a usage mistake
        raise click.BadParameter(f"{e.message} — {e.hint}", param_hint=f"'{option}'" if option else None) from None


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


@dataclass(frozen=True)
class ModelChoice:
    """Which model the command line asked for, and where its weights come from."""

    spec: str
    checkpoint: Path | None = None
    pretrained: bool = False
    use_ema: bool = False
    random_weights: bool = False
    num_classes: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def provenance(self) -> dict[str, Any]:
        """Where the weights came from, for the calibration's provenance."""
        return {"checkpoint": self.checkpoint.name if self.checkpoint else None, "pretrained": self.pretrained,
                "use_ema": self.use_ema, "random_weights": self.random_weights}

    @property
    def label(self) -> str:
        weights = self.checkpoint.name if self.checkpoint else "pretrained" if self.pretrained else None
        return f"{self.spec} + {weights}" if weights else self.spec


def load_model(choice: ModelChoice, device: torch.device, overrides: dict[str, Any],
               use_test_size: bool = True) -> tuple[nn.Module, dict[str, Any], list[Site]]:
    """The source ANN on `device`, its data config as validate.py resolves it (`overrides`: the preprocessing
    options given) and its activation sites, from a probe on one blank input, so an unsupported network is
    refused before any image is read."""
    model = create_model(choice.spec, checkpoint=choice.checkpoint, num_classes=choice.num_classes,
                         pretrained=choice.pretrained, random_weights=choice.random_weights, use_ema=choice.use_ema,
                         **choice.kwargs)
    data_config = apply_overrides(data_config_of(model, use_test_size=use_test_size), **overrides)
    model.to(device)
    sites = find_sites(model, torch.zeros(1, *data_config["input_size"], device=device))
    return model, data_config, sites


def calibration_config(time_steps: list[int], threshold: str, method: str, encoding_levels: int,
                       population_budget: float, recon_steps: int | None = None,
                       recon_drop: float | None = None, overflow_sites: float | None = None) -> CalibrationConfig:
    """The command line's calibration choices, checked together (a bad combination is a usage error)."""
    given = {"recon_steps": recon_steps, "recon_drop": recon_drop}
    options = {name: value for name, value in given.items() if value is not None}
    try:
        config = CalibrationConfig(time_steps=tuple(time_steps), threshold=threshold, method=method,
                                   encoding_levels=encoding_levels, population_budget=population_budget,
                                   overflow_sites=overflow_sites, **options)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    # the config refuses only a value other than the default; the command line also refuses the default given
    for name in options:
        if not config.reads(name):
            flag = "--" + name.replace("_", "-")
            raise click.UsageError(f"{flag} applies to --calibration recon only, which no T of this calibration "
                                   "runs; drop it or add --calibration recon")
    return config


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
