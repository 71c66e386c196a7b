"""Which positions of each image a calibration looks at: chosen by the image itself.

`refit` works on a sample of the positions where a layer sees its input (`recon` draws its steps' images the
same way; `fit` needs no sample: it bins every position). Each image contributes the same number of
positions, drawn with a seed made from a digest of the image's pixels and the layer's name. So the sample is the same however the images are batched, ordered, streamed or sharded
over processes: a streamed calibration equals a whole-set one, and `torchrun` equals one process.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor


def image_keys(images: Tensor) -> list[bytes]:
    """A digest of each image's bytes (dimension 0 indexes the images)."""
    flat = images.detach().to("cpu").contiguous().reshape(images.shape[0], -1)
    raw = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
    return [hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() for row in raw]


def per_image(total_wanted: int, num_images: int) -> int:
    """Positions each image contributes so that all images together give at least `total_wanted`."""
    return max(1, math.ceil(total_wanted / max(num_images, 1)))


def image_generator(key: bytes, salt: str) -> torch.Generator:
    """A generator seeded by one image's key and `salt` (a site's or a block's name)."""
    seed = int.from_bytes(hashlib.blake2b(key + salt.encode(), digest_size=8).digest(), "little") >> 1
    return torch.Generator().manual_seed(seed)


def uniform_draws(keys: list[bytes], salt: str, count: int) -> Tensor:
    """[images, count] uniform numbers in [0, 1), each image's row drawn from its own generator."""
    rows = [torch.rand(count, generator=image_generator(key, salt), dtype=torch.float64) for key in keys]
    return torch.stack(rows) if rows else torch.zeros(0, count, dtype=torch.float64)


def sample_index(keys: list[bytes], salt: str, positions: int, count: int, device: torch.device) -> Tensor | None:
    """Flat indices into `len(keys) * positions` (image-major): `count` positions of each image, drawn (with
    replacement) from a generator seeded by the image's key and `salt`. None when `count` covers them all."""
    if count >= positions:
        return None
    picks = []
    for i, key in enumerate(keys):
        picks.append(torch.randint(0, positions, (count,), generator=image_generator(key, salt)) + i * positions)
    return torch.cat(picks).to(device)
