"""Image folders -> batches, through timm's dataset and transform factories with the model's data config.

A folder in class-subfolder layout (or anything `timm.data.create_dataset` reads, e.g. tar shards). If the
folder holds a `class_map.txt` (one class-folder name per line, line k = class k), labels follow it, so a
folder with only some of the classes still gets the model's class indices.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import DataError

CLASS_MAP_FILE = "class_map.txt"


def resolve_config(data_config: dict[str, Any], mean=None, std=None, input_size=None) -> dict[str, Any]:
    """The model's data config with user overrides applied (timm's key names)."""
    cfg = dict(data_config)
    if mean is not None:
        cfg["mean"] = tuple(mean)
    if std is not None:
        cfg["std"] = tuple(std)
    if input_size is not None:
        cfg["input_size"] = tuple(input_size)
    for key in ("input_size", "mean", "std"):
        if key not in cfg:
            raise DataError(f"the model's data config has no {key!r}",
                            "pass --mean/--std/--input-size, or give the model a timm-style pretrained_cfg")
    return cfg


class _CheckedDataset(Dataset):
    """Wraps a timm dataset so an unreadable image raises DataError naming the file."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self._load(index)
        except Exception as e:
            name = self._filename(index)
            raise DataError(f"cannot read image {name}: {str(e).splitlines()[0][:160]}",
                            "remove or replace the file") from None

    def _load(self, index: int):
        ds = self.dataset
        if not hasattr(ds, "reader") or getattr(ds, "load_bytes", False) or getattr(ds, "additional_features", None):
            return ds[index]
        # timm's ImageDataset silently substitutes the next image for an unreadable one (and its label):
        # read it here instead, so a broken file is an error naming it.
        from PIL import Image

        img, target, *_ = ds.reader[index]
        img = Image.open(img)
        if ds.input_img_mode:
            img = img.convert(ds.input_img_mode)
        if ds.transform is not None:
            img = ds.transform(img)
        if target is None:
            target = -1
        elif ds.target_transform is not None:
            target = ds.target_transform(target)
        return img, target

    def _filename(self, index: int) -> str:
        try:
            return str(self.dataset.filename(index, absolute=True))
        except Exception:
            return f"#{index}"


def image_dataset(root: str | Path, data_config: dict[str, Any]) -> Dataset:
    """The images under `root`, transformed for evaluation with `data_config`."""
    from timm.data import create_dataset, create_transform

    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {str(root)!r} does not exist", "check the --data path")
    class_map = root / CLASS_MAP_FILE if (root / CLASS_MAP_FILE).is_file() else ""
    channels = data_config["input_size"][0]
    try:
        dataset = create_dataset("", root=str(root), split="", class_map=str(class_map),
                                 input_img_mode="L" if channels == 1 else "RGB")
    except Exception as e:
        raise DataError(f"cannot read data folder {str(root)!r}: {str(e).splitlines()[0][:160]}",
                        "expected class subfolders holding images") from None
    if len(dataset) == 0:
        raise DataError(f"data folder {str(root)!r} holds no images",
                        "expected class subfolders holding .jpg/.png images")
    dataset.transform = create_transform(
        input_size=data_config["input_size"], interpolation=data_config.get("interpolation", "bilinear"),
        mean=data_config["mean"], std=data_config["std"], crop_pct=data_config.get("crop_pct", 1.0),
        crop_mode=data_config.get("crop_mode", "center"), is_training=False)
    return _CheckedDataset(dataset)


def subset(dataset: Dataset, num_images: int | None, seed: int | None = 0) -> Dataset:
    """`num_images` images drawn without replacement (seeded), or all of them in order."""
    if num_images is None:
        return dataset
    if num_images < 1:
        raise DataError(f"--num-images must be at least 1, got {num_images}", "for example --num-images 256")
    if num_images > len(dataset):
        raise DataError(f"asked for {num_images} images but the folder holds {len(dataset)}",
                        f"use --num-images {len(dataset)} or fewer")
    if seed is None:
        return Subset(dataset, range(num_images))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator)[:num_images].sort().values
    return Subset(dataset, order.tolist())


def image_loader(root: str | Path, data_config: dict[str, Any], batch_size: int = 64, num_images: int | None = None,
                 seed: int | None = 0, workers: int = 0) -> DataLoader:
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}", "for example --batch-size 64")
    dataset = subset(image_dataset(root, data_config), num_images, seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


def num_batches(loader: DataLoader) -> int:
    return math.ceil(len(loader.dataset) / loader.batch_size)


def images_only(loader: DataLoader) -> Iterator[Tensor]:
    for x, _ in loader:
        yield x
