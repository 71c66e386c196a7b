"""Build the source ANN: a timm model name or a factory (`package.module:function`), plus weights from a
local checkpoint, loaded weights-only and strictly.

Trust. A file pconv reads names the architecture it was made from; it never carries code. Building that
architecture runs code only for a registered timm model, one of pconv's own architectures (OWN_FACTORIES,
looked up in a table, never imported by the path the file gives), or a factory the user vouches for
(`trust_factory=True`, `--trust-factory`), as Hugging Face's `trust_remote_code`. The keyword arguments a file
records are plain JSON values and never name weights, files or URLs (check_kwargs).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..errors import ConfigError, ModelLoadError
from . import timm_models
from .checkpoints import load_weights, read_state_dict

class ModelKind(str, Enum):
    """How a source names its architecture."""

    TIMM = "timm"  # a model timm has registered
    FACTORY = "factory"  # a function, by import path: pconv's own (OWN table) or the user's


KINDS = tuple(kind.value for kind in ModelKind)
#: `package.module:function` (attribute paths allowed after the colon), nothing else.
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
#: Keyword arguments that would make building the architecture read weights or files, or reach the network.
_FORBIDDEN_KWARGS = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
                     "checkpoint_path", "checkpoint", "cache_dir", "file", "url", "hf_hub_id", "weights",
                     "weights_path", "state_dict"}
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar", ".npz", ".pkl", ".pickle", ".h5")


def _own_factories() -> dict[str, tuple[Callable[..., nn.Module], bool]]:
    """pconv's own architectures by the name files record: (factory, whether it loads its own weights).
    A table, so a recorded name is looked up, never imported."""
    from . import pretrained, zoo

    return {
        "pconv.zoo:cifar10_resnet20": (zoo.cifar10_resnet20, False),
        "pconv.zoo:mnist_lenet5": (zoo.mnist_lenet5, False),
        "pconv.zoo:cifar10_cnn": (zoo.cifar10_cnn, False),
        "pconv.pretrained:tf_efficientnet_lite0": (pretrained.tf_efficientnet_lite0, True),
        "pconv.pretrained:tf_efficientnet_lite1": (pretrained.tf_efficientnet_lite1, True),
        "pconv.pretrained:tf_efficientnet_lite2": (pretrained.tf_efficientnet_lite2, True),
    }


def own_factory_names() -> list[str]:
    return list(_own_factories())


def _is_plain_json(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return not isinstance(value, float) or value == value and abs(value) != float("inf")
    if isinstance(value, list):
        return all(_is_plain_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain_json(v) for k, v in value.items())
    return False


def _looks_like_a_location(text: str) -> bool:
    lowered = text.lower()
    return ("://" in text or "/" in text or "\\" in text or lowered.startswith("hf-hub:")
            or lowered.endswith(_WEIGHT_SUFFIXES))


def check_kwargs(kwargs: Any, origin: str = "the model's keyword arguments") -> dict[str, Any]:
    """The architecture's keyword arguments, refused unless they are plain JSON values that name no weights,
    file or URL (a file must not be able to make pconv read or fetch anything while building a model)."""
    if not isinstance(kwargs, dict) or not _is_plain_json(kwargs):
        raise ModelLoadError(f"{origin} are not plain JSON values", "the file is corrupt")
    for key, value in kwargs.items():
        if key in _FORBIDDEN_KWARGS:
            raise ModelLoadError(f"{origin} set {key!r}, which would load weights or files while building the "
                                 "architecture", "weights travel in the file itself; remove the entry")
        strings = [value] if isinstance(value, str) else [v for v in (value if isinstance(value, list) else [])
                                                            if isinstance(v, str)]
        for text in strings:
            if _looks_like_a_location(text):
                raise ModelLoadError(f"{origin} set {key!r} to {text!r}, a path or URL",
                                     "a file may name an architecture and its options, never a location")
    return dict(kwargs)


@dataclass(frozen=True)
class ModelSource:
    """How to rebuild the architecture offline: timm name or factory import path, and its kwargs."""

    kind: ModelKind
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "kind", ModelKind(self.kind))

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind.value, "name": self.name, "kwargs": self.kwargs}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSource":
        """Parse and validate the `model` entry of a file (raises ModelLoadError naming what is wrong)."""
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, TypeError):
            raise ModelLoadError("the 'model' metadata entry is not JSON", "the file is corrupt") from None
        if not isinstance(d, dict) or set(d) - {"kind", "name", "kwargs"} or d.get("kind") not in KINDS \
                or not isinstance(d.get("name"), str) or not d["name"]:
            raise ModelLoadError("the 'model' metadata entry is malformed",
                                 "expected {\"kind\": \"timm\" | \"factory\", \"name\": ..., \"kwargs\": {...}}")
        if d["kind"] == "factory" and not _IMPORT_PATH.match(d["name"]):
            raise ModelLoadError(f"the factory {d['name']!r} in the 'model' metadata entry is not an import path",
                                 "the file is corrupt")
        if d["kind"] == "timm" and not timm_models.TIMM_NAME.match(d["name"]):
            raise ModelLoadError(f"the timm model {d['name']!r} in the 'model' metadata entry is not an architecture "
                                 "name", "a file names an architecture (and a pretrained tag), never a hub or a path")
        return cls(d["kind"], d["name"], check_kwargs(d.get("kwargs", {}), "the 'model' metadata entry's kwargs"))

    @property
    def is_own(self) -> bool:
        """One of pconv's own architectures (built without trust)."""
        return self.kind is ModelKind.FACTORY and self.name in _own_factories()

    @property
    def needs_trust(self) -> bool:
        """Building it runs code that is neither timm's nor pconv's: only with the user's say-so."""
        return self.kind is ModelKind.FACTORY and not self.is_own

    @property
    def brings_weights(self) -> bool:
        """Whether building it loads real weights (pconv's packaged pretrained models); a user's factory is
        taken to bring its own, as pconv cannot know."""
        if self.kind is ModelKind.TIMM:
            return False
        own = _own_factories().get(self.name)
        return own[1] if own else True

    def build(self, trust_factory: bool = False) -> nn.Module:
        """The architecture. A user's factory runs only with `trust_factory`."""
        if self.kind is ModelKind.TIMM:
            return timm_models.create(self.name, check_kwargs(self.kwargs), pretrained=False)
        own = _own_factories().get(self.name)
        if own is not None:
            return _checked_module(own[0](**check_kwargs(self.kwargs)), self.name)
        if not trust_factory:
            raise UntrustedFactoryError(self.name)
        return _call_factory(self.name, self.kwargs)


class UntrustedFactoryError(ModelLoadError):
    """A file names a factory of the user's; running it needs the user's say-so."""

    def __init__(self, name: str):
        super().__init__(f"the file's architecture is built by the factory {name!r}, which would run code "
                         "that is neither timm's nor pconv's",
                         f"if you trust the code at {name}, pass --trust-factory (trust_factory=True in Python)")
        self.factory = name


def parse_model_spec(spec: str, num_classes: int | None = None, **kwargs: Any) -> ModelSource:
    """`resnet18`, `resnet50.a1_in1k`, `hf-hub:timm/resnet50.a1_in1k` -> timm; `package.module:function` -> a
    factory (pconv's own, or the user's)."""
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    kind = ModelKind.FACTORY if ":" in spec and not timm_models.is_sourced(spec) else ModelKind.TIMM
    if kind is ModelKind.FACTORY and not _IMPORT_PATH.match(spec):
        raise ModelLoadError(f"{spec!r} is neither a timm model name nor an import path",
                             "write a factory as package.module:function")
    return ModelSource(kind, spec, kwargs)


def _checked_module(model: Any, name: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"factory {name!r} returned {type(model).__name__}, not an nn.Module",
                             "the factory must return the model")
    return model


def _call_factory(path: str, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attr = path.partition(":")
    # Like `python -m`, look in the working directory too: a user's factory usually lives next to them.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelLoadError(f"cannot import {module_name!r} for factory {path!r}: {e}",
                             "check the import path and PYTHONPATH") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelLoadError(f"{module_name!r} has no attribute {attr!r}",
                                 "write the factory as package.module:function")
    return _checked_module(factory(**kwargs), path)


def source_of(model: nn.Module) -> ModelSource | None:
    """The source recorded on a model by `create_model`, else inferred for timm models."""
    recorded = getattr(model, "pconv_source", None)
    if isinstance(recorded, ModelSource):
        return recorded
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if arch and ":" not in arch:
        import timm

        if timm.is_model(arch):
            return ModelSource(ModelKind.TIMM, arch, {"num_classes": _num_classes(model)})
    if arch and ":" in arch and _IMPORT_PATH.match(arch):
        return ModelSource(ModelKind.FACTORY, arch, {})
    return None


def _num_classes(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    return int(model.pretrained_cfg.get("num_classes", 1000))


def create_model(spec: str | ModelSource, checkpoint: str | Path | None = None, num_classes: int | None = None,
                 pretrained: bool = False, random_weights: bool = False, use_ema: bool = False,
                 **kwargs: Any) -> nn.Module:
    """The source ANN in eval mode, remembering how to rebuild it (`model.pconv_source`).

    Weights come from `checkpoint` (any format timm reads, weights-only; `use_ema` takes its EMA weights),
    from timm's pretrained weights (`pretrained=True`, through the local Hugging Face cache), or from a factory
    that brings its own (pconv.pretrained, or the user's, which pconv cannot check). A timm architecture or one
    of pconv's zoo without any of these is refused unless `random_weights=True` (tests, speed benchmarks):
    nothing converts random weights by accident. The caller names the model, so a factory given here is run."""
    source = spec if isinstance(spec, ModelSource) else parse_model_spec(spec, num_classes, **kwargs)
    if checkpoint is not None and pretrained:
        raise ConfigError("give either a checkpoint or pretrained weights, not both", "drop --pretrained or --checkpoint")
    if pretrained and source.kind is not ModelKind.TIMM:
        raise ConfigError(f"--pretrained loads timm's weights, and {source.name!r} is a factory",
                          "a factory brings its own weights; pass --checkpoint FILE for others")
    if source.kind is ModelKind.TIMM:
        timm_models.check_name(source.name)
    if checkpoint is None and not pretrained and not random_weights and not source.brings_weights:
        raise ModelLoadError(f"{source.name!r} has no weights: without a checkpoint it would be randomly "
                             "initialised", "pass --pretrained (timm's weights), --checkpoint FILE, or "
                                            "--random-weights for tests and speed benchmarks")
    if source.kind is ModelKind.TIMM:
        model = timm_models.create(source.name, check_kwargs(source.kwargs), pretrained=pretrained)
        source = ModelSource(ModelKind.TIMM, timm_models.recorded_name(model, source.name),
                             check_kwargs(timm_models.model_kwargs(model, source.kwargs)))
    else:
        model = source.build(trust_factory=True)
    if checkpoint is not None:
        load_weights(model, read_state_dict(checkpoint, use_ema=use_ema), f"checkpoint {str(checkpoint)!r}")
    model.pconv_source = source
    return model.eval()
