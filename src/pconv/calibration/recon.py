"""`recon`: `fit`, then block-wise reconstruction by gradient descent through the quantizer.

After `fit` has set every site, the network is cut into blocks at the inputs of the children of its
nn.Sequential containers (a residual block, an EfficientNet block; paired.py's cuts), the stem before the
first cut and the head after the last one joining their neighbours. Block by block, in execution order,
the block's thresholds, input shifts and spike amplitudes and its layers' weights and biases are moved by
Adam so that the quantized block, fed what the already reconstructed blocks before it give, reproduces the
ANN's block output on the calibration images:

    minimise  mean || Qblock(x_q) - ANNblock(x_ann) ||^2

with x_q and x_ann the block's input in the quantized network and in the ANN. The quantizer's floor passes
gradients straight through (QCFSMode.STE); the threshold moves on a log scale and the shifts in units of
the threshold, so one learning rate suits every site; each weight tensor's learning rate is in units of its
own RMS. Labels are never used: the last block's target is the ANN's output.

While a block trains, each activation of its sites takes, with probability `recon_drop` (default 0.5), the
unrounded value its quantizer would round (QDrop, Wei et al., ICLR 2022): the block's weights and thresholds
then fit inputs that are partly rounded and partly not, and so hold up better against the rounding of the
blocks after it than weights fitted to fully rounded inputs alone. The draws come from each image's
generator (sampling.py), so they too are the same however the images are batched or sharded. The block's error before and after
training is measured without dropping.

Each step uses the images whose content-seeded draw (sampling.py) falls below BATCH / N, the same images
however they are batched or sharded; under torchrun the gradients are summed over processes before the
step, so every process takes the single-process step. The block inputs of every image are kept while they
fit the memory budget; past it they are recomputed, for each step's images, from the images themselves.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from ..config import DEFAULT_RECON_DROP, DEFAULT_RECON_STEPS
from ..data.batches import ImageBatches
from ..nn import functional as PF
from ..nn.qcfs import QCFS, QCFSMode
from ..utils import distributed
from ..utils.memory import tensor_bytes
from ..utils.progress import Progress
from .fit import fit_sites
from .methods import calibration_method
from .paired import Chain, Cuts, resume_at
from .sampling import image_generator, image_keys, uniform_draws

#: Images per step, on average (each image joins a step with probability BATCH / N).
BATCH = 32
#: Adam learning rates: log-threshold, shifts in units of the threshold, weights in units of their RMS.
LR_THETA = 1e-2
LR_SHIFT = 2e-3
LR_WEIGHT = 1e-3


class _Stop(Exception):
    def __init__(self, value: Tensor):
        self.value = value


@dataclass
class Block:
    """A stretch of the network between two cuts (start None: the image; end None: the output)."""

    start: Chain | None
    end: Chain | None
    sites: list[QCFS] = field(default_factory=list)
    modules: list[nn.Module] = field(default_factory=list)
    in_bytes: int = 0  # per image, at the start cut
    name: str = "stem"  # the module at the start cut
    #: Sequentials that run to their end before the block's start cut is reached, with what each returns for one
    #: image (shape and dtype): reaching the block, they return zeros instead of running on a blank image
    skipped: list[tuple[nn.Sequential, tuple[int, ...], torch.dtype]] = field(default_factory=list)


def find_blocks(model: nn.Module, modules: Mapping[str, QCFS], example: Tensor) -> list[Block]:
    """The blocks of `model`, from one forward of one image: every module and site that runs is placed at
    the cut it runs under; runs under the same cut form a block; a run outside every cut after the first
    block (the head) joins the block before it, and a block without a site joins the next one."""
    cuts = Cuts(model)
    events: list[tuple[Chain, nn.Module]] = []
    sites = set(modules.values())
    order = itertools.count()  # the forward's order of Sequential starts and ends
    started: dict[nn.Sequential, int] = {}
    ended: dict[nn.Sequential, tuple[int, Any]] = {}

    def seen(module, inputs, output):
        events.append((cuts.where(), module))

    def start(seq, inputs):
        started.setdefault(seq, next(order))

    def end(seq, inputs, output):
        ended[seq] = (next(order), output)

    handles = [m.register_forward_hook(seen) for m in model.modules()
               if m in sites or any(True for _ in m.parameters(recurse=False))]
    for seq in cuts.sequentials:
        handles += [seq.register_forward_pre_hook(start), seq.register_forward_hook(end)]
    try:
        with torch.no_grad(), cuts.tracking():
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    blocks: list[Block] = []
    for chain, module in events:
        chain = cuts.usable(chain) or None
        if not blocks or (chain is not None and chain != blocks[-1].start):
            blocks.append(Block(start=chain, end=None))
        block = blocks[-1]
        target = block.sites if module in sites else block.modules
        if module not in target:
            target.append(module)
    merged: list[Block] = []
    for block in blocks:  # a block without a site (a stem of layers only) is run as part of the next one
        if merged and not merged[-1].sites:
            block.start, block.modules = merged[-1].start, merged[-1].modules + block.modules
            merged.pop()
        merged.append(block)
    paths = {id(m): path for path, m in model.named_modules()}
    for block, after in zip(merged, merged[1:] + [None]):
        block.end = after.start if after is not None else None
        if block.start is not None:
            seq, index = block.start[-1]
            block.name = paths.get(id(seq[index]), block.name)
            begins = started[block.start[0][0]]
            block.skipped = [(done, tuple(out.shape[1:]), out.dtype) for done, (at, out) in ended.items()
                             if at < begins and cuts.calls.get(id(done)) == 1 and isinstance(out, Tensor)]
        block.in_bytes = tensor_bytes(example[:1]) if block.start is None else \
            tensor_bytes(run_to(model, block.start, example[:1]))
    return merged


@contextlib.contextmanager
def _segment(block: Block, x: Tensor) -> Iterator[None]:
    """While open, a forward of the model runs from the block's start cut (fed x) and stops at its end; the
    Sequentials before the start return zeros (what they compute is never read: the start is a cut)."""
    patched: list[nn.Sequential] = []
    handle = None
    cuts_from, end = block.start, block.end
    if cuts_from:
        for level, (seq, index) in enumerate(cuts_from):
            seq.forward = resume_at(seq, index, x if level == len(cuts_from) - 1 else None)
            patched.append(seq)
        for seq, shape, dtype in block.skipped:
            seq.forward = lambda *args, shape=shape, dtype=dtype, **kwargs: x.new_zeros((len(x), *shape), dtype=dtype)
            patched.append(seq)
    if end:
        seq, index = end[-1]

        def stop(module, inputs):
            raise _Stop(inputs[0])

        handle = seq[index].register_forward_pre_hook(stop)
    try:
        yield
    finally:
        for seq in patched:
            del seq.forward
        if handle is not None:
            handle.remove()


def run_block(model: nn.Module, block: Block, x: Tensor, image_shape: tuple[int, ...]) -> Tensor:
    """The block's output for its input x (the images, for the first block). A block that starts at a cut
    is reached through the model's forward, which runs what precedes its outermost Sequential, other than the
    Sequentials skipped, on a blank image (`image_shape`, [C, H, W]) and ignores the result."""
    images = x if block.start is None else x.new_zeros((len(x), *image_shape))
    with _segment(block, x):
        try:
            out = model(images)
        except _Stop as stop:
            return stop.value
    if block.end is not None:
        raise AssertionError(f"the forward never reached the cut after block {block.name}")
    return out


def run_to(model: nn.Module, end: Chain | None, images: Tensor) -> Tensor:
    """The model's tensor at cut `end` for these images (its output when end is None)."""
    with torch.no_grad():
        return run_block(model, Block(start=None, end=end), images, tuple(images.shape[1:]))


@contextlib.contextmanager
def _mode(modules: list[QCFS], mode: QCFSMode) -> Iterator[None]:
    before = [m.mode for m in modules]
    for m in modules:
        m.mode = mode
    try:
        yield
    finally:
        for m, b in zip(modules, before):
            m.mode = b


class _Learnable:
    """The block's parameters as Adam sees them: log-threshold, shifts / threshold, weights."""

    def __init__(self, block: Block, steps: int):
        self.block = block
        self.theta0 = [m.theta.detach().clone() for m in block.sites]
        self.log_scale = [torch.zeros_like(t, requires_grad=True) for t in self.theta0]
        self.shift_in = [(m.delta_in.detach() / t).clone().requires_grad_(True) for m, t in zip(block.sites, self.theta0)]
        self.shift_out = [(m.delta_out.detach() / t).clone().requires_grad_(True) for m, t in zip(block.sites, self.theta0)]
        self.weights = [p for m in block.modules for p in m.parameters(recurse=False) if p.dtype.is_floating_point]
        for p in self.weights:
            p.requires_grad_(True)
        groups = [{"params": self.log_scale, "lr": LR_THETA}, {"params": self.shift_in + self.shift_out, "lr": LR_SHIFT}]
        for p in self.weights:
            rms = float(p.detach().pow(2).mean().sqrt()) if p.numel() else 0.0
            groups.append({"params": [p], "lr": LR_WEIGHT * max(rms, 1e-3)})
        self.optimizer = torch.optim.Adam(groups)
        self.base = [g["lr"] for g in self.optimizer.param_groups]
        self.steps = steps

    def tensors(self) -> list[Tensor]:
        return self.log_scale + self.shift_in + self.shift_out + self.weights

    def apply(self) -> None:
        """Set the sites' buffers from the learnt values (with their graph, while training)."""
        for m, t, s, a, b in zip(self.block.sites, self.theta0, self.log_scale, self.shift_in, self.shift_out):
            theta = t * torch.exp(s)
            m.theta, m.delta_in, m.delta_out = theta, a * t, b * t

    def schedule(self, step: int) -> None:
        """Cosine decay of every learning rate to zero over the steps."""
        factor = 0.5 * (1 + math.cos(math.pi * step / self.steps))
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = base * factor

    def freeze(self) -> None:
        self.apply()
        for m in self.block.sites:
            m.theta, m.delta_in, m.delta_out = m.theta.detach(), m.delta_in.detach(), m.delta_out.detach()
        for p in self.weights:
            p.requires_grad_(False)

    def snapshot(self) -> list[Tensor]:
        return [t.detach().clone() for m in self.block.sites for t in (m.theta, m.delta_in, m.delta_out)] + \
            [p.detach().clone() for p in self.weights]

    def restore(self, saved: list[Tensor]) -> None:
        """Back to the values before training (a block the descent left worse keeps its `fit` calibration)."""
        it = iter(saved)
        for m in self.block.sites:
            m.theta, m.delta_in, m.delta_out = next(it), next(it), next(it)
        with torch.no_grad():
            for p in self.weights:
                p.copy_(next(it))


class _Inputs:
    """Each image's input of the current block in the quantized network and the ANN's target for it (`_target`):
    kept for every image when they fit the budget, else recomputed from the images for the images a step needs.
    """

    def __init__(self, qnet: nn.Module, ann: nn.Module, batches: ImageBatches, keep: bool):
        self.qnet, self.ann, self.batches, self.keep = qnet, ann, batches, keep
        self.keys: list[bytes] = []
        self.chunk = 1  # images run at a time where no gradient is needed: the source's batch size
        for x in batches:
            self.keys.extend(image_keys(x))
            self.image_shape = tuple(x.shape[1:])
            self.chunk = max(self.chunk, len(x))
        self.device = next(qnet.parameters()).device
        self.start: tuple[Chain | None, Chain | None] = (None, None)  # the current block's, in qnet and ann
        self.x_q: Tensor | None = None
        self.x_ann: Tensor | None = None
        self.targets: Tensor | None = None
        self.pairs: tuple[tuple[Block, Block], tuple[Block, Block] | None] | None = None  # the block and the next
        if keep:
            self.x_q = self.x_ann = torch.cat([x for x in batches]).to(self.device)

    def begin(self, pair: tuple[Block, Block], after: tuple[Block, Block] | None) -> None:
        """Serve the block `pair` (the next one `after`): its targets are computed once, when kept."""
        self.pairs = (pair, after)
        if self.keep:
            self.targets = torch.cat([_target(self.ann, pair, after, part, self.image_shape)
                                      for part in self.x_ann.split(self.chunk)])

    def take(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """The block's input in the quantized network and the ANN's target, for the images `index`."""
        if self.keep:
            return self.x_q[index], self.targets[index]
        x_q, x_ann = self._recomputed(index)
        return x_q, _target(self.ann, *self.pairs, x_ann, self.image_shape)

    def _recomputed(self, index: Tensor) -> tuple[Tensor, Tensor]:
        wanted = set(index.tolist())
        picked, offset = [], 0
        for x in self.batches:
            rows = [i - offset for i in range(offset, offset + len(x)) if i in wanted]
            if rows:
                picked.append(x[rows])
            offset += len(x)
        images = torch.cat(picked).to(self.device)
        if self.start[0] is None:
            return images, images
        return run_to(self.qnet, self.start[0], images), run_to(self.ann, self.start[1], images)

    def advance(self, pair: tuple[Block, Block]) -> None:
        """Move to the next block's inputs (its start is this block's end), the block now reconstructed."""
        block, twin = pair
        if self.keep and block.end is not None:
            self.x_q = self._chunked(self.qnet, block, self.x_q)
            self.x_ann = self._chunked(self.ann, twin, self.x_ann)
        self.start = (block.end, twin.end)

    def _chunked(self, model: nn.Module, block: Block, x: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([run_block(model, block, part, self.image_shape) for part in x.split(self.chunk)])


def _target(ann: nn.Module, pair: tuple[Block, Block], after: tuple[Block, Block] | None, x_ann: Tensor,
            image_shape: tuple[int, ...]) -> Tensor:
    """What the ANN gives where the error is measured: at the block's output seen through the next block, or at
    the network's output for the last block (`_output`)."""
    with torch.no_grad():
        target = run_block(ann, pair[1], x_ann, image_shape)
        if after is not None:
            target = run_block(ann, after[1], target, image_shape)
    return target


def _output(qnet: nn.Module, pair: tuple[Block, Block], after: tuple[Block, Block] | None, x_q: Tensor,
            image_shape: tuple[int, ...]) -> Tensor:
    """What the quantized block gives where the error is measured: its output seen through the next block run at
    full precision (its sites computing the ANN's activation, its layers not yet changed), or the network's
    output for the last block. Through the next block's layers, the rounding of the block's last site is judged
    by what it does to the sums that read it, not value by value."""
    with _mode(pair[0].sites, QCFSMode.STE):
        out = run_block(qnet, pair[0], x_q, image_shape)
    if after is not None:
        with _mode(after[0].sites, QCFSMode.ANN):
            out = run_block(qnet, after[0], out, image_shape)
    return out


@contextlib.contextmanager
def _dropping(sites: list[QCFS], keys: list[bytes], salt: str, drop: float) -> Iterator[None]:
    """While open, each site's output (a batch of the images `keys`, in order; the site in STE mode) takes the
    unrounded value (PF.qcfs_relaxed) where the image's own uniform draws fall below `drop`: each image's
    generator is seeded by its key and `salt` and read site after site in execution order, so an image's draws
    do not depend on the images batched with it."""
    generators = [image_generator(key, salt) for key in keys]

    def draw(site: QCFS, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0]
        draws = torch.stack([torch.rand(x.shape[1:], generator=g) for g in generators]).to(x.device)
        site.relaxed = draws < drop

    handles = [site.register_forward_pre_hook(draw) for site in sites] if drop > 0 else []
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for site in sites:
            site.relaxed = None


def _block_error(qnet: nn.Module, pair: tuple[Block, Block], after: tuple[Block, Block] | None,
                 inputs: _Inputs) -> float:
    """Mean squared error that the block's training minimises, over every calibration image (reduced over
    processes)."""
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(inputs.keys), inputs.chunk):
            x_q, target = inputs.take(torch.arange(start, min(start + inputs.chunk, len(inputs.keys))))
            out = _output(qnet, pair, after, x_q, inputs.image_shape)
            total += torch.tensor([float((out - target).double().pow(2).sum()), float(target.numel())],
                                  dtype=torch.float64)
    total = distributed.reduce_sum(total)
    return float(total[0] / total[1].clamp_min(1))


def _train(qnet: nn.Module, pair: tuple[Block, Block], after: tuple[Block, Block] | None, inputs: _Inputs,
           steps: int, drop: float, share: float, before: float, tick) -> float:
    """Adam on the block's parameters for `steps` steps; the block's error over every image afterwards. A block
    the descent left worse than `before` gets its earlier values back, and keeps `before`."""
    learn = _Learnable(pair[0], steps)
    saved = learn.snapshot()
    draws = uniform_draws(inputs.keys, f"recon:{pair[0].name}", steps)
    for step in range(steps):
        learn.schedule(step)
        index = torch.nonzero(draws[:, step] < share).flatten()
        count = distributed.reduce_count(len(index))
        learn.optimizer.zero_grad(set_to_none=False)
        learn.apply()
        if len(index):
            x_q, target = inputs.take(index)
            keys = [inputs.keys[i] for i in index.tolist()]
            with _dropping(pair[0].sites, keys, f"recon-drop:{pair[0].name}:{step}", drop):
                out = _output(qnet, pair, after, x_q, inputs.image_shape)
            loss = (out - target).pow(2).sum() / (count * target[0].numel())
            loss.backward()
        _sum_gradients(learn.tensors())
        learn.optimizer.step()
        tick()
    learn.freeze()
    error = _block_error(qnet, pair, after, inputs)
    if error > before:  # every process sees the same reduced errors, so all restore alike
        learn.restore(saved)
        return before
    return error


def reconstruct_blocks(qnet: nn.Module, ann: nn.Module, modules: Mapping[str, QCFS], batches: ImageBatches,
                       steps: int, drop: float, budget: int, progress: Progress) -> dict[str, Any]:
    """Reconstruct every block of `qnet` against `ann` (a copy of it whose sites compute the ANN's activation)."""
    example = next(iter(batches)).to(next(qnet.parameters()).device)
    blocks = find_blocks(qnet, modules, example)
    twins = find_blocks(ann, _twins(ann, qnet, modules), example)
    local = batches.num_images
    # the inputs of a block and of the next, in both networks, and the targets, for every image
    worst = max(b.in_bytes for b in blocks)
    keep = not distributed.reduce_any(5 * worst * local > max(budget - batches.held_bytes, 0))
    inputs = _Inputs(qnet, ann, batches, keep)
    share = min(1.0, BATCH / max(distributed.reduce_count(local), 1))
    for p in list(qnet.parameters()) + list(ann.parameters()):
        p.requires_grad_(False)
    tick = progress.stage(f"recon: {len(blocks)} blocks, {steps} steps each", len(blocks) * steps)
    errors = []
    pairs = list(zip(blocks, twins))
    for pair, after in zip(pairs, pairs[1:] + [None]):
        block = pair[0]
        inputs.begin(pair, after)
        before = _block_error(qnet, pair, after, inputs)
        error = _train(qnet, pair, after, inputs, steps, drop, share, before, tick) if steps else before
        errors.append((block.name, before, error))
        inputs.advance(pair)
    levels = str(next(iter(modules.values())).levels)
    return {"recon_blocks": len(blocks), "recon_steps": steps, "recon_drop": drop,
            "recon_schedule": "inputs kept" if keep else "inputs recomputed",
            # per T, each block's mean squared error before and after (after = before: left as fit set it)
            "recon_error": {levels: {name: [float(f"{b:.6g}"), float(f"{a:.6g}")] for name, b, a in errors}}}


def _sum_gradients(tensors: list[Tensor]) -> None:
    """Sum every gradient over the processes (one collective), so each takes the single-process step."""
    for t in tensors:
        if t.grad is None:
            t.grad = torch.zeros_like(t)
    if not distributed.active():
        return
    flat = distributed.reduce_sum(torch.cat([t.grad.reshape(-1) for t in tensors]))
    offset = 0
    for t in tensors:
        t.grad.copy_(flat[offset:offset + t.numel()].view_as(t.grad))
        offset += t.numel()


def _twins(ann: nn.Module, qnet: nn.Module, modules: Mapping[str, QCFS]) -> dict[str, QCFS]:
    """The QCFS modules of `ann` (a copy of qnet) at the same paths."""
    paths = {id(m): path for path, m in qnet.named_modules()}
    by_path = dict(ann.named_modules())
    return {name: by_path[paths[id(m)]] for name, m in modules.items()}


def ann_twin(qnet: nn.Module, modules: Mapping[str, QCFS]) -> nn.Module:
    """A copy of the quantized network whose sites compute the ANN's activation."""
    ann = _copy_detached(qnet)
    for m in _twins(ann, qnet, modules).values():
        m.mode = QCFSMode.ANN
    return ann


def _copy_detached(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@calibration_method("recon", options=("recon_steps", "recon_drop"))
def reconstruct(model: nn.Module, modules: Mapping[str, QCFS], batches: ImageBatches, budget: int,
                progress: Progress, recon_steps: int = DEFAULT_RECON_STEPS,
                recon_drop: float = DEFAULT_RECON_DROP) -> dict[str, Any]:
    """`fit`, then each block's thresholds, shifts and weights tuned to reproduce the ANN's block output."""
    ann = ann_twin(model, modules)  # before fit: fit changes only the sites, which the twin does not use
    notes = fit_sites(model, modules, batches, budget, progress)
    notes.update(reconstruct_blocks(model, ann, modules, batches, recon_steps, recon_drop, budget, progress))
    return notes
