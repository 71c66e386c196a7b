"""The conversion pipeline: locate sites -> record -> thresholds -> quantize -> calibrate -> spike.

Each stage lives in its own module; this one only runs them in order.
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from . import distributed
from .batches import ImageBatches, images_of
from .calibrate import CALIBRATIONS
from .errors import ConfigError, DataError
from . import functional as PF
from .memory import MiB, TensorMeter, default_budget, parse_budget, peak_rss_bytes
from .models import ModelSource, replace_weights, source_of, weights_fingerprint
from .neurons import NEURONS
from .progress import NoProgress, Progress
from .quantize import quantize
from .record import DEFAULT_BINS, record_activations
from .sensitivity import choose_populated, site_sensitivity
from .sites import ACTIVATIONS, Site, find_sites, population_size
from .snn import ConversionInfo, SpikingNetwork, spiking_network
from .thresholds import ThresholdSpec

#: Largest T accepted: beyond this the point of few-step conversion is lost and the spike engine explodes.
MAX_TIME_STEPS = 4096

DEFAULT_THRESHOLD = "max"
DEFAULT_CALIBRATION = "auto"
#: `auto` runs `fit` (on the --threshold values) up to this T, and the mse threshold without shifts above it
#: (docs/accuracy.md: the fitted shifts and amplitudes gain most where quantization error dominates, at low T).
AUTO_FIT_MAX_T = 8
#: Encoding sites (no neuron between them and the image) resolve at least this many levels at any T,
#: with ceil(levels/T) neurons per channel (Site.population); 0 turns population coding off.
DEFAULT_ENCODING_LEVELS = 64
#: Hidden sites may be population-coded too (as many neurons per channel as the encoding sites), the most
#: sensitive ones first, while the added neurons stay within this fraction of the network's (sensitivity.py).
DEFAULT_POPULATION_BUDGET = 0.5


def check_time_steps(time_steps: Any) -> int:
    if isinstance(time_steps, bool) or not isinstance(time_steps, int):
        raise ConfigError(f"T must be an integer, got {time_steps!r}", "for example T=8")
    if not 1 <= time_steps <= MAX_TIME_STEPS:
        raise ConfigError(f"T must be between 1 and {MAX_TIME_STEPS}, got {time_steps}", "typical values are 4 to 32")
    return time_steps


def plan(spec: ThresholdSpec, method: str, time_steps: int) -> tuple[ThresholdSpec, str]:
    """The threshold and calibration method actually run at T (they differ from the arguments for `auto`)."""
    if method != "auto":
        return spec, method
    return (spec, "fit") if time_steps <= AUTO_FIT_MAX_T else (ThresholdSpec.parse("mse"), "none")


def check_encoding_levels(levels: Any) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or not 0 <= levels <= MAX_TIME_STEPS:
        raise ConfigError(f"encoding levels must be an integer between 0 and {MAX_TIME_STEPS}, got {levels!r}",
                          f"for example {DEFAULT_ENCODING_LEVELS}, or 0 for one neuron per channel everywhere")
    return levels


def check_population_budget(budget: Any) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 <= float(budget) <= 100.0:
        raise ConfigError(f"the population budget must be a number between 0 and 100, got {budget!r}",
                          "it is the fraction of extra neurons allowed, for example 0.25; 0 turns it off")
    return float(budget)


@dataclass
class SiteParams:
    theta: Tensor
    delta_in: Tensor
    delta_out: Tensor


@dataclass
class Calibration:
    """Thresholds and DA shifts for every site, for one or more T: `convert` needs no data given this."""

    sites: list[Site]
    threshold: str
    method: str
    params: dict[int, dict[str, SiteParams]]
    channel_max: dict[str, Tensor]
    source: ModelSource | None = None
    data_config: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    #: per T, the state-dict entries a method replaced or added (layer refits): {T: {key: tensor}}
    weights: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    #: encoding sites get ceil(encoding_levels/T) neurons per channel (0: one, as every other site)
    encoding_levels: int = 0
    #: per T, the hidden sites also population-coded (chosen by sensitivity under a neuron budget)
    populated: dict[int, list[str]] = field(default_factory=dict)

    @property
    def time_steps(self) -> list[int]:
        return sorted(self.params)

    def populations(self, time_steps: int) -> dict[str, int]:
        """Neurons per channel of every site at T."""
        chosen = set(self.populated.get(time_steps, ()))
        return {s.name: s.population(time_steps, self.encoding_levels, s.name in chosen) for s in self.sites}


def first_batch(data: Tensor | Iterable) -> tuple[Tensor, Iterable]:
    """The first batch of images (for the refusal probe) and an iterable that still yields all of them."""
    if isinstance(data, Tensor):
        return data, [data]
    iterator = iter(data)
    try:
        first = next(iterator)
    except StopIteration:
        raise DataError("no calibration images", "pass at least one batch of images") from None
    rest = data if iterator is not data else itertools.chain([first], iterator)  # re-iterable: keep it so
    return images_of(first), rest


def data_config_of(model: nn.Module) -> dict[str, Any]:
    """The model's timm data config; {} for a model without a pretrained_cfg (timm would make one up)."""
    from timm.data import resolve_data_config

    if not (getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)):
        return {}
    try:
        cfg = resolve_data_config(model=model)
    except Exception:
        return {}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def calibrate(
    model: nn.Module,
    data: Tensor | Iterable,
    time_steps: int | Sequence[int] = 8,
    threshold: str | ThresholdSpec = DEFAULT_THRESHOLD,
    method: str = DEFAULT_CALIBRATION,
    num_images: int | None = None,
    bins: int = DEFAULT_BINS,
    progress: Progress | None = None,
    encoding_levels: int = DEFAULT_ENCODING_LEVELS,
    population_budget: float = DEFAULT_POPULATION_BUDGET,
    memory_budget: int | str | None = None,
) -> Calibration:
    """Record thresholds and calibrate the distribution error for each T (labels are never used).

    Encoding sites get ceil(encoding_levels/T) neurons per channel (population coding of the image); with a
    `population_budget` > 0, so do the hidden sites whose quantization costs the most accuracy per added
    neuron, while the added neurons stay within that fraction of the network's (sensitivity.py).
    `memory_budget` (bytes, or e.g. "4GiB"; default memory.default_budget()) bounds what calibration holds
    beyond the model and one batch; every image is used whatever their number (memory.py)."""
    encoding_levels = check_encoding_levels(encoding_levels)
    population_budget = check_population_budget(population_budget)
    steps = [time_steps] if isinstance(time_steps, int) else list(time_steps)
    if not steps:
        raise ConfigError("no T given", "for example time_steps=[4, 8, 16]")
    steps = sorted({check_time_steps(t) for t in steps})
    spec = ThresholdSpec.parse(threshold)
    CALIBRATIONS.get(method)
    budget = default_budget() if memory_budget is None else parse_budget(memory_budget)
    started = time.perf_counter()
    meter = TensorMeter()
    with meter:
        calibration = _calibrate(model, data, steps, spec, method, num_images, bins, progress or NoProgress(),
                                 encoding_levels, population_budget, budget)
    calibration.provenance.update({
        "calibration_seconds": round(time.perf_counter() - started, 3),
        "memory_budget_mb": round(budget / MiB, 1),
        "peak_tensor_mb": round(meter.peak / MiB, 1),
        "peak_rss_mb": round(peak_rss_bytes() / MiB, 1),
    })
    return calibration


def _calibrate(model: nn.Module, data: Tensor | Iterable, steps: list[int], spec: ThresholdSpec, method: str,
               num_images: int | None, bins: int, progress: Progress, encoding_levels: int,
               population_budget: float, budget: int) -> Calibration:
    plans = {T: plan(spec, method, T) for T in steps}
    histograms = any(p.needs_histogram for p, _ in plans.values())
    work = copy.deepcopy(model).eval()
    # Refuse an unsupported network on one image, before reading the whole calibration set.
    first, data = first_batch(data)
    sites = find_sites(work, first[:1].to(next(work.parameters()).device))
    batches = ImageBatches(data, num_images, hold_bytes=budget // 2)
    passes = 2 if histograms else 1
    stats = record_activations(work, sites, batches, histograms=histograms, bins=bins,
                               progress=progress.stage("recording thresholds", passes * len(batches)))
    populated = choose_population(work, sites, stats, batches, steps, encoding_levels, population_budget, budget,
                                  progress)
    # populations(T) is the one rule for neurons per channel; an empty calibration lends it before params exist
    shell = Calibration(sites, str(spec), method, {}, {}, encoding_levels=encoding_levels, populated=populated)
    params: dict[int, dict[str, SiteParams]] = {}
    weights: dict[int, dict[str, Tensor]] = {}
    notes: dict[str, Any] = {}
    for T in steps:
        spec_t, method_t = plans[T]
        populations = shell.populations(T)
        thetas = {s.name: spec_t.compute(stats[s.name], T * populations[s.name]) for s in sites}
        qnet = copy.deepcopy(work)
        modules = quantize(qnet, sites, thetas, T, populations)
        stage = _Labelled(progress, f"T={T}")
        notes.update(CALIBRATIONS.get(method_t)(qnet, modules, batches, budget, stage) or {})
        params[T] = {name: SiteParams(m.theta.cpu(), m.delta_in.cpu(), m.delta_out.cpu())
                     for name, m in modules.items()}
        changed = changed_weights(work, qnet, modules)
        if changed:
            weights[T] = changed
    provenance = {
        "num_images": distributed.reduce_count(batches.num_images),
        "weights_sha256": weights_fingerprint(model),
        "world_size": distributed.world_size(),
        "torch_version": torch.__version__,
        **notes,
    }
    if method == "auto":
        provenance["auto"] = {str(T): f"{p}/{m}" for T, (p, m) in plans.items()}
    if population_budget > 0:
        provenance["population_budget"] = population_budget
    data_config = data_config_of(model)
    data_config.setdefault("input_size", list(first.shape[1:]))  # what convert probes the model with
    return Calibration(sites, str(spec), method, params, {n: s.max.cpu() for n, s in stats.items()},
                       source_of(model), data_config, provenance, weights, encoding_levels, populated)


class _Labelled:
    """A Progress whose stage names say which T they belong to."""

    def __init__(self, progress: Progress, label: str):
        self.progress, self.label = progress, label

    def stage(self, description: str, total: int | None):
        return self.progress.stage(f"{description} ({self.label})", total)


def choose_population(model: nn.Module, sites: list[Site], stats: dict, batches: ImageBatches, steps: list[int],
                      encoding_levels: int, budget: float, memory_budget: int,
                      progress: Progress) -> dict[int, list[str]]:
    """Per T, the hidden sites to population-code within the neuron budget (none when it is 0)."""
    size = {T: population_size(T, encoding_levels) for T in steps}
    wanted = [T for T in steps if size[T] > 1]
    if budget <= 0 or not wanted:
        return {}
    resolutions = sorted({L for T in wanted for L in (T, size[T] * T)})
    ticks = progress.stage("measuring site sensitivity", len(batches))
    sensitivity, neurons = site_sensitivity(model, sites, {n: s.max for n, s in stats.items()}, batches,
                                            resolutions, max(memory_budget - batches.held_bytes, 0), ticks)
    chosen = {T: choose_populated(sites, sensitivity, neurons, T, size[T], budget) for T in wanted}
    return {T: names for T, names in chosen.items() if names}


def changed_weights(original: nn.Module, calibrated: nn.Module, modules: dict[str, nn.Module]) -> dict[str, Tensor]:
    """State-dict entries of `calibrated` (sites left out) that `original` lacks or holds other values for."""
    before = original.state_dict()
    changed = {}
    for key, value in calibrated.state_dict().items():
        if key.rpartition(".")[0] in modules:
            continue
        if key not in before or not torch.equal(before[key], value):
            changed[key] = value.detach().cpu().clone()
    return changed


def check_calibration_fits(model: nn.Module, calibration: Calibration) -> None:
    """Refuse a calibration made for another architecture (its sites, their activations and channels differ
    from the model's, either way) or for other weights (its recorded fingerprint differs)."""
    size = calibration.data_config.get("input_size")
    if size:
        mine = [(s.name, s.activation, s.channels) for s in find_sites(copy.deepcopy(model).eval(),
                                                                       blank_input(model, size))]
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
    info = ConversionInfo(
        time_steps=time_steps, neuron=neuron, sites=list(calibration.sites), threshold=calibration.threshold,
        calibration=calibration.method, source=calibration.source, data_config=dict(calibration.data_config),
        provenance=dict(calibration.provenance), encoding_levels=calibration.encoding_levels,
        populated=list(calibration.populated.get(time_steps, [])), num_classes=_num_outputs(net, calibration),
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


def blank_input(model: nn.Module, size: Sequence[int]) -> Tensor:
    """One all-zero image of `size` [C, H, W] on the model's device, in its dtype."""
    param = next(model.parameters())
    return torch.zeros(1, *size, device=param.device, dtype=param.dtype)


def convert(
    model: nn.Module,
    calib: Calibration | Tensor | Iterable,
    time_steps: int = 8,
    *,
    threshold: str | ThresholdSpec = DEFAULT_THRESHOLD,
    calibration: str = DEFAULT_CALIBRATION,
    neuron: str = "parallel",
    num_images: int | None = None,
    bins: int = DEFAULT_BINS,
    source: ModelSource | None = None,
    progress: Progress | None = None,
    encoding_levels: int = DEFAULT_ENCODING_LEVELS,
    population_budget: float = DEFAULT_POPULATION_BUDGET,
) -> SpikingNetwork:
    """Convert a ReLU/ReLU6 classifier into a parallel-spiking SNN with T time steps.

    `calib` is either calibration batches (tensors or (x, y) pairs; labels unused) or a `Calibration`
    made earlier by `calibrate`. The returned SNN maps [B, ...] to the time-mean output [B, classes].
    """
    time_steps = check_time_steps(time_steps)
    NEURONS.get(neuron)
    if not isinstance(calib, Calibration):
        calib = calibrate(model, calib, [time_steps], threshold, calibration, num_images, bins, progress,
                          encoding_levels, population_budget)
    snn = build_snn(model, calib, time_steps, neuron)
    if source is not None:
        snn.info.source = source
    return snn
