"""Data configs: the preprocessing a model expects, in timm's vocabulary (input_size, mean, std,
interpolation, crop_pct, crop_mode), read from a model and checked wherever one comes from."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ..errors import ConfigError

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")
REQUIRED_KEYS = ("input_size", "mean", "std")


def _numbers(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf") for v in value)


def check_data_config(cfg: Any, partial: bool = False) -> dict[str, Any]:
    """A validated copy of a timm-style data config (tuples as lists); ConfigError names the bad key.
    `partial`: the keys may be missing (a file made from a model without a data config)."""
    if not isinstance(cfg, Mapping):
        raise ConfigError("the data config is not an object", "it maps timm's keys (input_size, mean, std, ...)")
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}
    size = out.get("input_size")
    if size is not None and not (isinstance(size, list) and len(size) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
        raise ConfigError(f"input_size {size!r} is not [channels, height, width]", "for example [3, 224, 224]")
    for key in ("mean", "std"):
        value = out.get(key)
        if value is None:
            continue
        if not _numbers(value):
            raise ConfigError(f"{key} {value!r} is not a list of numbers", "for example [0.485, 0.456, 0.406]")
        if size is not None and len(value) != size[0]:
            raise ConfigError(f"{key} has {len(value)} values for {size[0]} input channels",
                              f"give {size[0]} values")
    if out.get("std") is not None and min(out["std"]) <= 0:
        raise ConfigError("std values must be positive", "for example [0.229, 0.224, 0.225]")
    if "interpolation" in out and out["interpolation"] not in INTERPOLATIONS:
        raise ConfigError(f"interpolation {out['interpolation']!r} is unknown", f"use one of {', '.join(INTERPOLATIONS)}")
    crop = out.get("crop_pct")
    if crop is not None and not (_numbers([crop]) and 0 < crop <= 4):
        raise ConfigError(f"crop_pct {crop!r} is not a fraction in (0, 4]", "for example 0.875")
    if "crop_mode" in out and out["crop_mode"] not in CROP_MODES:
        raise ConfigError(f"crop_mode {out['crop_mode']!r} is unknown", f"use one of {', '.join(CROP_MODES)}")
    if not partial:
        for key in REQUIRED_KEYS:
            if out.get(key) is None:
                raise ConfigError(f"the model's data config has no {key!r}",
                                  "pass --mean/--std/--input-size, or give the model a timm-style pretrained_cfg")
    return out


def data_config_of(model: nn.Module, use_test_size: bool = True) -> dict[str, Any]:
    """The model's data config as timm's validate.py resolves it: its test input size and test crop where its
    pretrained_cfg has them (`use_test_size`, validate.py without --use-train-size), else the training ones.
    {} for a model without a pretrained_cfg (timm would make one up)."""
    from timm.data import resolve_data_config

    if not (getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)):
        return {}
    try:
        cfg = resolve_data_config({}, model=model, use_test_size=use_test_size)
    except Exception:
        return {}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def override_data_config(cfg: Mapping[str, Any], input_size=None, img_size=None, mean=None, std=None,
                         interpolation=None, crop_pct=None, crop_mode=None) -> dict[str, Any]:
    """`cfg` with the given entries replaced, as validate.py's arguments replace them (`img_size` sets a square
    input of the same channels; one mean or std value stands for every channel), then checked."""
    out = dict(cfg)
    channels = (out.get("input_size") or (3,))[0]
    if input_size is not None:
        size = tuple(input_size)
        out["input_size"] = list(size if len(size) == 3 else (channels, *(size * 2 if len(size) == 1 else size)))
    if img_size is not None:
        out["input_size"] = [(out.get("input_size") or (channels,))[0], int(img_size), int(img_size)]
    channels = out.get("input_size", [channels])[0]
    for key, value in (("mean", mean), ("std", std)):
        if value is not None:
            out[key] = list(value) * channels if len(value) == 1 else list(value)
    for key, value in (("interpolation", interpolation), ("crop_pct", crop_pct), ("crop_mode", crop_mode)):
        if value is not None:
            out[key] = value
    return check_data_config(out)
