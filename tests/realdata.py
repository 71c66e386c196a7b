"""Real checkpoints + real image folders, prepared once per test session (shared by tests and bench/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import shared_data as sd
from pconv import zoo
from pconv.data import folders as data
from pconv.data.config import data_config_of

MODELS = {
    "cifar10_resnet20_akamaster": zoo.cifar10_resnet20,
    "mnist_lenet5_snntoolbox": zoo.mnist_lenet5,
    "cifar10_avgpool_cnn_snntoolbox": zoo.cifar10_cnn,
}


def load_zoo_model(name: str) -> torch.nn.Module:
    model = MODELS[name]()
    model.load_state_dict(load_file(str(sd.checkpoint(name))), strict=True)
    return model.eval()


def batches(folder: Path, model: torch.nn.Module, batch_size: int = 250) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Decode a folder once, through pconv's own loader (timm dataset + transform)."""
    return list(data.image_loader(folder, data_config_of(model), batch_size=batch_size))


def top1(net: torch.nn.Module, labelled: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    correct = total = 0
    with torch.inference_mode():
        for x, y in labelled:
            correct += (net(x).argmax(dim=1) == y).sum().item()
            total += len(y)
    return 100.0 * correct / total


def cifar10_split(root: Path, model: torch.nn.Module):
    """Calibration: the 1,000 CIFAR-10 training images; evaluation: the 1,000 lossless test images."""
    calib = [x for x, _ in batches(sd.cifar10_calib_folder(root), model)]
    return calib, batches(sd.cifar10_test_folder(root), model)


def mnist_split(root: Path, model: torch.nn.Module, n_calib: int = 1000):
    """MNIST has no training images here: calibrate on the first 1,000 test digits, evaluate on the other 9,000."""
    npz = sd.require_shared_data(sd.MNIST_TEST) / sd.MNIST_TEST
    names = [str(i) for i in range(10)]
    calib_dir = sd.write_image_folder(npz, root / "mnist_calib", class_names=names, indices=np.arange(n_calib))
    eval_dir = sd.write_image_folder(npz, root / "mnist_eval", class_names=names, indices=np.arange(n_calib, 10000))
    return [x for x, _ in batches(calib_dir, model)], batches(eval_dir, model, batch_size=1000)


SPLITS = {"cifar10_resnet20_akamaster": cifar10_split, "mnist_lenet5_snntoolbox": mnist_split,
          "cifar10_avgpool_cnn_snntoolbox": cifar10_split}
