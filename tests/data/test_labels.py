"""Evaluation labels are the model's class indices or refused; calibration takes any folder of images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import pconv
from pconv import DataError
from pconv.cli.main import cli
from pconv.data.folders import class_indices, image_loader, read_class_map

CONFIG = dict(input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0)
CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_folder(root: Path, names: list[str], per_class: int = 2, flat: int = 0) -> Path:
    rng = np.random.default_rng(0)
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    root.mkdir(parents=True, exist_ok=True)
    for i in range(flat):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"loose{i}.png")
    return root


def labels(folder, num_classes, class_map=None) -> dict[str, set[int]]:
    """{class folder: labels its images got} through pconv's loader."""
    loader = image_loader(folder, CONFIG, batch_size=1, num_classes=num_classes, class_map=class_map)
    found: dict[str, set[int]] = {}
    for (x, y), (path, _) in zip(loader, loader.dataset.dataset.reader.samples):
        found.setdefault(Path(path).parent.name, set()).add(int(y))
    return found


# --- the rules, one by one ---------------------------------------------------------------------------------


def test_a_class_map_numbers_a_subset_of_the_classes(tmp_path):
    folder = write_folder(tmp_path / "five", ["cat", "deer", "frog", "ship", "truck"])
    (folder / "class_map.txt").write_text("\n".join(CIFAR) + "\n")
    assert labels(folder, 10) == {"cat": {3}, "deer": {4}, "frog": {6}, "ship": {8}, "truck": {9}}
    other = tmp_path / "map.txt"  # --class-map FILE wins over the folder's own
    other.write_text("\n".join(reversed(CIFAR)))
    assert labels(folder, 10, other)["cat"] == {6}


def test_without_a_map_a_subset_of_named_classes_is_refused(tmp_path):
    folder = write_folder(tmp_path / "five", ["cat", "deer", "frog", "ship", "truck"])
    with pytest.raises(DataError, match="5 classes .* cannot be matched to the model's 10 outputs") as info:
        image_loader(folder, CONFIG, num_classes=10)
    assert "--class-map" in info.value.hint


def test_folders_named_by_class_index(tmp_path):
    folder = write_folder(tmp_path / "indexed", ["3", "007", "9"])
    assert labels(folder, 10) == {"3": {3}, "007": {7}, "9": {9}}
    with pytest.raises(DataError, match="beyond the model's 5 classes"):
        image_loader(folder, CONFIG, num_classes=5)


def test_imagenet_wnids_for_a_1000_class_model(tmp_path):
    folder = write_folder(tmp_path / "wnids", ["n01440764", "n01443537", "n15075141"])  # classes 0, 1, 999
    assert labels(folder, 1000) == {"n01440764": {0}, "n01443537": {1}, "n15075141": {999}}
    with pytest.raises(DataError, match="cannot be matched"):  # wnids mean nothing to a 10-class model
        image_loader(folder, CONFIG, num_classes=10)


def test_sorted_names_only_when_the_counts_agree(tmp_path):
    folder = write_folder(tmp_path / "three", ["cherry", "apple", "banana"])
    assert labels(folder, 3) == {"apple": {0}, "banana": {1}, "cherry": {2}}
    with pytest.raises(DataError, match="3 classes"):
        image_loader(folder, CONFIG, num_classes=4)


def test_images_outside_class_folders_have_no_label(tmp_path):
    folder = write_folder(tmp_path / "flat", [], flat=3)
    with pytest.raises(DataError, match="outside class subfolders"):
        image_loader(folder, CONFIG, num_classes=3)
    mixed = write_folder(tmp_path / "mixed", ["a", "b", "c"], flat=1)
    with pytest.raises(DataError, match="outside class subfolders"):
        image_loader(mixed, CONFIG, num_classes=3)


def test_a_class_map_must_list_every_folder_and_fit_the_model(tmp_path):
    folder = write_folder(tmp_path / "f", ["cat", "dog", "fox"])
    (folder / "class_map.txt").write_text("cat\ndog\n")
    with pytest.raises(DataError, match="does not list the folders 'fox'"):
        image_loader(folder, CONFIG, num_classes=10)
    (folder / "class_map.txt").write_text("cat\ndog\nfox\n")
    with pytest.raises(DataError, match="lists 3 classes, the model has 2"):
        image_loader(folder, CONFIG, num_classes=2)


@pytest.mark.parametrize("content, suffix, needle", [
    ("cat\n\ndog\n", ".txt", "empty line"),
    ("cat\ncat\n", ".txt", "twice"),
    ("", ".txt", "no names"),
    ("cat\n", ".pkl", "not a .txt file"),
])
def test_bad_class_maps(tmp_path, content, suffix, needle):
    path = tmp_path / f"map{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=needle):
        read_class_map(path)


def test_class_indices_is_the_one_rule():
    assert class_indices(["b", "a"], 2) == {"a": 0, "b": 1}
    assert class_indices(["x"], 5, class_map=["w", "x"]) == {"x": 1}
    with pytest.raises(DataError):
        class_indices(["a"], 2)


# --- through the CLI -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def snn10(tmp_path_factory):
    """A 10-class tiny SNN file (random folders give random accuracy; only the labels matter here)."""
    root = tmp_path_factory.mktemp("labels")
    calib = write_folder(root / "calib_flat", [], flat=6)  # calibration: any folder of images, no labels
    path = root / "snn10.safetensors"
    result = CliRunner().invoke(cli, ["convert", "cli_models:tiny_cnn", "--num-classes", "10", "--data",
                                      str(calib), "-T", "2", "-o", str(path), "--calibration", "none", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["calibrated_on"].startswith("6 images")
    return path


def eval_cli(snn, folder, *extra):
    return CliRunner().invoke(cli, ["eval", str(snn), "--trust-factory", "--data", str(folder), "--sop-images", "0",
                                    "--json", *map(str, extra)])


def test_eval_refuses_what_it_cannot_label(snn10, tmp_path):
    flat = write_folder(tmp_path / "flat", [], flat=2)
    subset = write_folder(tmp_path / "five", ["cat", "deer", "frog", "ship", "truck"])
    for folder, needle in ((flat, "outside class subfolders"), (subset, "cannot be matched")):
        result = eval_cli(snn10, folder)
        assert result.exit_code == 1 and result.stdout == ""
        assert result.stderr.startswith("Error: ") and needle in result.stderr


def test_eval_with_a_class_map_file(snn10, tmp_path):
    subset = write_folder(tmp_path / "five", ["cat", "deer", "frog", "ship", "truck"])
    class_map = tmp_path / "cifar10_classes.txt"
    class_map.write_text("\n".join(CIFAR) + "\n")
    result = eval_cli(snn10, subset, "--class-map", class_map)
    assert result.exit_code == 0, result.stderr
    snn = pconv.load(snn10, trust_factory=True)
    loader = image_loader(subset, snn.info.data_config, num_classes=10, class_map=class_map)
    assert sorted({int(y) for _, ys in loader for y in ys}) == [3, 4, 6, 8, 9]
    assert json.loads(result.stdout)["num_images"] == 10
    shutil.copy(class_map, subset / "class_map.txt")  # the folder's own class map, found without the flag
    assert eval_cli(snn10, subset).exit_code == 0
