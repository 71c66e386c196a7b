"""Tiny importable model factories and image-folder writers for the CLI tests.

The CLI names models by import path (`cli_models:tiny_cnn`), so they live in a module, not in a test file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT_SIZE = (3, 16, 16)


class TinyCNN(nn.Module):
    """conv-BN-ReLU-maxpool, conv-ReLU6, avgpool, linear: every kind of layer the SOP count distinguishes."""

    def __init__(self, num_classes: int = 3, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.act2 = act()
        self.pool2 = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        return self.fc(self.flatten(self.pool2(self.act2(self.conv2(x)))))


def _cfg(name: str, num_classes: int) -> dict:
    return dict(architecture=f"cli_models:{name}", input_size=INPUT_SIZE, mean=(0.5, 0.5, 0.5),
                std=(0.25, 0.25, 0.25), crop_pct=1.0, crop_mode="center", interpolation="bilinear",
                num_classes=num_classes)


def _init(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def tiny_cnn(num_classes: int = 3, seed: int = 0) -> nn.Module:
    model = _init(TinyCNN(num_classes), seed)
    model.pretrained_cfg = _cfg("tiny_cnn", num_classes)
    return model


def tiny_cnn_relu6(num_classes: int = 3, seed: int = 0) -> nn.Module:
    """Same layer names as tiny_cnn, but relu6 at the second site: a different set of sites."""
    model = _init(TinyCNN(num_classes, act=nn.ReLU6), seed)
    model.pretrained_cfg = _cfg("tiny_cnn_relu6", num_classes)
    return model


def gelu_cnn(num_classes: int = 3) -> nn.Module:
    """An activation pconv cannot convert (GELU) at `act2`."""
    model = _init(TinyCNN(num_classes, act=nn.GELU), 0)
    model.pretrained_cfg = _cfg("gelu_cnn", num_classes)
    return model


def bare_cnn(num_classes: int = 3) -> nn.Module:
    """No pretrained_cfg at all: the data config must come from --input-size/--mean/--std."""
    return _init(TinyCNN(num_classes), 0)


def write_random_folder(root: Path, classes: int = 3, per_class: int = 6, size: int = 20, seed: int = 0,
                        class_map: bool = True) -> Path:
    """Random RGB PNGs in class subfolders `c0`, `c1`, ... (with class_map.txt)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = [f"c{k}" for k in range(classes)]
    for k, name in enumerate(names):
        (root / name).mkdir(exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    if class_map:
        (root / "class_map.txt").write_text("".join(n + "\n" for n in names))
    return root
