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
any padding its module adds, as timm's "same" convolutions do), whatever module wraps it. The rows of the
least-squares problem are output positions sampled from every image alike (sampling.py), and X^T X and
X^T Y are sums over them, so they stream over chunks of images and reduce over processes.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batches import ImageBatches
from ..nn.qcfs import QCFS
from ..utils import distributed
from ..utils.progress import Progress
from .fit import site_points
from .methods import calibration_method
from .paired import LayerCalls, PairedPass, Point, run_paired
from .sampling import per_image, sample_index

#: Ridge strength, as a fraction of the mean diagonal of the input Gram matrix.
RIDGE = 1e-3
#: Output positions (rows of the least-squares problem) sampled per layer, over all images: this many per
#: weight of an output channel, at least MIN_ROWS (each image gives its share; all of them if fewer).
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


def wanted_rows(call: dict[str, Any], positions_per_image: int, num_images: int) -> int:
    """Rows of the least-squares problem each image gives (all its positions when there are few)."""
    features = call["weight"][0].numel() + 1
    total = positions_per_image * num_images
    return per_image(min(total, max(MIN_ROWS, ROWS_PER_FEATURE * features)), num_images)


def normal_equations(call: dict[str, Any], x_q: Tensor, x_ann: Tensor, rows: Tensor | None = None
                     ) -> tuple[Tensor, Tensor]:
    """(X_q^T X_q, X_q^T X_ann) per group, in float64, over the output positions `rows` of x_q / x_ann
    (flat, image-major; None: all of them). Not reduced over processes."""
    if rows is None:
        total = 1
        for n in _positions(call, x_q):
            total *= n
        rows = torch.arange(total, device=x_q.device)
    features = call["weight"][0].numel() + 1
    step = max(1, GATHER_ELEMENTS // (features * call.get("groups", 1)))
    groups = 1 if call["linear"] else call["groups"]
    gram = torch.zeros(groups, features, features, dtype=torch.float64, device=x_q.device)
    cross = torch.zeros_like(gram)
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        pq, pa = _patches(call, x_q, chunk), _patches(call, x_ann, chunk)
        gram += torch.bmm(pq.transpose(1, 2), pq).double()
        cross += torch.bmm(pq.transpose(1, 2), pa).double()
    return gram, cross


def _numeric_padding(padding: str, weight: Tensor, dilation) -> tuple[int, int] | None:
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


def parse_call(func: Callable, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The arguments of a conv2d or linear call (numeric padding), or None for anything else or a "same"
    padding the patch gather cannot express."""
    linear = func is F.linear
    if not (linear or func is F.conv2d or func is torch.conv2d) or len(args) < 2:
        return None
    call = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "bias": None}
    call.update(zip(_ARGS, args))
    call.update(kwargs)
    call["linear"] = linear
    if isinstance(call["padding"], str):  # F.conv2d's "same"/"valid": the gather needs numbers
        call["padding"] = _numeric_padding(call["padding"], call["weight"], call["dilation"])
    return None if call["padding"] is None else call


def apply_call(call: dict[str, Any], x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if call["linear"]:
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, call["stride"], call["padding"], call["dilation"], call["groups"])


class _Calls(LayerCalls):
    parse = staticmethod(parse_call)
    apply = staticmethod(apply_call)


class LayerPoint(Point):
    """A conv/linear layer of `refit`: sums the normal equations over sampled output positions, then solves.
    A layer whose two halves never differ (it sees the image itself) keeps its weights."""

    def __init__(self, name: str, module: nn.Module, num_images: int):
        self.name = name
        self.module = module
        self.num_images = num_images
        self.gram: Tensor | None = None
        self.cross: Tensor | None = None
        self.differs = False
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.fitted: tuple[Tensor, Tensor] | None = None

    def collect(self, x_q: Tensor, x_ann: Tensor, keys: list[bytes], call: dict[str, Any] | None = None) -> None:
        self.weight = call["weight"].detach()
        self.bias = None if call["bias"] is None else call["bias"].detach()
        self.differs = self.differs or not torch.equal(x_q, x_ann)
        dims = _positions(call, x_q)
        positions = dims[0] // max(x_q.shape[0], 1) if call["linear"] else dims[1] * dims[2]
        rows = sample_index(keys, self.name, positions, wanted_rows(call, positions, self.num_images), x_q.device)
        gram, cross = normal_equations(call, x_q, x_ann, rows)
        self.gram = gram if self.gram is None else self.gram + gram
        self.cross = cross if self.cross is None else self.cross + cross

    def finish(self) -> None:
        # every process takes the same branch, or the all-reduce below would hang
        local = torch.tensor([1.0 if self.differs else 0.0, 1.0 if self.gram is not None else 0.0])
        differs, present = distributed.reduce_max(local).tolist()
        if not differs or not present:
            return
        weight = self.weight if self.weight is not None else self.module.weight.detach()
        bias = self.bias if self.weight is not None else (None if self.module.bias is None else self.module.bias.detach())
        if self.gram is None:  # this process saw no images: it adds nothing to the sums
            features = weight[0].numel() + 1
            groups = getattr(self.module, "groups", 1)
            self.gram = torch.zeros(groups, features, features, dtype=torch.float64, device=weight.device)
            self.cross = torch.zeros_like(self.gram)
        gram, cross = distributed.reduce_sum(self.gram), distributed.reduce_sum(self.cross)
        self.fitted = solve(gram, cross, weight, bias)
        self.gram = self.cross = None


@calibration_method("refit")
def refit_layers(model: nn.Module, modules: Mapping[str, QCFS], batches: ImageBatches, budget: int,
                 progress: Progress) -> dict[str, Any]:
    """`fit`, plus every conv/linear layer refitted to the ANN by least squares."""
    num_images = distributed.reduce_count(batches.num_images)
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and isinstance(getattr(m, "weight", None), nn.Parameter)}
    points = {id(m.weight): LayerPoint(name, m, num_images) for name, m in layers.items()}
    paired = PairedPass(model, site_points(modules, budget), points, _Calls())
    notes = run_paired(paired, batches, budget, progress, "refit")
    fitted = {p.name: p.fitted for p in points.values() if p.fitted is not None}
    with torch.no_grad():
        for name, (weight, bias) in fitted.items():
            layer = layers[name]
            layer.weight.copy_(weight)
            if layer.bias is None:
                layer.bias = nn.Parameter(bias.clone())
            else:
                layer.bias.copy_(bias)
    return {"fit_images": num_images, "refit_layers": len(fitted), "fit_schedule": notes["schedule"]}
