"""timm's names and weights, as timm users write them.

A model is named as in `timm.create_model`: an architecture (`resnet50`), an architecture with a pretrained
tag (`resnet50.a1_in1k`), or a Hugging Face Hub repository (`hf-hub:timm/resnet50.a1_in1k`). Pretrained weights
come through timm itself, which reads the local Hugging Face cache (and only the cache when HF_HUB_OFFLINE=1).
What a pconv file records is the architecture and tag timm resolved, never a hub name or a path: rebuilding it
later needs nothing but timm.
"""

from __future__ import annotations

import os
import re
from typing import Any

from torch import nn

from ..errors import ModelLoadError
from ..utils.registry import close_matches

#: Prefixes timm reads from somewhere else than its own registry.
SOURCES = ("hf-hub:", "local-dir:")
#: An architecture, optionally with a pretrained tag: what a file may name.
TIMM_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?$")


def is_sourced(name: str) -> bool:
    """Whether timm reads the model from the hub or a folder (`hf-hub:...`, `local-dir:...`)."""
    return name.startswith(SOURCES)


def check_name(name: str) -> None:
    """Refuse an architecture timm does not have, naming the closest ones."""
    import timm

    if is_sourced(name):
        return
    if not TIMM_NAME.match(name) or not timm.is_model(name):
        close = close_matches(name.partition(".")[0], timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see `timm.list_models()` for valid names"
        raise ModelLoadError(f"unknown timm model {name!r}", hint)
    architecture, _, tag = name.partition(".")
    if tag:
        from timm.models import get_pretrained_cfg

        try:
            get_pretrained_cfg(name)
        except RuntimeError:
            tags = [n.partition(".")[2] for n in timm.list_pretrained(architecture) if "." in n]
            raise ModelLoadError(f"timm has no pretrained tag {tag!r} for {architecture}",
                                 f"its tags: {', '.join(tags[:8]) or 'none'}") from None


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def has_pretrained_weights(name: str) -> bool:
    """Whether timm knows where pretrained weights of `name` (its default tag if untagged) come from."""
    if is_sourced(name):
        return True
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return bool(cfg and (cfg.hf_hub_id or cfg.url or cfg.file))


def create(name: str, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    """`timm.create_model(name, pretrained=pretrained, **kwargs)`, with one-line errors: an unknown tag, weights
    that are not in the local cache, a model timm has no weights for (timm would quietly keep random ones)."""
    import timm

    check_name(name)
    if pretrained and not has_pretrained_weights(name):
        raise ModelLoadError(f"timm has no pretrained weights for {name!r}",
                             "pick a tagged name with weights (timm.list_pretrained()), or pass --checkpoint FILE")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:  # noqa: BLE001 - timm and huggingface_hub raise many types; say which applies
        raise _creation_error(name, pretrained, e) from None


def _creation_error(name: str, pretrained: bool, error: Exception) -> ModelLoadError:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    kind = type(error).__name__
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if "LocalEntryNotFound" in kind or "OfflineModeIsEnabled" in kind or (
            pretrained and offline and ("offline" in text.lower() or "cache" in text.lower())):
        return ModelLoadError(f"the pretrained weights of {name!r} are not in the local Hugging Face cache "
                              f"({_hub_cache()})" + (" and HF_HUB_OFFLINE is set" if offline else ""),
                              "download them once where the hub can be reached, point HF_HOME (or HF_HUB_CACHE) "
                              "at a cache that holds them, or pass --checkpoint FILE")
    if "RepositoryNotFound" in kind or "EntryNotFound" in kind or "HTTPError" in kind or "ConnectionError" in kind:
        return ModelLoadError(f"cannot fetch {name!r} from the Hugging Face Hub: {text[:160]}",
                              "check the name, your network, or pass --checkpoint FILE")
    if "pretrained tag" in text.lower() or "unknown model" in text.lower():
        return ModelLoadError(f"timm cannot create {name!r}: {text[:160]}", "see timm.list_pretrained() for tags")
    return ModelLoadError(f"timm cannot create {name!r}: {kind}: {text[:160]}",
                          "check the model name and its keyword arguments")


def recorded_name(model: nn.Module, name: str) -> str:
    """What a file records for a model timm created from `name`: the architecture and pretrained tag it resolved
    (a hub repository or a folder is recorded as its architecture; its data config travels in the file)."""
    if not is_sourced(name):
        return name
    cfg = getattr(model, "pretrained_cfg", None) or {}
    architecture = cfg.get("architecture")
    if not architecture or not TIMM_NAME.match(architecture):
        raise ModelLoadError(f"timm created {name!r} but did not say its architecture",
                             "name the architecture instead, e.g. resnet50.a1_in1k")
    return architecture


def model_kwargs(model: nn.Module, given: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments that rebuild the architecture: those given, plus those a hub config added, and the
    classifier size it ended with."""
    kwargs = {k: v for k, v in getattr(model, "_model_args", {}).items() if k != "pretrained_cfg_overlay"}
    kwargs.update(given)
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int):
        kwargs["num_classes"] = num_classes
    return kwargs
