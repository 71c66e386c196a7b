"""Weights: checkpoint files read weights-only, strict loading with a one-line account of what does not fit,
and the fingerprint that ties a calibration to the weights it was made for."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError


def read_state_dict(path: str | Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint, read weights-only by timm's own loader: a state dict, a safetensors file, or a
    timm training checkpoint (`state_dict`, `state_dict_ema`/`model_ema`, and an argparse.Namespace under `args`,
    the one non-tensor type timm allows), with the prefixes of DataParallel and torch.compile removed.
    `use_ema` takes the EMA weights (validate.py's --use-ema) and refuses a checkpoint without them."""
    from timm.models import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {str(path)!r} does not exist", "check the --checkpoint path")
    if use_ema and not _has_ema(path):
        raise ModelLoadError(f"checkpoint {str(path)!r} holds no EMA weights (no state_dict_ema or model_ema)",
                             "drop --use-ema to load its state_dict")
    try:
        with warnings.catch_warnings():  # torch warns about the very objects it then refuses
            warnings.simplefilter("ignore")
            state = load_state_dict(str(path), use_ema=use_ema, device="cpu", weights_only=True)
    except Exception as e:  # corrupt or truncated files raise a zoo of types
        raise _unreadable_checkpoint(path, e) from None
    if isinstance(state, dict) and isinstance(state.get("model_state_dict"), dict):
        state = state["model_state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"checkpoint {str(path)!r} holds no state dict of tensors",
                             "save it with torch.save(model.state_dict(), path) or safetensors")
    return state


def _has_ema(path: Path) -> bool:
    """Whether a checkpoint holds EMA weights, from its top-level keys (memory-mapped, weights-only)."""
    if path.suffix == ".safetensors":
        return False
    import argparse

    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            warnings.simplefilter("ignore")
            top = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # let the loader report an unreadable file
        return True
    return isinstance(top, dict) and any(isinstance(top.get(k), dict) for k in ("state_dict_ema", "model_ema"))


def _unreadable_checkpoint(path: Path, error: Exception) -> ModelLoadError:
    text = str(error)
    if "Weights only load failed" in text or "weights_only" in text or "pickle globals" in text:
        return ModelLoadError(f"checkpoint {str(path)!r} holds Python objects besides tensors (a pickled model or "
                              "training state), and pconv loads checkpoints weights-only, so it never runs code "
                              "from a file",
                              "save the weights alone: torch.save(model.state_dict(), path), or a .safetensors file")
    first = text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
    return ModelLoadError(f"cannot read checkpoint {str(path)!r}: {first}",
                          "the file is corrupt, truncated, or not a weights file")


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


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's state dict (names, dtypes, shapes, values): tells calibrations of other weights apart."""
    import hashlib

    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
