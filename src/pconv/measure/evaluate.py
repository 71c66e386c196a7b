"""Evaluate an SNN against its source ANN: accuracy, agreement, speed, firing rates and synaptic operations.

Vocabulary follows timm's validate/benchmark scripts (`top1`, `top5`, `samples_per_sec`, `step_time`,
`param_count`, ...). Nothing here prints; `evaluate` returns an `EvalResult` with `to_dict()`.

Definitions (see docs/usage.md):

- firing rate of a site: mean number of spikes per neuron per time step, over every evaluated image
  (spike counts k come from the neurons' `count_hook`, so the count engine measures it at no extra cost);
  a population of m neurons per channel counts as m neurons, an overflow neuron as one more;
- synaptic operations and MACs: measure/costs.py.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from ..nn.network import SpikingNetwork
from ..nn.neurons import Engine, as_engine
from ..utils import distributed
from ..utils.progress import NoProgress, Progress
from .costs import count_operations, layer_costs
from .difference import PairedDifference
from .energy import EnergyModel
from .results import EvalResult, LayerStats, SiteStats
from .timing import Stopwatch

#: Images on which synaptic operations are counted in the spike engine by default.
DEFAULT_SOP_IMAGES = 16


def _split(item: Any) -> tuple[Tensor, Tensor]:
    if isinstance(item, (tuple, list)) and len(item) >= 2 and isinstance(item[0], Tensor) \
            and isinstance(item[1], Tensor):
        return item[0], item[1]
    raise DataError("evaluation needs labelled batches of (images, labels)",
                    "pass a DataLoader over a class-subfolder image folder")


def _correct(logits: Tensor, target: Tensor, k: int) -> tuple[Tensor, int]:
    """Which images are right in top-1, and how many are in top-k."""
    top = logits.topk(k, dim=1).indices
    hit = top == target.unsqueeze(1)
    return hit[:, 0], int(hit.any(dim=1).sum())


@contextlib.contextmanager
def _running(snn: SpikingNetwork, device: torch.device, engine: Engine) -> Iterator[None]:
    """`snn` on `device` in `engine` for the block; the caller's engine and device come back, also on error."""
    previous_engine = snn.engine
    previous_device = next(snn.parameters()).device
    try:
        snn.to(device).set_engine(engine)
        yield
    finally:
        snn.set_engine(previous_engine)
        snn.to(previous_device)


class _SpikeCounts:
    """Spikes per site over the evaluation, from the neurons' count hooks (removed on exit)."""

    def __init__(self, snn: SpikingNetwork, device: torch.device):
        self.neurons = snn.neurons()
        self.spikes = {name: torch.zeros((), dtype=torch.float64, device=device) for name in self.neurons}
        self.positions = {name: 0 for name in self.neurons}
        self.counting = False  # off during the warm-up and the cost probe

    def __enter__(self) -> "_SpikeCounts":
        for name, neuron in self.neurons.items():
            neuron.count_hook = self._hook(name)
        return self

    def __exit__(self, *exc) -> None:
        for neuron in self.neurons.values():
            neuron.count_hook = None

    def _hook(self, name: str):
        def hook(k: Tensor, neurons_per_position: int) -> None:
            if self.counting:
                self.spikes[name] += k.sum(dtype=torch.float64)
                self.positions[name] += k.numel() * neurons_per_position
        return hook

    def reduce(self) -> None:
        for name in self.neurons:
            self.spikes[name] = distributed.reduce_sum(self.spikes[name])
            self.positions[name] = distributed.reduce_count(self.positions[name])

    def sites(self, snn: SpikingNetwork, images: int) -> list[SiteStats]:
        out = []
        for site in snn.info.sites:
            positions, spikes = self.positions[site.name], float(self.spikes[site.name])
            rate = spikes / (positions * snn.time_steps) if positions else 0.0
            out.append(SiteStats(site.name, site.activation, positions // images, rate, spikes / images))
        return out


class _Tally:
    """Hits, agreements and per-step hits over the batches, then reduced over processes."""

    def __init__(self, time_steps: int, device: torch.device):
        self.n = self.correct1 = self.correct5 = self.ann1 = self.ann5 = self.agree = self.batches = 0
        self.ann_only = self.snn_only = 0  # images right in top-1 by one network and wrong by the other
        self.step_correct = torch.zeros(time_steps, dtype=torch.float64, device=device)
        self.k = 5
        self.local_n = 0

    def add(self, out: Tensor, y: Tensor, ref: Tensor | None, steps: Tensor | None) -> None:
        num_classes = out.shape[1]
        self.k = min(5, num_classes)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            bad = int(y.max()) if int(y.max()) >= num_classes else int(y.min())
            raise DataError(f"label {bad} is outside the model's {num_classes} classes",
                            "the folder's classes must match the model's; list them in order in class_map.txt")
        snn_right, c5 = _correct(out, y, self.k)
        self.correct1 += int(snn_right.sum())
        self.correct5 += c5
        if ref is not None:
            ann_right, a5 = _correct(ref, y, self.k)
            self.ann1 += int(ann_right.sum())
            self.ann5 += a5
            self.agree += int((ref.argmax(dim=1) == out.argmax(dim=1)).sum())
            self.ann_only += int((ann_right & ~snn_right).sum())
            self.snn_only += int((snn_right & ~ann_right).sum())
        if steps is not None:  # argmax of the running sum = of the running mean
            self.step_correct += (steps.cumsum(dim=0).argmax(dim=2) == y.unsqueeze(0)).sum(dim=1).double()
        self.n += y.shape[0]
        self.batches += 1

    def reduce(self) -> None:
        self.local_n = self.n  # timings are this process's own
        totals = torch.tensor([self.n, self.correct1, self.correct5, self.ann1, self.ann5, self.agree,
                               self.ann_only, self.snn_only], dtype=torch.float64)
        (self.n, self.correct1, self.correct5, self.ann1, self.ann5, self.agree, self.ann_only,
         self.snn_only) = (int(v) for v in distributed.reduce_sum(totals).tolist())
        self.step_correct = distributed.reduce_sum(self.step_correct)


def _reference(snn: SpikingNetwork, ann: nn.Module | bool, device: torch.device) -> nn.Module | None:
    model = snn.to_ann() if ann is True else (None if ann is False or ann is None else ann)
    return None if model is None else model.to(device).eval()


def evaluate(snn: SpikingNetwork, data: Iterable, *, ann: nn.Module | bool = True,
             device: str | torch.device | None = None, engine: Engine | str | None = None,
             sop_images: int = DEFAULT_SOP_IMAGES, warmup: bool = True, progress: Progress | None = None,
             energy: EnergyModel | None = None, step_curve: bool = False) -> EvalResult:
    """Run `snn` (and its source ANN, `snn.to_ann()`, unless `ann=False`) over labelled batches.

    `engine` defaults to the SNN's current one; a serial-neuron SNN always runs in the spike engine.
    Operations (SOPs, multiplies) are counted on the first `sop_images` images in the spike engine (0 skips
    them); `energy` prices them (measure/energy.py). The top-1 after each time step comes with the spike
    engines, and with `step_curve` also in the count engine (from an untimed spike-engine pass per batch).
    Timings cover the forward passes only (after one untimed warm-up batch, synchronised on CUDA).
    The caller's SNN is left on its device and in its engine, also on error."""
    if sop_images < 0:
        raise ConfigError(f"sop_images must be 0 or more, got {sop_images}", "for example 16")
    device = torch.device(device) if device is not None else next(snn.parameters()).device
    engine = as_engine(engine or snn.engine)
    progress = progress or NoProgress()
    with _running(snn, device, engine):
        ann_model = _reference(snn, ann, device)
        tally, watches = _Tally(snn.time_steps, device), (Stopwatch(device), Stopwatch(device))
        with _SpikeCounts(snn, device) as spikes:
            layers, kept, batch_size = _run(snn, ann_model, data, (engine, device, warmup, step_curve), sop_images,
                                            tally, watches, spikes, progress)
        tally.reduce()
        spikes.reduce()
        if tally.n == 0:
            raise DataError("no images to evaluate", "pass a non-empty folder")
        if kept is not None:
            chunk = max(1, batch_size // snn.time_steps)
            tick = progress.stage(f"counting synaptic operations T={snn.time_steps}", -(-kept.shape[0] // chunk))
            count_operations(snn, kept, layers, chunk, tick)
        result = _result(snn, engine, device, tally, spikes, watches, layers, ann_model is not None, batch_size,
                         0 if kept is None else kept.shape[0])
        result.energy = energy or EnergyModel()
        if step_curve and result.step_top1 is None:
            result.step_top1 = (100.0 * tally.step_correct / tally.n).tolist()
        return result


def _run(snn: SpikingNetwork, ann_model: nn.Module | None, data: Iterable,
         how: tuple[Engine, torch.device, bool, bool], sop_images: int, tally: _Tally,
         watches: tuple[Stopwatch, Stopwatch], spikes: _SpikeCounts,
         progress: Progress) -> tuple[list[LayerStats], Tensor | None, int]:
    """The timed passes over `data` (`how`: engine, device, warm-up, per-step curve in the count engine): (layer
    costs, the images kept for counting operations, the batch size)."""
    engine, device, warmup, step_curve = how
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    advance = progress.stage(f"evaluating T={snn.time_steps}", total)
    layers: list[LayerStats] = []
    kept: list[Tensor] = []
    batch_size = 0
    with torch.inference_mode():
        for item in data:
            x, y = _split(item)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if tally.batches == 0:
                batch_size, layers = x.shape[0], layer_costs(snn, x[:1])
                if warmup:
                    snn(x.clone())
                    if ann_model is not None:
                        ann_model(x.clone())
                spikes.counting = True
            # each network gets its own copy of the batch: one whose first activation works in place (the model's
            # choice, which its neurons and to_ann keep) overwrites its input
            snn_input = x.clone()
            with watches[0]:
                steps = None if engine is Engine.COUNTS else snn.forward_steps(snn_input)
                out = snn(snn_input) if steps is None else steps.mean(dim=0)
            if steps is None and step_curve:  # untimed, and without counting its spikes twice
                spikes.counting = False
                snn.set_engine(Engine.SPIKES)
                steps = snn.forward_steps(x)
                snn.set_engine(engine)
                spikes.counting = True
            ref = None
            if ann_model is not None:
                ann_input = x.clone()
                with watches[1]:
                    ref = ann_model(ann_input)
            tally.add(out, y, ref, steps)
            taken = sum(t.shape[0] for t in kept)
            if taken < sop_images:
                kept.append(x[: sop_images - taken].cpu())
            advance()
    return layers, (torch.cat(kept) if kept else None), batch_size


def _result(snn: SpikingNetwork, engine: Engine, device: torch.device, tally: _Tally, spikes: _SpikeCounts,
            watches: tuple[Stopwatch, Stopwatch], layers: list[LayerStats], with_ann: bool, batch_size: int,
            sop_images: int) -> EvalResult:
    n, local, snn_time, ann_time = tally.n, tally.local_n, watches[0].seconds, watches[1].seconds
    return EvalResult(
        num_images=n, batch_size=batch_size, time_steps=snn.time_steps, neuron=snn.info.neuron,
        engine=engine.value, device=str(device), param_count=sum(p.numel() for p in snn.net.parameters()),
        top1=100.0 * tally.correct1 / n, top5=100.0 * tally.correct5 / n, topk=tally.k,
        step_top1=None if engine is Engine.COUNTS else (100.0 * tally.step_correct / n).tolist(),
        ann_top1=100.0 * tally.ann1 / n if with_ann else None,
        ann_top5=100.0 * tally.ann5 / n if with_ann else None,
        top1_agreement=100.0 * tally.agree / n if with_ann else None,
        top1_diff=PairedDifference(n, tally.ann_only, tally.snn_only) if with_ann else None,
        samples_per_sec=local / snn_time if snn_time else 0.0, step_time=1000.0 * snn_time / tally.batches,
        ann_samples_per_sec=(local / ann_time if ann_time else 0.0) if with_ann else None,
        ann_step_time=1000.0 * ann_time / tally.batches if with_ann else None,
        sop_images=sop_images, sites=spikes.sites(snn, n), layers=layers,
    )
