"""The one module-swap walk every stage uses (ReLU -> observer -> QCFS -> neuron)."""

from __future__ import annotations

from typing import Callable

from torch import nn


def swap_modules(
    model: nn.Module,
    filter_fn: Callable[[nn.Module, str], bool],
    replace_fn: Callable[[nn.Module, str], nn.Module],
    prefix: str = "",
) -> list[str]:
    """Replace, in place, every submodule for which `filter_fn(module, dotted_name)` holds.

    Replaced modules are not descended into. Returns the dotted names that were swapped, in
    registration order.
    """
    swapped: list[str] = []
    for child_name, child in list(model.named_children()):
        name = f"{prefix}.{child_name}" if prefix else child_name
        if filter_fn(child, name):
            setattr(model, child_name, replace_fn(child, name))
            swapped.append(name)
        else:
            swapped.extend(swap_modules(child, filter_fn, replace_fn, name))
    return swapped


def swap_by_name(model: nn.Module, replacements: dict[str, Callable[[nn.Module, str], nn.Module]]) -> list[str]:
    """Swap exactly the named submodules (used when a file lists its sites)."""
    return swap_modules(model, lambda m, name: name in replacements, lambda m, name: replacements[name](m, name))
