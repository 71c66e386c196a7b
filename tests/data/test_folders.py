"""Data sources timm's dataset factory reads: image folders and tar archives give the same batches."""

import tarfile

import torch

import cli_models
from pconv.data.folders import image_loader

CONFIG = dict(input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0)


def test_tar_archive_reads_like_the_folder(tmp_path):
    folder = cli_models.write_random_folder(tmp_path / "images", per_class=3, seed=4)
    archive = tmp_path / "images.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(folder.rglob("*.png")):
            tar.add(path, arcname=str(path.relative_to(folder)))
    from_folder = list(image_loader(folder, CONFIG, batch_size=4))
    from_tar = list(image_loader(archive, CONFIG, batch_size=4))
    assert len(from_folder) == len(from_tar) == 3
    for (xa, ya), (xb, yb) in zip(from_folder, from_tar):
        assert torch.equal(xa, xb) and torch.equal(ya, yb.long())
