"""Calibration images for the many passes calibration makes over them.

They are decoded once and kept in memory while they fit in their share of the memory budget. Past it, a
re-iterable source (a DataLoader, a list) is read again on every pass instead, so memory stays bounded
however many images there are; a one-shot iterator has to be kept whole. Labels, if any, are dropped.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

from torch import Tensor

from ..errors import DataError
from ..utils.memory import tensor_bytes


def images_of(item: Any) -> Tensor:
    x = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(x, Tensor):
        raise DataError(f"calibration batches must be tensors or (x, y) pairs, got {type(x).__name__}",
                        "pass a DataLoader or a list of image tensors")
    return x


def first_batch(data: Tensor | Iterable) -> tuple[Tensor, Iterable]:
    """The first batch of images (to probe the model with) and an iterable that still yields all of them."""
    if isinstance(data, Tensor):
        return data, [data]
    iterator = iter(data)
    try:
        first = next(iterator)
    except StopIteration:
        raise DataError("no calibration images", "pass at least one batch of images") from None
    rest = data if iterator is not data else itertools.chain([first], iterator)  # re-iterable: keep it so
    return images_of(first), rest


class ImageBatches:
    """Re-iterable batches of calibration images: held while they take at most `hold_bytes`, else re-read."""

    def __init__(self, data: Tensor | Iterable, num_images: int | None = None, hold_bytes: int = 2 * 1024**3):
        if isinstance(data, Tensor):
            data = [data]
        self._source = data
        self._limit = num_images
        self._held: list[Tensor] | None = []
        self._batches = 0
        reiterable = iter(data) is not data
        held_bytes = 0
        for x in self._read():
            held_bytes += tensor_bytes(x)
            if held_bytes > hold_bytes and reiterable:
                self._held = None  # stream from the source on every pass
                break
            self._held.append(x)
        self.num_images = sum(x.shape[0] for x in self._held) if self._held is not None else self._count()
        if self.num_images == 0:
            raise DataError("no calibration images", "pass at least one batch of images")
        if num_images is not None and self.num_images < num_images:
            raise DataError(f"asked for {num_images} calibration images but only {self.num_images} are available",
                            "lower --num-images or add images")

    @property
    def streaming(self) -> bool:
        return self._held is None

    @property
    def held_bytes(self) -> int:
        """Bytes of the images kept in memory (0 when streaming)."""
        return 0 if self._held is None else sum(tensor_bytes(x) for x in self._held)

    def _read(self) -> Iterator[Tensor]:
        seen = 0
        for item in self._source:
            x = images_of(item)
            if self._limit is not None and seen + x.shape[0] > self._limit:
                x = x[: self._limit - seen]
            if x.shape[0]:
                seen += x.shape[0]
                yield x
            if self._limit is not None and seen >= self._limit:
                return

    def _count(self) -> int:
        self._batches = images = 0
        for x in self._read():
            self._batches += 1
            images += x.shape[0]
        return images

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self._held) if self._held is not None else self._read()

    def __len__(self) -> int:
        return len(self._held) if self._held is not None else self._batches
