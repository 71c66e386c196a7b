"""Build the source ANN: a timm model name or a user's factory (`package.module:function`), plus
weights from a local checkpoint, loaded weights-only and strictly."""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelLoadError
from .registry import close_matches


@dataclass(frozen=True)
class ModelSource:
    """How to rebuild the architecture offline: timm name or factory import path, and its kwargs."""

    kind: str  # "timm" | "factory"
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSource":
        return cls(**json.loads(text))

    def build(self) -> nn.Module:
        if self.kind == "timm":
            return _create_timm(self.name, self.kwargs)
        if self.kind == "factory":
            return _call_factory(self.name, self.kwargs)
        raise ModelLoadError(f"unknown model kind {self.kind!r}", "expected 'timm' or 'factory'")


def parse_model_spec(spec: str, num_classes: int | None = None, **kwargs: Any) -> ModelSource:
    """`resnet18` -> timm; `package.module:function` -> a user's factory."""
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    kind = "factory" if ":" in spec else "timm"
    return ModelSource(kind, spec, kwargs)


def _create_timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see `timm.list_models()` for valid names"
        raise ModelLoadError(f"unknown timm model {name!r}", hint)
    return timm.create_model(name, pretrained=False, **kwargs)


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
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"factory {path!r} returned {type(model).__name__}, not an nn.Module",
                             "the factory must return the model")
    return model


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
            return ModelSource("timm", arch, {"num_classes": _num_classes(model)})
    if arch and ":" in arch:
        return ModelSource("factory", arch, {})
    return None


def _num_classes(model: nn.Module) -> int:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    return int(model.pretrained_cfg.get("num_classes", 1000))


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, never executing code from it."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {str(path)!r} does not exist", "check the --checkpoint path")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or truncated files raise a zoo of types
        raise ModelLoadError(f"cannot read checkpoint {str(path)!r}: {str(e).splitlines()[0][:200]}",
                             "the file is corrupt, truncated, or not a weights file (only tensors are loaded)") from None
    for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"checkpoint {str(path)!r} holds no state dict of tensors",
                             "save it with torch.save(model.state_dict(), path) or safetensors")
    if state and all(k.startswith("module.") for k in state):  # DataParallel prefix
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], origin: str = "checkpoint") -> None:
    """Strict load with a one-line account of what does not fit."""
    own = model.state_dict()
    # BatchNorm's num_batches_tracked counter is absent from many checkpoints; torch fills it in.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} of wrong shape (e.g. {wrong[0]})")
        raise ModelLoadError(f"{origin} does not fit the model: " + "; ".join(parts),
                             "check the model name and --num-classes against the checkpoint")
    model.load_state_dict(state, strict=True)


def add_missing_biases(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give a conv/linear layer the bias `state` holds for it when it has none (a layer refit adds them)."""
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        if leaf != "bias" or not owner:
            continue
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and module.bias is None \
                and value.dim() == 1 and value.shape[0] == module.weight.shape[0]:
            module.bias = nn.Parameter(torch.zeros_like(value, device=module.weight.device,
                                                        dtype=module.weight.dtype))


def replace_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Overwrite (or add, for a missing conv/linear bias) the given state-dict entries of `model`."""
    if not state:
        return
    add_missing_biases(model, state)
    own = model.state_dict()
    unknown = [k for k in state if k not in own or own[k].shape != state[k].shape]
    if unknown:
        raise ModelLoadError(f"refitted weight {unknown[0]!r} does not fit the model",
                             "use the calibration made for this model")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)


def create_model(spec: str | ModelSource, checkpoint: str | Path | None = None,
                 num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """The source ANN in eval mode, remembering how it was built (`model.pconv_source`)."""
    source = spec if isinstance(spec, ModelSource) else parse_model_spec(spec, num_classes, **kwargs)
    model = source.build()
    if checkpoint is not None:
        load_weights(model, read_state_dict(checkpoint), f"checkpoint {str(checkpoint)!r}")
    model.pconv_source = source
    return model.eval()


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's state dict (names, dtypes, shapes, values): tells calibrations of other weights apart."""
    import hashlib

    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
