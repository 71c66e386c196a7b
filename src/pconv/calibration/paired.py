"""The paired pass behind `fit` and `refit`: every calibration point fitted against the ANN, in execution order.

The images run doubled, [x; x]: at every site the first half holds the quantized network's input (every
earlier point already calibrated) and the second half the ANN's. Each calibration point (a site, or for
`refit` a conv/linear layer) is fitted on that pair over all calibration images, then applied to the
first half while the second half goes on as the ANN. That makes the calibration sequential over layers
(each point corrects what its predecessors left), so a point needs the pair over *every* image before the
forward may go past it. Two schedules give the same result:

- one pass, when the doubled batch of all images fits the memory budget: each point is fitted as the
  forward reaches it;
- rounds, when it does not: for point r, every chunk of images runs forward until point r (the earlier
  points applied), adding its share to point r's statistics; then point r is fitted. Memory is one
  chunk's. So that a round does not recompute the whole network before its point, each chunk's tensor at
  the latest cut before the point is kept while the budget allows, and the next rounds resume there
  (`Cuts`): a cut is the input of a child of an nn.Sequential, which nothing but that child reads.

What a point keeps of the images is sums that add over images (`fit`: a histogram of every position; `refit`:
normal equations over a sample of positions chosen by each image's own content, sampling.py), so both
schedules, any batching and any number of processes see the same positions.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..data.batches import ImageBatches
from ..nn.qcfs import QCFS
from ..utils import distributed
from ..utils.memory import TensorMeter, tensor_bytes
from ..utils.progress import Progress
from .sampling import image_keys


class _Stop(Exception):
    """Ends a forward once the point of this round has taken its share."""


class Point:
    """One calibration point: it gathers statistics from pairs, then fits and applies itself."""

    name: str = ""
    done: bool = False
    #: Whether `collect` reads the images' keys (sampling.py); hashing every image of every chunk is skipped
    #: when no point does (then `keys` is empty).
    uses_keys: bool = True

    def collect(self, x_q: Tensor, x_ann: Tensor, keys: list[bytes], call: dict[str, Any] | None = None) -> None:
        """Add one chunk's share (x_q: the quantized network's input of the point, x_ann: the ANN's)."""
        raise NotImplementedError

    def finish(self) -> None:
        """Fit from everything gathered (statistics are reduced over processes here)."""
        raise NotImplementedError


class LayerCalls:
    """How the layer points of `refit` see a conv/linear call: `parse(func, args, kwargs)` gives the call's
    arguments (None: leave the call alone) and `apply(call, x, weight, bias)` runs it on other weights."""

    parse: Callable[[Callable, tuple, dict], dict[str, Any] | None]
    apply: Callable[[dict[str, Any], Tensor, Tensor, Tensor | None], Tensor]


class PairedPass:
    """The points of `model`: `sites` maps each QCFS module to its point; `layers` the id() of each watched
    layer weight to its point (with `calls` to take those calls apart)."""

    def __init__(self, model: nn.Module, sites: Mapping[QCFS, Point], layers: Mapping[int, Point] | None = None,
                 calls: LayerCalls | None = None):
        self.model = model
        self.sites = dict(sites)
        self.layers = dict(layers or {})
        self.calls = calls
        self.device = next(model.parameters()).device
        self.order: list[Point] = []
        self.schedule = "discover"  # "discover" the order, fit "as reached", or one point per "round"
        self.active: Point | None = None
        self.keys: list[bytes] = []
        self.uses_keys = any(point.uses_keys for point in [*self.sites.values(), *self.layers.values()])
        self.on_fitted: Callable[[], None] | None = None
        self.cuts = Cuts(model)
        self.chains: dict[int, tuple] = {}  # id(point) -> its cut chain (found in discovery)

    def reached(self, point: Point, x_q: Tensor, x_ann: Tensor, call: dict[str, Any] | None = None) -> bool:
        """Gather or fit `point` as the schedule says; True once it is fitted (it then applies itself)."""
        if self.schedule == "discover":
            if point not in self.order:
                self.order.append(point)
                self.chains[id(point)] = self.cuts.where()
            return False
        if point.done:
            return True
        if self.schedule == "round" and point is not self.active:
            raise AssertionError(f"{point.name} was reached before its round")
        point.collect(x_q, x_ann, self.keys, call)
        if self.schedule == "round":
            raise _Stop
        point.finish()
        point.done = True
        if self.on_fitted:
            self.on_fitted()
        return True

    def _site_hook(self, module: QCFS, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = inputs[0]
        x_q, x_ann = x.chunk(2)
        fitted = self.reached(self.sites[module], x_q, x_ann)
        return torch.cat([module.quantized(x_q) if fitted else module.activation(x_q), module.activation(x_ann)])

    @contextlib.contextmanager
    def _hooks(self) -> Iterator[None]:
        """Site hooks (the QCFS modules pass their input through; the hook computes both halves) and, for layer
        points, the mode that sees their calls."""
        handles = []
        for module in self.sites:
            module.bypass = True
            handles.append(module.register_forward_hook(self._site_hook))
        try:
            with _LayerMode(self) if self.layers else contextlib.nullcontext():
                yield
        finally:
            for handle in handles:
                handle.remove()
            for module in self.sites:
                module.bypass = False

    def _forward(self, images: Tensor, chunk: int | None = None) -> None:
        self.keys = image_keys(images) if self.uses_keys else []
        images = images.to(self.device, non_blocking=True)
        with torch.no_grad(), self.cuts.resumed(chunk):
            try:
                self.model(torch.cat([images, images]))
            except _Stop:
                pass

    def discover(self, example: Tensor) -> int:
        """The points' execution order, from one image; returns the tensor bytes that pass held at its peak."""
        self.schedule, self.order, self.chains = "discover", [], {}
        meter = TensorMeter()
        with self._hooks(), meter, self.cuts.tracking():
            self._forward(example[:1])
        self.chains = {key: self.cuts.usable(chain) for key, chain in self.chains.items()}
        return meter.peak

    def fit_in_one_pass(self, images: Tensor) -> None:
        self.schedule = "as reached"
        with self._hooks():
            self._forward(images)

    def fit_in_rounds(self, chunks: Callable[[], Iterator[Tensor]], tick: Callable[[], None],
                      cache_bytes: int = 0) -> None:
        """One round per point; each chunk resumes from the latest cut kept for it, and keeps the cut before
        the round's point (at most `cache_bytes` in all)."""
        self.schedule = "round"
        self.cuts.limit = cache_bytes
        with self._hooks():
            for point in self.order:
                self.active = point
                with self.cuts.recording(self.chains.get(id(point), ())):
                    for index, chunk in enumerate(chunks()):
                        self._forward(chunk, index)
                point.finish()
                point.done = True
                tick()
        self.active = None
        self.cuts.clear()


Chain = tuple  # ((nn.Sequential, child index), ...): each Sequential the child of the one before, outermost first


class Cuts:
    """Where a forward can resume: the input of a child of an nn.Sequential (the child reads nothing else, and
    nothing else reads what the Sequential's earlier children computed).

    A chain names the cut: the Sequential, the child index, and, when that child is itself a Sequential,
    the child within it, and so on. To resume at a chain, each Sequential on it skips the children before
    the index and the innermost one starts from the kept tensor. Discovery (`tracking`) records, at each
    point, the chain of Sequential children it runs in; a round (`recording`) keeps, per chunk, the input at
    the chain of its point, and later rounds resume there (`resumed`)."""

    def __init__(self, model: nn.Module):
        self.sequentials = [m for m in model.modules()
                            if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward]
        self.stack: list[tuple[nn.Sequential, int]] = []
        self.calls: dict[int, int] = {}
        self.chain: Chain = ()  # the cut the kept tensors are at
        self.kept: dict[int, Tensor] = {}
        self.limit = 0
        self._recording: dict[int, Tensor] | None = None  # the newer cut's tensors, while a round keeps them
        self._used = 0
        self._chunk: int | None = None

    def where(self) -> Chain:
        return tuple(self.stack)

    @contextlib.contextmanager
    def tracking(self) -> Iterator[None]:
        """During discovery: the stack of running Sequential children, and how often each Sequential runs."""
        handles = []
        self.calls = {}
        for seq in self.sequentials:
            handles.append(seq.register_forward_pre_hook(self._count))
            for index, child in enumerate(seq):
                handles.append(child.register_forward_pre_hook(
                    lambda m, i, seq=seq, index=index: self.stack.append((seq, index))))
                handles.append(child.register_forward_hook(lambda m, i, o: self.stack.pop() and None))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.stack = []

    def _count(self, module: nn.Module, inputs: tuple) -> None:
        self.calls[id(module)] = self.calls.get(id(module), 0) + 1

    def usable(self, chain: Chain) -> Chain:
        """The longest prefix of `chain` that is a cut: Sequentials run once per forward, each the direct child
        of the one before, at children that are distinct modules."""
        out = []
        for seq, index in chain:
            if self.calls.get(id(seq)) != 1 or sum(c is seq[index] for c in seq) != 1:
                break
            if out and out[-1][0][out[-1][1]] is not seq:
                break
            out.append((seq, index))
        return tuple(out)

    @contextlib.contextmanager
    def recording(self, chain: Chain) -> Iterator[None]:
        """For one round: keep each chunk's input at `chain` (unless the kept tensors are already there), in
        place of the chunk's older cut, which that round's forward is the last to use."""
        if not chain or chain == self.chain or self.limit <= 0:
            yield
            return
        seq, index = chain[-1]
        self._recording, self._used = {}, 0

        def keep(module, inputs):
            x = inputs[0] if inputs else None
            if isinstance(x, Tensor) and self._chunk is not None and self._used + tensor_bytes(x) <= self.limit:
                self._recording[self._chunk] = x.clone()
                self._used += tensor_bytes(x)

        handle = seq[index].register_forward_pre_hook(keep)
        try:
            yield
        finally:
            handle.remove()
        self.kept, self.chain, self._recording = self._recording, chain, None

    @contextlib.contextmanager
    def resumed(self, chunk: int | None) -> Iterator[None]:
        """Run the forward of chunk `chunk` from its kept cut, when there is one."""
        self._chunk = chunk
        x = self.kept.get(chunk) if chunk is not None else None
        if x is None:
            yield
            return
        patched = []
        for level, (seq, index) in enumerate(self.chain):
            start = x if level == len(self.chain) - 1 else None
            seq.forward = resume_at(seq, index, start)
            patched.append(seq)
        try:
            yield
        finally:
            for seq in patched:
                del seq.forward
            if self._recording is not None:  # a newer cut is being kept: this one has served its last forward
                del self.kept[chunk]

    def clear(self) -> None:
        self.kept, self.chain = {}, ()


def resume_at(seq: nn.Sequential, index: int, start: Tensor | None) -> Callable:
    """A forward for `seq` that ignores its input: it runs children index.. from `start`, or, when `start` is
    None, from what child `index` (a Sequential resumed in turn) returns."""
    children = list(seq)

    def forward(*args, **kwargs):
        out = start if start is not None else children[index](None)
        for child in children[index + (0 if start is not None else 1):]:
            out = child(out)
        return out

    return forward


class _LayerMode(TorchFunctionMode):
    """Routes each watched conv/linear call (known by the identity of its weight) to its point."""

    def __init__(self, paired: PairedPass):
        super().__init__()
        self.paired = paired

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        point = self.paired.layers.get(id(args[1])) if len(args) > 1 and isinstance(args[1], Tensor) else None
        call = self.paired.calls.parse(func, args, kwargs) if point is not None else None
        if call is None:
            return func(*args, **kwargs)
        x_q, x_ann = call["input"].chunk(2)
        if self.paired.reached(point, x_q, x_ann, call) and point.fitted is not None:
            apply = self.paired.calls.apply
            return torch.cat([apply(call, x_q, *point.fitted), apply(call, x_ann, call["weight"], call["bias"])])
        return func(*args, **kwargs)


def run_paired(paired: PairedPass, batches: ImageBatches, budget: int, progress: Progress,
               label: str) -> dict[str, Any]:
    """Discover the points on one image, then fit them all: in one pass when the doubled batch of every image
    fits `budget`, else in rounds of chunks that do. Every process takes the same schedule (a process with no
    images cannot take part in a single pass). Returns provenance notes."""
    first = next(iter(batches))
    per_image = max(paired.discover(first), 1)
    local = batches.num_images
    fits = local > 0 and local * (per_image + tensor_bytes(first[0])) <= budget
    one_pass = not distributed.reduce_any(not fits)
    room = 0.9 * max(budget - batches.held_bytes, 0)  # a tenth left for what the estimate does not see
    chunk = max(1, int(room // 2 // per_image))  # half the room for a chunk's pass, half for the kept cuts
    if one_pass:
        paired.on_fitted = progress.stage(f"{label}: {len(paired.order)} points in one pass", len(paired.order))
        paired.fit_in_one_pass(torch.cat(list(batches)))
    else:
        def chunks() -> Iterator[Tensor]:
            for x in batches:
                yield from x.split(chunk)

        tick = progress.stage(f"{label}: {len(paired.order)} points, one pass each", len(paired.order))
        paired.fit_in_rounds(chunks, tick, cache_bytes=int(room // 2))
    paired.on_fitted = None
    return {"schedule": "one pass" if one_pass else f"rounds of {chunk} images"}
