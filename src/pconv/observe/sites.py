"""Locate activation sites and refuse networks that cannot be converted, before any work is done.

One probe forward pass on a single example runs under a TorchFunctionMode that sees every torch call.
Tensors derived from the input are tracked ("tainted"); any call on them outside an activation site
must be affine (or max pooling), otherwise the network is refused with the module path that made it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import UnsupportedModelError

#: Activation modules pconv converts, with the cap their output never exceeds.
ACTIVATIONS: dict[type, tuple[str, float | None]] = {
    nn.ReLU: ("relu", None),
    nn.ReLU6: ("relu6", 6.0),
}

# Calls that commute with the time-mean (affine, or structural), applied to input-derived tensors.
_AFFINE = {
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "linear", "batch_norm", "instance_norm_eval_never",
    "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "__isub__", "sub_",
    "neg", "__neg__", "cat", "concat", "concatenate", "stack", "flatten", "view", "reshape", "permute",
    "transpose", "contiguous", "__getitem__", "pad", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "alpha_dropout", "feature_alpha_dropout", "clone", "squeeze", "unsqueeze", "expand", "expand_as",
    "mean", "sum", "chunk", "split", "tensor_split", "unbind", "narrow", "to", "float", "double", "half",
    "type_as", "detach", "flip", "roll", "repeat", "tile", "zero_pad2d", "identity", "movedim", "unflatten",
    "channel_shuffle", "pixel_shuffle", "pixel_unshuffle", "__setitem__", "copy_",
    # every interpolation mode is a fixed linear map of its input (nearest, bilinear, bicubic, area)
    "interpolate", "upsample", "upsample_nearest", "upsample_bilinear",
}
# Max pooling commutes with sorted spike trains of one amplitude per channel (DESIGN §2).
_MAX_POOL = {"max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
             "adaptive_max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
             "max_pool3d_with_indices", "adaptive_max_pool2d_with_indices"}
# Products: affine when at most one factor depends on the input (and it is not a divisor).
_PRODUCTS = {"mul", "__mul__", "__rmul__", "__imul__", "mul_", "matmul", "__matmul__", "mm", "bmm", "einsum",
             "div", "__truediv__", "__itruediv__", "div_"}
_DIVISIONS = {"div", "__truediv__", "__itruediv__", "div_", "__rtruediv__"}
# Calls that only read metadata.
_METADATA = {"size", "dim", "__get__", "numel", "__len__", "stride", "is_contiguous", "element_size",
             "__format__", "__repr__", "data_ptr", "get_device", "ndimension", "nelement", "is_floating_point",
             "__bool__", "__hash__", "__eq__"}


@dataclass(frozen=True)
class Site:
    """One activation module that becomes a spiking neuron."""

    name: str  # dotted path of the activation module; its k-th call in a forward (k >= 2) is "path#k"
    activation: str  # "relu" | "relu6"
    channels: int
    ndim: int  # rank of the activation tensor, batch included
    cap: float | None = None  # ReLU6 -> 6.0
    #: True when no spiking neuron lies between the image and this site: its neurons encode the image
    #: (population coded, see nn.population)
    encoding: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Site":
        return cls(**d)


def is_activation(module: nn.Module) -> bool:
    return type(module) in ACTIVATIONS


class _Probe(TorchFunctionMode):
    def __init__(self, stack: list[tuple[str, nn.Module]], site_modules: set[int]):
        super().__init__()
        self.stack = stack
        self.site_modules = site_modules
        self.tainted: set[int] = set()
        self.spiking: set[int] = set()  # tensors computed from some site's output
        self._keep: list[Tensor] = []  # keep tainted tensors alive so their ids stay unique
        self.violation: tuple[str, str, str] | None = None

    def taint(self, tensors) -> None:
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, Tensor):
                self.tainted.add(id(t))
                self._keep.append(t)

    def mark_spiking(self, tensors) -> None:
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, Tensor):
                self.spiking.add(id(t))
                self._keep.append(t)

    def _inside_site(self) -> bool:
        return any(id(m) in self.site_modules for _, m in self.stack)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat_args = tree_flatten((args, kwargs))[0]
        if any(isinstance(a, Tensor) and id(a) in self.spiking for a in flat_args):
            self.mark_spiking(out)
        n_tainted = sum(1 for a in flat_args if isinstance(a, Tensor) and id(a) in self.tainted)
        if n_tainted == 0 or self.violation is not None:
            return out
        name = getattr(func, "__name__", repr(func))
        if name in _METADATA or not any(isinstance(t, Tensor) for t in tree_flatten(out)[0]):
            return out
        if not self._inside_site():
            reason = self._refusal(name, args, n_tainted)
            if reason:
                module_path, module = self.stack[-1] if self.stack else ("<model>", None)
                self.violation = (module_path or "<model>", type(module).__name__ if module else "", reason)
        self.taint(out)
        return out

    def _refusal(self, name: str, args, n_tainted: int) -> str:
        if name in _AFFINE or name in _MAX_POOL:
            return ""
        if name in _PRODUCTS:
            if n_tainted > 1:
                return f"multiplies two input-dependent tensors ({name}), which is not affine"
            if name in _DIVISIONS and len(args) > 1 and isinstance(args[1], Tensor) and id(args[1]) in self.tainted:
                return f"divides by an input-dependent tensor ({name}), which is not affine"
            return ""
        if name in {"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "threshold", "clamp", "clamp_", "clip"}:
            return (f"applies {name} functionally; pconv converts activation modules only "
                    "(use one nn.ReLU / nn.ReLU6 module per site)")
        return f"calls {name}, which is not affine and cannot sit between spiking neurons"


def find_sites(model: nn.Module, example: Tensor) -> list[Site]:
    """Return the activation sites of `model` in execution order, or raise UnsupportedModelError.

    `example` is one input batch (a single image is enough); the model must be in eval mode. An activation
    module called at k places in one forward (timm and torchvision reuse one nn.ReLU within a block) is k sites,
    `path`, `path#2`, ..., `path#k`, in call order: each call gets its own neurons (`swap_sites`)."""
    site_names = {id(m): name for name, m in model.named_modules() if is_activation(m)}
    stack: list[tuple[str, nn.Module]] = []
    calls: dict[str, int] = {}
    order: list[Site] = []
    names = {id(m): name for name, m in model.named_modules()}
    handles = []
    encoding: dict[str, bool] = {}
    seen: set[str] = set()

    def pre_hook(module, inputs):
        stack.append((names[id(module)], module))
        name = site_names.get(id(module))
        if name is not None:
            encoding[name] = not any(isinstance(t, Tensor) and id(t) in probe.spiking for t in inputs)

    def post_hook(module, inputs, output):
        stack.pop()
        name = site_names.get(id(module))
        if name is None:
            return
        probe.mark_spiking(output)
        calls[name] = calls.get(name, 0) + 1
        key = site_name(name, calls[name])
        if isinstance(output, Tensor) and key not in seen:
            seen.add(key)
            activation, cap = ACTIVATIONS[type(module)]
            channels = output.shape[1] if output.dim() > 1 else 1
            order.append(Site(key, activation, int(channels), output.dim(), cap, encoding.pop(name)))

    probe = _Probe(stack, set(site_names))
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))
    try:
        with torch.inference_mode(), probe:
            probe.taint(example)
            model(example)
    finally:
        for h in handles:
            h.remove()

    if probe.violation is not None:
        path, type_name, reason = probe.violation
        where = f"{path} ({type_name})" if type_name else path
        raise UnsupportedModelError(
            f"module {where} {reason}",
            "only conv, linear, BatchNorm, pooling, residual additions, concatenation, flatten, padding and "
            "dropout may sit between ReLU/ReLU6 activations",
            module_path=path,
        )
    for site in order:
        if site.ndim < 2:
            raise UnsupportedModelError(
                f"activation {site.name} sees a tensor without a channel dimension",
                "pconv expects [batch, channels, ...] activations", module_path=site.name)
    if not order:
        raise UnsupportedModelError(
            "the model has no nn.ReLU or nn.ReLU6 activation modules to convert",
            "pconv converts ReLU-family networks; functional activations are not visible to it")
    return order


# --- sites of a module called more than once -----------------------------------------------------------


def site_name(module_path: str, call: int) -> str:
    """The site of the `call`-th (1-based) call of the activation module at `module_path`."""
    return module_path if call == 1 else f"{module_path}#{call}"


def module_path(site: str | Site) -> str:
    """The dotted path of the module a site belongs to."""
    return (site.name if isinstance(site, Site) else site).partition("#")[0]


class PerCall(nn.Module):
    """Stands in for an activation module that one forward calls several times: call k goes to module k.

    The count restarts at every forward of the model it sits in (reset_calls, a forward pre-hook there)."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.calls = nn.ModuleList(modules)
        self.next = 0

    def forward(self, x: Tensor) -> Tensor:
        module = self.calls[self.next % len(self.calls)]
        self.next += 1
        return module(x)


def reset_calls(model: nn.Module, inputs: tuple = ()) -> None:
    """Restart the call count of every PerCall in `model` (a forward pre-hook of the model itself; it finds
    them afresh each time, so a deep copy of the model keeps working)."""
    for module in model.modules():
        if isinstance(module, PerCall):
            module.next = 0


def _groups(sites: Sequence[Site]) -> dict[str, list[Site]]:
    groups: dict[str, list[Site]] = {}
    for site in sites:
        groups.setdefault(module_path(site), []).append(site)
    return {path: sorted(group, key=lambda s: _call(s.name)) for path, group in groups.items()}


def _call(name: str) -> int:
    _, _, k = name.partition("#")
    return int(k) if k else 1


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    owner, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, module)


def swap_sites(model: nn.Module, sites: Sequence[Site], make: Callable[[nn.Module, Site], nn.Module]
               ) -> dict[str, nn.Module]:
    """Replace, in place, the module at every site by `make(module now at the site, site)`; a module called at
    several places becomes a PerCall of one replacement per call. Returns the replacement of every site.
    Raises KeyError naming a site whose module the model lacks."""
    replaced: dict[str, nn.Module] = {}
    for path, group in _groups(sites).items():
        try:
            current = model.get_submodule(path)
        except AttributeError:
            raise KeyError(group[0].name) from None
        if isinstance(current, PerCall):
            for site in group:
                index = _call(site.name) - 1
                current.calls[index] = replaced[site.name] = make(current.calls[index], site)
            continue
        made = [make(current, site) for site in group]
        replaced.update({site.name: m for site, m in zip(group, made)})
        _set(model, path, made[0] if len(made) == 1 else PerCall(made))
        if len(made) > 1 and reset_calls not in model._forward_pre_hooks.values():
            model.register_forward_pre_hook(reset_calls)
    return replaced


def unswap_sites(model: nn.Module, sites: Sequence[Site], make: Callable[[Site], nn.Module]) -> None:
    """Put back, in place, one module per site module (`make(its first site)`), undoing swap_sites."""
    for path, group in _groups(sites).items():
        _set(model, path, make(group[0]))


def site_modules(model: nn.Module, sites: Sequence[Site]) -> dict[str, nn.Module]:
    """The module that runs at every site (for a PerCall, the one of that call)."""
    out = {}
    for site in sites:
        module = model.get_submodule(module_path(site))
        out[site.name] = module.calls[_call(site.name) - 1] if isinstance(module, PerCall) else module
    return out


def is_site_state(key: str, paths: set[str]) -> bool:
    """Whether a state-dict key belongs to a site's module (a neuron or QCFS, not the network's weights)."""
    return any(key == p or key.startswith(p + ".") for p in paths)
