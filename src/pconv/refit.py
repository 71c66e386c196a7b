"""`refit`: `fit`, plus a least-squares refit of every conv/linear layer against the ANN, in the same pass.

In the paired pass of `fit` (first half: the quantized network, second half: the ANN), each conv2d or
linear call whose two halves differ gets new weights before it runs: the ridge least-squares solution of

    minimise  sum || W' x_q + b' - (W x_ann + b) ||^2  +  lam * ||[W' b'] - [W b]||^2

over the calibration positions, per output channel (per group for grouped and depthwise convolutions).
x_q is the layer's input in the quantized network, every earlier site and layer already calibrated, so
each layer takes out the error its input carries as far as a linear map can: the bias term removes the
mean error, the weights the part correlated with the signal. The pull towards the original weights
(lam, relative to the mean input energy) keeps a layer with few calibration positions, such as the
classifier, from overfitting. A layer without a bias gets one. Labels are never used.

The call is seen through a TorchFunctionMode, so the input is the one the layer really convolves (after
any padding its module adds, as timm's "same" convolutions do), whatever module wraps it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import distributed
from .fit import paired_images, paired_pass
from .quantize import QCFS

Progress = Callable[[], None] | None

#: Ridge strength, as a fraction of the mean diagonal of the input Gram matrix.
RIDGE = 1e-3
#: Output positions (rows of the least-squares problem) sampled per layer: this many per weight of an
#: output channel, at least MIN_ROWS, at most all of them (drawn at random, seeded).
ROWS_PER_FEATURE = 64
MIN_ROWS = 16384
#: Patches are gathered for at most this many elements at a time.
GATHER_ELEMENTS = 1 << 24

_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _positions(call: dict[str, Any], x: Tensor) -> tuple[int, ...]:
    """(images, output rows, output columns) of a conv call; (rows,) for a linear one."""
    if call["linear"]:
        return (x.numel() // x.shape[-1],)
    kh, kw = call["weight"].shape[-2:]
    (sh, sw), (ph, pw), (dh, dw) = _pair(call["stride"]), _pair(call["padding"]), _pair(call["dilation"])
    out_h = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return (x.shape[0], out_h, out_w)


def _patches(call: dict[str, Any], x: Tensor, rows: Tensor) -> Tensor:
    """[groups, len(rows), K+1]: for each sampled output position, the inputs its value is a dot product
    with (the conv patch, or the linear input row), plus a column of ones for the bias."""
    if call["linear"]:
        picked = x.reshape(-1, x.shape[-1])[rows].unsqueeze(0)
    else:
        weight, groups = call["weight"], call["groups"]
        kh, kw = weight.shape[-2:]
        (sh, sw), (ph, pw), (dh, dw) = _pair(call["stride"]), _pair(call["padding"]), _pair(call["dilation"])
        _, out_h, out_w = _positions(call, x)
        padded = F.pad(x, (pw, pw, ph, ph))
        image, rest = rows // (out_h * out_w), rows % (out_h * out_w)
        iy = (rest // out_w * sh).unsqueeze(1) + torch.arange(kh, device=x.device) * dh  # [R, kh]
        ix = (rest % out_w * sw).unsqueeze(1) + torch.arange(kw, device=x.device) * dw  # [R, kw]
        channels = torch.arange(x.shape[1], device=x.device)
        picked = padded[image[:, None, None, None], channels[None, :, None, None], iy[:, None, :, None],
                        ix[:, None, None, :]]  # [R, C, kh, kw]
        picked = picked.reshape(len(rows), groups, -1).transpose(0, 1)  # [G, R, C/G*kh*kw]
    return torch.cat([picked, torch.ones_like(picked[..., :1])], dim=2)


def normal_equations(call: dict[str, Any], x_q: Tensor, x_ann: Tensor) -> tuple[Tensor, Tensor]:
    """(X_q^T X_q, X_q^T X_ann) per group, in float64, over sampled output positions of x_q / x_ann."""
    total = 1
    for n in _positions(call, x_q):
        total *= n
    weight = call["weight"]
    features = weight[0].numel() + 1
    wanted = min(total, max(MIN_ROWS, ROWS_PER_FEATURE * features))
    generator = torch.Generator(device="cpu").manual_seed(total)
    rows = torch.randperm(total, generator=generator)[:wanted].to(x_q.device) if wanted < total \
        else torch.arange(total, device=x_q.device)
    step = max(1, GATHER_ELEMENTS // (features * call.get("groups", 1)))
    gram = cross = None
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        pq, pa = _patches(call, x_q, chunk), _patches(call, x_ann, chunk)
        g = torch.bmm(pq.transpose(1, 2), pq).double()
        c = torch.bmm(pq.transpose(1, 2), pa).double()
        gram = g if gram is None else gram + g
        cross = c if cross is None else cross + c
    return distributed.reduce_sum(gram), distributed.reduce_sum(cross)


def _differs(x_q: Tensor, x_ann: Tensor) -> bool:
    """Whether the layer's input differs between the halves on any process (the first layer sees the image
    on all of them: nothing to fit). Every process must take the same branch, or the all-reduce hangs."""
    local = torch.tensor([0.0 if torch.equal(x_q, x_ann) else 1.0], device=x_q.device)
    return bool(distributed.reduce_max(local).item())


def _numeric_padding(padding: str, weight: Tensor, dilation) -> tuple[int, int]:
    if padding == "valid":
        return (0, 0)
    dilation = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[-2:])]
    # "same" with an odd total pads one more on one side, which the gather cannot express: refit nothing
    return tuple(t // 2 for t in total) if all(t % 2 == 0 for t in total) else None


def solve(gram: Tensor, cross: Tensor, weight: Tensor, bias: Tensor | None, ridge: float = RIDGE) -> tuple[Tensor, Tensor]:
    """New (weight, bias) from the normal equations, pulled towards the original ones."""
    groups = gram.shape[0]
    original = weight.reshape(groups, weight.shape[0] // groups, -1).double()
    b = bias if bias is not None else torch.zeros(weight.shape[0], device=weight.device)
    original = torch.cat([original, b.reshape(groups, -1, 1).double()], dim=2)  # [G, Og, K+1]
    target = cross @ original.transpose(1, 2)  # X_q^T Y, Y = X_ann W^T
    lam = ridge * torch.diagonal(gram, dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)
    eye = torch.eye(gram.shape[1], dtype=gram.dtype, device=gram.device)
    lhs = gram + lam[:, None, None] * eye
    rhs = target + lam[:, None, None] * original.transpose(1, 2)
    new = torch.linalg.solve(lhs, rhs).transpose(1, 2)  # [G, Og, K+1]
    return new[..., :-1].reshape(weight.shape).to(weight.dtype), new[..., -1].reshape(-1).to(weight.dtype)


class _Refit(TorchFunctionMode):
    """Refits each watched conv/linear call on the pair of halves, then runs each half with its weights."""

    def __init__(self, layers: Mapping[str, nn.Module], half: int):
        super().__init__()
        self.by_weight = {id(m.weight): name for name, m in layers.items()}
        self.half = half
        self.fitted: dict[str, tuple[Tensor, Tensor]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        linear = func is F.linear
        if not (linear or func is F.conv2d or func is torch.conv2d) or len(args) < 2 \
                or id(args[1]) not in self.by_weight:
            return func(*args, **kwargs)
        call = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "bias": None}
        call.update(zip(_ARGS, args))
        call.update(kwargs)
        call["linear"] = linear
        if isinstance(call["padding"], str):  # F.conv2d's "same"/"valid": the gather needs numbers
            call["padding"] = _numeric_padding(call["padding"], call["weight"], call["dilation"])
        name = self.by_weight[id(args[1])]
        x = call["input"]
        x_q, x_ann = x[: self.half], x[self.half:]
        weight, bias = call["weight"], call["bias"]
        if name not in self.fitted and call["padding"] is not None and _differs(x_q, x_ann):
            gram, cross = normal_equations(call, x_q, x_ann)
            self.fitted[name] = solve(gram, cross, weight.detach(), None if bias is None else bias.detach())
        if call["padding"] is None:
            return func(*args, **kwargs)
        new_weight, new_bias = self.fitted.get(name, (weight, bias))
        return torch.cat([self._apply(call, x_q, new_weight, new_bias), self._apply(call, x_ann, weight, bias)])

    @staticmethod
    def _apply(call: dict[str, Any], x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if call["linear"]:
            return F.linear(x, weight, bias)
        return F.conv2d(x, weight, bias, call["stride"], call["padding"], call["dilation"], call["groups"])


def refit_layers(model: nn.Module, modules: Mapping[str, QCFS], batches: Sequence[Tensor],
                 progress: Progress = None) -> dict[str, Any]:
    """The `refit` calibration: `fit` for the sites and least squares for the layers, in one paired pass."""
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and isinstance(getattr(m, "weight", None), nn.Parameter)}
    images = paired_images(model, modules, batches)
    mode = _Refit(layers, images.shape[0])
    paired_pass(model, modules, images, progress, mode)
    with torch.no_grad():
        for name, (weight, bias) in mode.fitted.items():
            layer = layers[name]
            layer.weight.copy_(weight)
            if layer.bias is None:
                layer.bias = nn.Parameter(bias.clone())
            else:
                layer.bias.copy_(bias)
    return {"fit_images": distributed.reduce_count(images.shape[0]), "refit_layers": len(mode.fitted)}
