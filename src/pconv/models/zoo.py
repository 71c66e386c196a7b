"""Reference architectures for the small pretrained checkpoints pconv is tested against.

Each factory rebuilds a published network module-for-module so that its state dict loads
with ``strict=True`` from the matching safetensors file. Two conventions matter for the
converter, which swaps activation modules by their dotted name:

* every ReLU is its own ``nn.ReLU`` instance, used at exactly one place (no ``F.relu``,
  no module reused twice), so each activation site has a unique name;
* everything else on the forward path that is not a plain tensor op (shortcuts, pooling,
  flatten) is a module too, so the graph is visible to module walks and FX tracing.

Each factory returns the model in eval mode with a timm-style ``pretrained_cfg`` so
``timm.data.resolve_data_config(model=model)`` gives the right preprocessing. The zoo
never knows where checkpoints live; callers load them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ShortcutA",
    "BasicBlockA",
    "CifarResNet",
    "LeNet5",
    "AvgPoolCNN",
    "cifar10_resnet20",
    "mnist_lenet5",
    "cifar10_cnn",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _cfg(architecture: str, input_size: tuple[int, int, int], mean: tuple, std: tuple, num_classes: int,
         first_conv: str, classifier: str) -> dict:
    # crop_pct=1.0 with a same-size input makes timm's eval transform resize/crop a no-op.
    return dict(
        architecture=architecture,
        input_size=input_size,
        mean=mean,
        std=std,
        crop_pct=1.0,
        crop_mode="center",
        interpolation="bilinear",
        num_classes=num_classes,
        first_conv=first_conv,
        classifier=classifier,
    )


# --------------------------------------------------------------------------------------------
# CIFAR ResNet (He et al. 2016, sec. 4.2), akamaster/pytorch_resnet_cifar10 layout
# --------------------------------------------------------------------------------------------


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad channels; parameter-free and affine (linear)."""

    def __init__(self, pad_channels: int):
        super().__init__()
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.pad's last pair pads dim 1 (channels) once H and W pairs are zero.
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_channels, self.pad_channels))

    def extra_repr(self) -> str:
        return f"pad_channels={self.pad_channels}"


class BasicBlockA(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ShortcutA(planes // 4)
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, num_blocks: tuple[int, int, int], num_classes: int = 10):
        super().__init__()
        self.in_planes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(16, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(32, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(64, num_blocks[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(64, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlockA(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.avgpool(x)))


def cifar10_resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 for CIFAR-10 (3 stages x 3 option-A BasicBlocks, 16/32/64 channels).

    Loads ``cifar10_resnet20_akamaster.safetensors`` as stored (no key or weight changes).
    Input: RGB x/255 normalised with the ImageNet mean/std, 32x32.
    """
    model = CifarResNet((3, 3, 3), num_classes=num_classes)
    model.pretrained_cfg = _cfg("pconv.zoo:cifar10_resnet20", (3, 32, 32), IMAGENET_MEAN, IMAGENET_STD,
                                num_classes, first_conv="conv1", classifier="linear")
    return model.eval()


# --------------------------------------------------------------------------------------------
# snn_toolbox example networks (Keras/Theano originals, converted to torch layout)
# --------------------------------------------------------------------------------------------


class LeNet5(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(16, 120, 5, padding=2)
        self.relu3 = nn.ReLU()
        self.flatten = nn.Flatten(1)  # (C, H, W) order, as Keras channels_first
        self.fc1 = nn.Linear(120 * 4 * 4, 84)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.flatten(self.relu3(self.conv3(x)))
        return self.fc2(self.relu4(self.fc1(x)))


class AvgPoolCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool1 = nn.AvgPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(32, 32, 3)
        self.relu4 = nn.ReLU()
        self.pool2 = nn.AvgPool2d(2)
        self.flatten = nn.Flatten(1)  # (C, H, W) order, as Keras "th" dim ordering
        self.fc1 = nn.Linear(32 * 6 * 6, 512)
        self.relu5 = nn.ReLU()
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        x = self.pool2(self.relu4(self.conv4(self.relu3(self.conv3(x)))))
        x = self.flatten(x)
        return self.fc2(self.relu5(self.fc1(x)))


def mnist_lenet5(num_classes: int = 10) -> LeNet5:
    """LeNet-5 variant from snn_toolbox's examples (98.96% on the MNIST test set).

    Loads ``mnist_lenet5_snntoolbox.safetensors`` as stored: the Theano kernels in that
    file were already flipped to PyTorch (cross-correlation) orientation; flipping them
    again (``w.flip(-1, -2)``) drops test accuracy from 98.96% to ~31.6%.
    Input: grayscale x/255, no normalisation, 1x28x28.
    """
    model = LeNet5(num_classes)
    model.pretrained_cfg = _cfg("pconv.zoo:mnist_lenet5", (1, 28, 28), (0.0,), (1.0,), num_classes,
                                first_conv="conv1", classifier="fc2")
    return model.eval()


def cifar10_cnn(num_classes: int = 10) -> AvgPoolCNN:
    """Plain 4-conv avg-pool CNN from snn_toolbox's examples (file name claims 83.62%).

    Loads ``cifar10_avgpool_cnn_snntoolbox.safetensors`` as stored: the Theano kernels in
    that file were already flipped to PyTorch (cross-correlation) orientation; flipping
    them again (``w.flip(-1, -2)``) drops accuracy from 82.9% to ~52% (lossless 1k subset).
    Input: RGB x/255, no normalisation, 32x32.
    """
    model = AvgPoolCNN(num_classes)
    model.pretrained_cfg = _cfg("pconv.zoo:cifar10_cnn", (3, 32, 32), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                                num_classes, first_conv="conv1", classifier="fc2")
    return model.eval()
