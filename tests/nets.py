"""Small seeded networks for tests (importable, so saved SNNs can be rebuilt by `pconv.load`)."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial eval statistics, so BN is not an identity in tests."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


class VGGSmall(nn.Module):
    """Conv-BN-ReLU blocks with max and average pooling, a depthwise conv, dropout and a two-layer head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(inplace=True),
            nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.AvgPool2d(2),
            nn.ZeroPad2d(1), nn.Conv2d(32, 32, 3), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32, 64)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.flatten(self.pool(self.features(x)))
        return self.fc2(self.drop(self.relu(self.fc1(x))))


class ConcatNet(nn.Module):
    """Two branches joined by concatenation and a residual addition."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act0 = nn.ReLU()
        self.left = nn.Conv2d(8, 8, 3, padding=1)
        self.act_left = nn.ReLU()
        self.right = nn.Conv2d(8, 8, 1)
        self.act_right = nn.ReLU()
        self.mix = nn.Conv2d(16, 8, 1)
        self.act_mix = nn.ReLU()
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.act0(self.stem(x))
        y = torch.cat([self.act_left(self.left(x)), self.act_right(self.right(x))], dim=1)
        z = self.act_mix(self.mix(y) + x)
        return self.head(z.mean(dim=(2, 3)))


def vgg_small(num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = randomize_batchnorm(VGGSmall(num_classes), seed)
    model.pretrained_cfg = dict(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0,
                                interpolation="bilinear", architecture="nets:vgg_small", num_classes=num_classes)
    return model.eval()


def concat_net(num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ConcatNet(num_classes).eval()


def timm_resnet(num_classes: int = 10, seed: int = 0, name: str = "test_resnet") -> nn.Module:
    torch.manual_seed(seed)
    return randomize_batchnorm(timm.create_model(name, pretrained=False, num_classes=num_classes), seed).eval()


# --- networks pconv must refuse -------------------------------------------------------------


class WithAct(nn.Module):
    """conv -> ReLU -> conv -> <act> -> linear, with <act> the module under test."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.act = act
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.act(self.conv2(self.relu(self.conv1(x)))))))


class ChannelNorm(nn.Module):
    """LayerNorm over channels of a [B, C, H, W] map (as in ConvNeXt)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    """A sigmoid gate multiplying the feature map by a function of itself."""

    def __init__(self, channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.reduce(x.mean(dim=(2, 3), keepdim=True)))


class FunctionalReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.conv2(self.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class SharedReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class Squared(nn.Module):
    """Multiplies the activation by itself (not affine)."""

    def forward(self, x):
        return x * x
