"""Image folders -> batches, through timm's dataset and transform factories with the model's data config.

A folder in class-subfolder layout (or anything `timm.data.create_dataset` reads, e.g. tar shards).
Calibration needs no labels and reads any folder of images (`labelled=False`). Evaluation needs labels that
are the model's class indices, and never guesses them (`class_indices`):

1. a class map (`class_map.txt` in the folder, or a file passed in): one class-folder name per line, line k
   being class k; every folder holding images must be listed;
2. else folder names that are class indices (`0`, `17`, `003`);
3. else, for a 1000-class model, ImageNet wnids (`n01440764`), numbered as timm's ImageNet class info does;
4. else the sorted folder names, but only when there are as many folders as the model has classes.

Anything else (images outside class folders, a subset of classes without a map) is refused, naming what is
missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import ConfigError, DataError

CLASS_MAP_FILE = "class_map.txt"
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


class _Relabel:
    """target_transform: the reader's class index (sorted folder names) -> the model's class index."""

    def __init__(self, indices: Sequence[int]):
        self.indices = list(indices)

    def __call__(self, target: int) -> int:
        return self.indices[int(target)]


def read_class_map(path: str | Path) -> list[str]:
    """Class-folder names, line k = class k (a text file; other formats, such as pickles, are refused)."""
    path = Path(path)
    if path.suffix.lower() != ".txt":
        raise DataError(f"class map {str(path)!r} is not a .txt file",
                        "write one class-folder name per line, line k being class k")
    if not path.is_file():
        raise DataError(f"class map {str(path)!r} does not exist", "check the --class-map path")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read class map {str(path)!r}: {e}", "it must be UTF-8 text") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if not names or any(not n for n in names):
        raise DataError(f"class map {str(path)!r} has an empty line or no names",
                        "one class-folder name per line, line k being class k")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"class map {str(path)!r} lists {repeated[0]!r} twice", "each class once")
    return names


def _shown(names: Sequence[str], limit: int = 4) -> str:
    names = [repr(n) for n in names]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def class_indices(folders: Sequence[str], num_classes: int, class_map: Sequence[str] | None = None) -> dict[str, int]:
    """The model's class index of every class folder (`''`: images outside any class folder), by the rules in
    the module docstring; DataError when the labels cannot be matched."""
    if "" in folders:
        raise DataError("the folder holds images outside class subfolders, so they have no label",
                        "put each class's images in a subfolder named after it (calibration needs no labels)")
    if class_map is not None:
        index = {name: k for k, name in enumerate(class_map)}
        unlisted = [f for f in folders if f not in index]
        if unlisted:
            raise DataError(f"the class map does not list the folders {_shown(unlisted)}",
                            "add them to the class map, one class-folder name per line")
        if len(class_map) > num_classes:
            raise DataError(f"the class map lists {len(class_map)} classes, the model has {num_classes}",
                            "use the class map of this model's classes")
        return {f: index[f] for f in folders}
    if all(f.isdigit() for f in folders):
        outside = [f for f in folders if int(f) >= num_classes]
        if outside:
            raise DataError(f"the class folders {_shown(outside)} are beyond the model's {num_classes} classes",
                            f"class-index folders run from 0 to {num_classes - 1}")
        return {f: int(f) for f in folders}
    if num_classes == 1000:
        wnids = _imagenet_wnids()
        if all(f in wnids for f in folders):
            return {f: wnids[f] for f in folders}
    if len(folders) == num_classes:
        from timm.utils.misc import natural_key

        return {f: k for k, f in enumerate(sorted(folders, key=natural_key))}
    raise DataError(f"the folder's {len(folders)} classes ({_shown(sorted(folders))}) cannot be matched to the "
                    f"model's {num_classes} outputs",
                    f"name them with --class-map FILE or {CLASS_MAP_FILE} (line k = class k), or name the folders "
                    "by class index")


def _imagenet_wnids() -> dict[str, int]:
    from timm.data import ImageNetInfo

    return {wnid: k for k, wnid in enumerate(ImageNetInfo().label_names())}


def image_dataset(root: str | Path, data_config: dict[str, Any], num_classes: int | None = None,
                  class_map: str | Path | None = None, labelled: bool = True) -> Dataset:
    """The images under `root`, transformed for evaluation with `data_config`.

    `labelled=False` (calibration): any folder of images; the labels are meaningless. Else the labels are the
    model's class indices when `num_classes` is given (`class_indices`; `class_map`, or the folder's
    class_map.txt), and the folder's own numbering (class_map.txt, else sorted names) otherwise."""
    from timm.data import create_dataset, create_transform

    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {str(root)!r} does not exist", "check the --data path")
    channels = data_config["input_size"][0]
    try:
        dataset = create_dataset("", root=str(root), split="", input_img_mode="L" if channels == 1 else "RGB")
    except Exception as e:
        raise DataError(f"cannot read data folder {str(root)!r}: {str(e).splitlines()[0][:160]}",
                        "expected class subfolders holding images") from None
    if len(dataset) == 0:
        raise DataError(f"data folder {str(root)!r} holds no images",
                        "expected class subfolders holding .jpg/.png images")
    if labelled:
        dataset.target_transform = _relabel(dataset, root, num_classes, class_map)
    dataset.transform = create_transform(
        input_size=data_config["input_size"], interpolation=data_config.get("interpolation", "bilinear"),
        mean=data_config["mean"], std=data_config["std"], crop_pct=data_config.get("crop_pct", 1.0),
        crop_mode=data_config.get("crop_mode", "center"), is_training=False)
    return _CheckedDataset(dataset)


def _relabel(dataset: Dataset, root: Path, num_classes: int | None, class_map: str | Path | None) -> _Relabel:
    reader = getattr(dataset, "reader", None)
    reader_classes = getattr(reader, "class_to_idx", None) or getattr(reader, "class_name_to_idx", None)
    if not isinstance(reader_classes, dict):
        raise DataError(f"cannot tell the classes of the images in {str(root)!r}",
                        "use a folder with one subfolder per class")
    folders = sorted(reader_classes, key=reader_classes.get)  # the reader's index order
    if class_map is None and (root / CLASS_MAP_FILE).is_file():
        class_map = root / CLASS_MAP_FILE
    names = read_class_map(class_map) if class_map is not None else None
    if num_classes is None:  # no model to match: the folder's own numbering
        if names is None:
            return _Relabel(range(len(folders)))
        num_classes = len(names)
    mapping = class_indices(folders, num_classes, names)
    return _Relabel([mapping[f] for f in folders])


def subset(dataset: Dataset, num_images: int | None, seed: int | None = 0) -> Dataset:
    """`num_images` images drawn without replacement (seeded), or all of them in order."""
    if num_images is None:
        return dataset
    if num_images < 1:
        raise ConfigError(f"--num-images must be at least 1, got {num_images}", "for example --num-images 256")
    if num_images > len(dataset):
        raise DataError(f"asked for {num_images} images but the folder holds {len(dataset)}",
                        f"use --num-images {len(dataset)} or fewer")
    if seed is None:
        return Subset(dataset, range(num_images))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator)[:num_images].sort().values
    return Subset(dataset, order.tolist())


def image_loader(root: str | Path, data_config: dict[str, Any], batch_size: int = 64, num_images: int | None = None,
                 seed: int | None = 0, workers: int = 0, num_classes: int | None = None,
                 class_map: str | Path | None = None, labelled: bool = True) -> DataLoader:
    """Batches of (images, labels) from `root` (see image_dataset for the labels)."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}", "for example --batch-size 64")
    dataset = subset(image_dataset(root, data_config, num_classes, class_map, labelled), num_images, seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
