"""Helpers for tests that use the real data set staged read-only outside the repo.

Nothing here copies the shared files into the repo: images are materialised as ImageFolder
trees under a caller-chosen directory (normally a pytest ``tmp_path_factory`` dir), so the
tests exercise the same timm folder-dataset path as the CLI.

Folder layout written by :func:`write_image_folder`::

    out_dir/
      class_map.txt          one class-folder name per line, line k = class index k
      <k>_<name>/<i>.png     k zero-padded (so folders sort in class-index order),
                             i = row of the image in the .npz

Load such a folder with :func:`timm_dataset` (or pass ``class_map=out_dir/"class_map.txt"``
to ``timm.data.create_dataset``). The class map matters whenever some classes have no images
(the ImageNet samples only cover the 500 even classes): timm and torchvision number classes
by the sorted folders that contain images, which would shift every label after a gap.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("PCONV_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()

CLASS_MAP_FILE = "class_map.txt"

CIFAR10_TEST = "cifar10/test_lossless_1000.npz"
CIFAR10_CALIB = "cifar10/train_calib_jpeg_1000.npz"
MNIST_TEST = "mnist/test_10000.npz"
IMAGENET_SAMPLES = "imagenet/samples_500_even_224_jpeg.npz"


def require_shared_data(*files: str) -> Path:
    """Skip the calling test unless DATA_DIR (and each `files` path relative to it) exists."""
    if not (DATA_DIR / "MANIFEST.json").is_file():
        pytest.skip(f"shared data not found at {DATA_DIR} (set PCONV_SHARED_DATA to its location)")
    missing = [f for f in files if not (DATA_DIR / f).exists()]
    if missing:
        pytest.skip(f"shared data at {DATA_DIR} lacks {', '.join(missing)}")
    return DATA_DIR


def checkpoint(name: str) -> Path:
    """Path of models/<name>.safetensors in the shared data (skips if absent)."""
    name = name.removesuffix(".safetensors")
    rel = f"models/{name}.safetensors"
    require_shared_data(rel)
    return DATA_DIR / rel


def sidecar(name: str) -> dict:
    """The JSON sidecar of checkpoint `name` (architecture text, measured accuracies, ...)."""
    name = name.removesuffix(".safetensors")
    rel = f"models/{name}.json"
    require_shared_data(rel)
    return json.loads((DATA_DIR / rel).read_text())


def _folder_name(index: int, width: int, name: str | None) -> str:
    if not name:
        return f"{index:0{width}d}"
    # keep names filesystem-safe; the zero-padded prefix alone fixes the sort order
    return f"{index:0{width}d}_{re.sub(r'[^A-Za-z0-9.+-]+', '_', str(name))}"


def _jpeg_offsets_key(data, images_key: str) -> str | None:
    for key in (images_key.replace("jpeg", "offsets"), "offsets"):
        if key != images_key and key in data.files:
            return key
    return None


def write_image_folder(
    npz_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    images_key: str = "images",
    labels_key: str = "labels",
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
    fmt: str = "png",
    num_classes: int | None = None,
) -> Path:
    """Materialise images of an .npz as an ImageFolder tree under `out_dir`; returns `out_dir`.

    Two layouts are understood:

    * decoded arrays, uint8 [N,H,W] (written as mode-'L') or [N,H,W,3] (RGB), saved with
      PIL in `fmt` (default lossless PNG);
    * encoded JPEG bytes: a flat uint8 `images_key` array plus an offsets array
      (``<images_key with jpeg->offsets>`` or ``offsets``, N+1 entries); image i is
      ``jpeg[offsets[i]:offsets[i+1]]`` and is written unchanged as ``<i>.jpg`` (no
      re-encoding, so pixels are exactly those of the staged file); `fmt` is ignored.

    `class_names` (index -> name, sequence or mapping) only adds readable suffixes to the
    folder names. `num_classes` (default: len(class_names) for a sequence, else max label + 1)
    sets how many lines class_map.txt gets. `indices` selects rows of the .npz (default all).
    """
    from PIL import Image  # only the writer needs PIL

    out_dir = Path(out_dir)
    with np.load(npz_path, allow_pickle=False) as data:
        labels = np.asarray(data[labels_key]).astype(np.int64)
        n_total = len(labels)
        rows = np.arange(n_total) if indices is None else np.asarray(indices, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= n_total):
            raise IndexError(f"indices out of range for {n_total} images in {npz_path}")
        offsets_key = _jpeg_offsets_key(data, images_key)
        images = data[images_key]
        is_jpeg = images.ndim == 1 and offsets_key is not None
        offsets = data[offsets_key] if is_jpeg else None

        if class_names is None:
            names: dict[int, str] = {}
        elif isinstance(class_names, Mapping):
            names = {int(k): str(v) for k, v in class_names.items()}
        else:
            names = dict(enumerate(map(str, class_names)))
            num_classes = len(class_names) if num_classes is None else num_classes
        if num_classes is None:
            num_classes = int(labels.max()) + 1
        width = len(str(max(num_classes - 1, 0)))
        folders = [_folder_name(k, width, names.get(k)) for k in range(num_classes)]
        file_width = len(str(max(n_total - 1, 0)))

        # compress_level=1: still lossless, several times faster than the default for 10k files
        save_kwargs = {"compress_level": 1} if fmt.lower() == "png" else {}
        out_dir.mkdir(parents=True, exist_ok=True)
        for row in rows:
            label = int(labels[row])
            if not 0 <= label < num_classes:
                raise ValueError(f"label {label} of image {row} outside 0..{num_classes - 1}")
            class_dir = out_dir / folders[label]
            class_dir.mkdir(exist_ok=True)
            if is_jpeg:
                blob = images[offsets[row]:offsets[row + 1]]
                (class_dir / f"{row:0{file_width}d}.jpg").write_bytes(blob.tobytes())
            else:
                img = np.ascontiguousarray(images[row])
                # PIL infers 'L' for uint8 HxW and 'RGB' for uint8 HxWx3
                if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[-1] == 3)):
                    raise ValueError(f"expected uint8 HxW or HxWx3 images, got {img.dtype} {img.shape}")
                Image.fromarray(img).save(class_dir / f"{row:0{file_width}d}.{fmt}", **save_kwargs)
    (out_dir / CLASS_MAP_FILE).write_text("".join(f + "\n" for f in folders))
    return out_dir


def _first_n(n: int | None, total: int) -> np.ndarray:
    return np.arange(total if n is None else min(n, total))


def _class_names(npz: Path) -> list[str]:
    with np.load(npz, allow_pickle=False) as data:
        return [str(c) for c in data["class_names"]]


def cifar10_test_folder(root: str | os.PathLike, n: int | None = None) -> Path:
    """The first `n` (default all 1000) lossless CIFAR-10 test images as PNGs, labels 0-9."""
    npz = require_shared_data(CIFAR10_TEST) / CIFAR10_TEST
    out = Path(root) / ("cifar10_test" if n is None else f"cifar10_test_{n}")
    return write_image_folder(npz, out, class_names=_class_names(npz), indices=_first_n(n, 1000))


def cifar10_calib_folder(root: str | os.PathLike, n: int | None = None) -> Path:
    """`n` (default all 1000) CIFAR-10 TRAINING JPEGs for calibration, written byte-for-byte.

    The file is ordered class by class, so a subset is taken round-robin over classes
    (0th image of each class, then the 1st, ...) to stay class-balanced.
    """
    npz = require_shared_data(CIFAR10_CALIB) / CIFAR10_CALIB
    with np.load(npz, allow_pickle=False) as data:
        order = np.lexsort((data["labels"], data["index_in_class"]))
    rows = order if n is None else np.sort(order[:n])
    out = Path(root) / ("cifar10_calib" if n is None else f"cifar10_calib_{n}")
    return write_image_folder(npz, out, images_key="jpeg", class_names=_class_names(npz), indices=rows)


def mnist_test_folder(root: str | os.PathLike, n: int | None = None) -> Path:
    """The first `n` (default all 10000) MNIST test digits as grayscale PNGs, labels 0-9.

    Load with ``input_img_mode='L'`` (timm converts to RGB by default).
    """
    npz = require_shared_data(MNIST_TEST) / MNIST_TEST
    out = Path(root) / ("mnist_test" if n is None else f"mnist_test_{n}")
    return write_image_folder(npz, out, class_names=[str(i) for i in range(10)], indices=_first_n(n, 10000))


def imagenet_samples_folder(root: str | os.PathLike, indices: Sequence[int] | None = None) -> Path:
    """ImageNet sample JPEGs (224x224, one per even class 0..998) written byte-for-byte.

    Folders are ``<class index>_<wnid>``; class_map.txt lists all 1000 classes so that,
    loaded through :func:`timm_dataset`, target == standard ImageNet-1k index even though the
    odd classes have no images. `indices` are rows of the .npz (0..499), not class indices.
    """
    npz = require_shared_data(IMAGENET_SAMPLES) / IMAGENET_SAMPLES
    with np.load(npz, allow_pickle=False) as data:
        names = {int(label): str(wnid) for label, wnid in zip(data["labels"], data["wnids"])}
    try:  # full wnid list, so class_map.txt names the missing odd classes too
        from timm.data import ImageNetInfo

        synsets = list(ImageNetInfo().label_names())
        if len(synsets) == 1000 and all(synsets[k] == w for k, w in names.items()):
            names = dict(enumerate(synsets))
    except ImportError:
        pass
    # distinct subsets get distinct folders under one root
    suffix = "" if indices is None else f"_{zlib.crc32(np.asarray(indices, dtype=np.int64).tobytes()):08x}"
    out = Path(root) / f"imagenet_samples{suffix}"
    return write_image_folder(npz, out, images_key="jpeg", class_names=names, indices=indices, num_classes=1000)


def timm_dataset(folder: str | os.PathLike, transform=None, input_img_mode: str = "RGB"):
    """timm folder dataset over a tree from :func:`write_image_folder`, labels via its class map."""
    from timm.data import create_dataset

    folder = Path(folder)
    class_map = folder / CLASS_MAP_FILE
    return create_dataset(
        "",
        root=str(folder),
        split="",
        class_map=str(class_map) if class_map.is_file() else None,
        transform=transform,
        input_img_mode=input_img_mode,
    )
