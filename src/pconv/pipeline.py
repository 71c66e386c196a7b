"""The conversion pipeline, stage by stage: locate sites -> record -> choose populations -> per T: thresholds,
quantize, calibrate -> swap in spiking neurons. Each stage lives in its own package; this module runs them
in order.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from .calibration import CALIBRATIONS, Calibration, CalibrationConfig, SiteParams, changed_weights
from .calibration.population import choose_population
from .config import check_time_steps
from .data.batches import ImageBatches, first_batch
from .data.config import data_config_of
from .errors import ConfigError
from .models.checkpoints import replace_weights, weights_fingerprint
from .models.source import ModelSource, source_of
from .nn import functional as PF
from .nn.network import ConversionInfo, SpikingNetwork, spiking_network
from .nn.neurons import NEURONS
from .nn.qcfs import quantize
from .observe.record import ChannelStats, record_activations
from .observe.sites import ACTIVATIONS, find_sites
from .utils import distributed
from .utils.memory import MiB, TensorMeter, default_budget, parse_budget, peak_rss_bytes
from .utils.progress import NoProgress, Progress


def _config(config: CalibrationConfig | None, choices: dict[str, Any]) -> CalibrationConfig:
    if config is not None and choices:
        raise ConfigError(f"give either a config or its fields ({', '.join(sorted(choices))}), not both",
                          "for example pconv.calibrate(model, data, time_steps=[4, 8], method='fit')")
    return config if config is not None else CalibrationConfig(**choices)


def calibrate(model: nn.Module, data: Tensor | Iterable, config: CalibrationConfig | None = None, *,
              num_images: int | None = None, memory_budget: int | str | None = None,
              progress: Progress | None = None, **choices: Any) -> Calibration:
    """Record thresholds and calibrate every site for each T of `config` (labels are never used).

    The choices come as a CalibrationConfig or as its fields (`time_steps`, `threshold`, `method`,
    `encoding_levels`, `population_budget`, `overflow_sites`, `bins`, `recon_steps`, `recon_drop`).
    `memory_budget` (bytes, or e.g. "4GiB"; default utils.memory.default_budget()) bounds what calibration holds
    beyond the model and one batch; every image is used whatever their number."""
    config = _config(config, choices)
    budget = default_budget() if memory_budget is None else parse_budget(memory_budget)
    started = time.perf_counter()
    meter = TensorMeter()
    with meter:
        calibration = _calibrate(model, data, config, num_images, budget, progress or NoProgress())
    calibration.provenance.update({
        "calibration_seconds": round(time.perf_counter() - started, 3),
        "memory_budget_mb": round(budget / MiB, 1),
        "peak_tensor_mb": round(meter.peak / MiB, 1),
        "peak_rss_mb": round(peak_rss_bytes() / MiB, 1),
    })
    return calibration


def _calibrate(model: nn.Module, data: Tensor | Iterable, config: CalibrationConfig, num_images: int | None,
               budget: int, progress: Progress) -> Calibration:
    work = copy.deepcopy(model).eval()
    # Refuse an unsupported network on one image, before reading the whole calibration set.
    first, data = first_batch(data)
    sites = find_sites(work, first[:1].to(next(work.parameters()).device))
    batches = ImageBatches(data, num_images, hold_bytes=budget // 2)
    passes = 2 if config.needs_histogram else 1
    stats = record_activations(work, sites, batches, histograms=config.needs_histogram, bins=config.bins,
                               progress=progress.stage("recording thresholds", passes * len(batches)))
    channel_max = {name: s.max.cpu() for name, s in stats.items()}
    populated = choose_population(work, sites, {n: s.max for n, s in stats.items()}, batches, config.time_steps,
                                  config.encoding_levels, config.population_budget, budget, progress)
    data_config = data_config_of(model)
    data_config.setdefault("input_size", list(first.shape[1:]))  # what convert probes the model with
    calibration = Calibration(sites=sites, config=config, params={}, channel_max=channel_max,
                              source=source_of(model), data_config=data_config, populated=populated,
                              overflow=config.overflow(sites))
    notes: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for T in config.time_steps:
        started = time.perf_counter()
        for key, value in _calibrate_at(work, calibration, stats, T, batches, budget, progress).items():
            if isinstance(value, dict) and isinstance(notes.get(key), dict):  # per-T notes: {T: ...}
                notes[key].update(value)
            else:
                notes[key] = value
        seconds[str(T)] = round(time.perf_counter() - started, 3)
    calibration.provenance = {
        "num_images": distributed.reduce_count(batches.num_images),
        "weights_sha256": weights_fingerprint(model),
        "world_size": distributed.world_size(),
        "torch_version": torch.__version__,
        "seconds_per_T": seconds,  # each T's own calibration (recording and the population choice are shared)
        **notes,
    }
    if config.population_budget > 0:
        calibration.provenance["population_budget"] = config.population_budget
    return calibration


def _calibrate_at(work: nn.Module, calibration: Calibration, stats: dict[str, ChannelStats], T: int,
                  batches: ImageBatches, budget: int, progress: Progress) -> dict[str, Any]:
    """Thresholds, QCFS and the step's method at one T; fills calibration.params[T] (and weights[T])."""
    step = calibration.step(T)
    populations = calibration.populations(T)
    thetas = {s.name: step.threshold.compute(stats[s.name], T * populations[s.name]) for s in calibration.sites}
    qnet = copy.deepcopy(work)
    modules = quantize(qnet, calibration.sites, thetas, T, populations, calibration.overflow)
    run = CALIBRATIONS.get(step.method).run
    options = calibration.config.method_options(step.method)
    notes = run(qnet, modules, batches, budget, _Labelled(progress, f"T={T}"), **options) or {}
    calibration.params[T] = {name: SiteParams(m.theta.cpu(), m.delta_in.cpu(), m.delta_out.cpu())
                             for name, m in modules.items()}
    changed = changed_weights(work, qnet, calibration.sites)
    if changed:
        calibration.weights[T] = changed
    return notes


class _Labelled:
    """A Progress whose stage names say which T they belong to."""

    def __init__(self, progress: Progress, label: str):
        self.progress, self.label = progress, label

    def stage(self, description: str, total: int | None):
        return self.progress.stage(f"{description} ({self.label})", total)


def blank_input(model: nn.Module, size: Sequence[int]) -> Tensor:
    """One all-zero image of `size` [C, H, W] on the model's device, in its dtype."""
    param = next(model.parameters())
    return torch.zeros(1, *size, device=param.device, dtype=param.dtype)


def check_calibration_fits(model: nn.Module, calibration: Calibration) -> None:
    """Refuse a calibration made for another architecture (its sites, their activations and channels differ
    from the model's, either way) or for other weights (its recorded fingerprint differs)."""
    size = calibration.data_config.get("input_size")
    if size:
        mine = [(s.name, s.activation, s.channels)
                for s in find_sites(copy.deepcopy(model).eval(), blank_input(model, size))]
    else:  # no input size to probe with: the activation modules by name and kind
        mine = [(name, kind, None) for name, m in model.named_modules()
                for kind, _ in [ACTIVATIONS.get(type(m), (None, None))] if kind]
    theirs = [(s.name, s.activation, s.channels if size else None) for s in calibration.sites]
    if mine != theirs:
        differ = next((f"{a[0]} ({a[1]}, {a[2]} channels) vs {b[0]} ({b[1]}, {b[2]} channels)"
                       for a, b in zip(mine, theirs) if a != b),
                      f"the model has {len(mine)} activation sites, the calibration {len(theirs)}")
        raise ConfigError(f"the calibration was made for another model: its activation sites differ ({differ})",
                          "calibrate this model: pconv calibrate MODEL --data DIR -o CALIB")
    recorded = calibration.provenance.get("weights_sha256")
    if recorded:
        fingerprint = weights_fingerprint(model)
        if recorded != fingerprint:
            raise ConfigError(f"the calibration was made for other weights of this architecture (weights sha256 "
                              f"{recorded[:12]}…, these are {fingerprint[:12]}…)",
                              "pass the --checkpoint it was calibrated with, or calibrate these weights")


def build_snn(model: nn.Module, calibration: Calibration, time_steps: int, neuron: str = "parallel") -> SpikingNetwork:
    """Swap every site of a copy of `model` for a neuron with the calibrated parameters at T."""
    time_steps = check_time_steps(time_steps)
    NEURONS.get(neuron)
    if time_steps not in calibration.params:
        raise ConfigError(f"the calibration holds no parameters for T={time_steps}",
                          f"it has T = {', '.join(map(str, calibration.time_steps))}; recalibrate with this T")
    check_calibration_fits(model, calibration)
    net = copy.deepcopy(model).eval()
    refitted = calibration.weights.get(time_steps, {})
    own = net.state_dict()
    ann_weights = {key: own[key].detach().clone() if key in own else None for key in refitted}
    replace_weights(net, refitted)
    populations = calibration.populations(time_steps)
    params = {name: PF.neuron_params(p.theta, p.delta_in, p.delta_out, time_steps, populations[name])
              for name, p in calibration.params[time_steps].items()}
    step = calibration.step(time_steps)
    info = ConversionInfo(
        time_steps=time_steps, neuron=neuron, sites=list(calibration.sites), threshold=str(step.threshold),
        method=step.method, source=calibration.source, data_config=dict(calibration.data_config),
        provenance=dict(calibration.provenance), encoding_levels=calibration.encoding_levels,
        populated=dict(calibration.populated.get(time_steps, {})), overflow=list(calibration.overflow),
        num_classes=_num_outputs(net, calibration),
        config=calibration.config.to_dict(),
    )
    snn = spiking_network(net, info, params)
    snn.ann_weights = ann_weights
    return snn.eval()


def _num_outputs(model: nn.Module, calibration: Calibration) -> int | None:
    """The classifier's outputs, from one forward of a blank input (None without an input size)."""
    size = calibration.data_config.get("input_size")
    if not size:
        return None
    with torch.inference_mode():
        out = model(blank_input(model, size))
    return int(out.shape[1]) if out.dim() == 2 else None


def convert(model: nn.Module, calib: Calibration | Tensor | Iterable, time_steps: int = 8, *,
            neuron: str = "parallel", config: CalibrationConfig | None = None, num_images: int | None = None,
            memory_budget: int | str | None = None, source: ModelSource | None = None,
            progress: Progress | None = None, **choices: Any) -> SpikingNetwork:
    """Convert a ReLU/ReLU6 classifier into a parallel-spiking SNN with T time steps.

    `calib` is either calibration batches (tensors or (x, y) pairs; labels unused), calibrated at this T with
    `config` or its fields (see `calibrate`), or a `Calibration` made earlier by `calibrate`. The returned
    SNN maps [B, ...] to the time-mean output [B, classes]."""
    time_steps = check_time_steps(time_steps)
    NEURONS.get(neuron)
    if not isinstance(calib, Calibration):
        if config is None:
            config = CalibrationConfig(time_steps=(time_steps,), **choices)
            choices = {}
        calib = calibrate(model, calib, config, num_images=num_images, memory_budget=memory_budget,
                          progress=progress, **choices)
    elif config is not None or choices:
        raise ConfigError("a Calibration fixes its own choices", "convert(model, calibration, T) takes no others")
    snn = build_snn(model, calib, time_steps, neuron)
    if source is not None:
        snn.info.source = source
    return snn
