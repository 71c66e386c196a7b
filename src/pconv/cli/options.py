"""Options shared by several commands, parsed once at the edge, and the model/data loading they drive."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click
import torch
from torch.utils.data import DataLoader, Subset

from ..calibrate import CALIBRATIONS
from ..data import image_dataset, resolve_config, subset
from .. import distributed
from ..errors import ConfigError
from ..memory import GiB, default_budget, parse_budget
from ..neurons import ENGINES, NEURONS
from ..pipeline import (DEFAULT_CALIBRATION, DEFAULT_ENCODING_LEVELS, DEFAULT_POPULATION_BUDGET, DEFAULT_THRESHOLD,
                        MAX_TIME_STEPS, check_time_steps)
from ..thresholds import THRESHOLDS, ThresholdSpec

DEBUG_KEY = "pconv.debug"
#: Calibration subset when --num-images is not given: the whole folder, up to this many images.
DEFAULT_CALIBRATION_IMAGES = 512


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[DEBUG_KEY] = True
    return value


def debug_option(f: Callable) -> Callable:
    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                        help="Show the full traceback of an error.")(f)


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print exactly one JSON document on stdout instead of tables.")(f)


class TimeStepsList(click.ParamType):
    """`8` or `4,8,16`: a sorted list of distinct T values."""

    name = "T[,T...]"

    def convert(self, value: Any, param, ctx) -> list[int]:
        if isinstance(value, list):
            return value
        steps = []
        for part in str(value).split(","):
            part = part.strip()
            try:
                t = int(part)
            except ValueError:
                self.fail(f"{part!r} is not an integer — write T as e.g. 8, or several as 4,8,16", param, ctx)
            try:
                steps.append(check_time_steps(t))
            except ConfigError as e:
                self.fail(str(e), param, ctx)
        return sorted(set(steps))


class TimeSteps(TimeStepsList):
    name = "T"

    def convert(self, value: Any, param, ctx) -> int:
        if isinstance(value, int):
            return value
        steps = super().convert(value, param, ctx)
        if len(steps) != 1:
            self.fail(f"give one T here, got {value!r}", param, ctx)
        return steps[0]


class Threshold(click.ParamType):
    name = "METHOD[:VALUE]"

    def convert(self, value: Any, param, ctx) -> str:
        try:
            return str(ThresholdSpec.parse(value))
        except ConfigError as e:
            self.fail(str(e), param, ctx)


class FloatList(click.ParamType):
    """`0.5` or `0.485,0.456,0.406`."""

    name = "X[,X...]"

    def convert(self, value: Any, param, ctx) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return tuple(float(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers — e.g. 0.485,0.456,0.406", param, ctx)


class InputSize(click.ParamType):
    """`C,H,W`, `H,W` or `S` (square); channels default to the model's."""

    name = "C,H,W"

    def convert(self, value: Any, param, ctx) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            size = tuple(int(v) for v in str(value).replace("x", ",").split(","))
        except ValueError:
            size = ()
        if not 1 <= len(size) <= 3 or min(size) < 1:
            self.fail(f"{value!r} is not an input size — write C,H,W (3,224,224), H,W or one side", param, ctx)
        return size


def model_options(f: Callable) -> Callable:
    f = click.option("--random-weights", is_flag=True,
                     help="Convert the architecture with its random initial weights (tests, speed benchmarks); "
                          "without it a model needs --checkpoint.")(f)
    f = click.option("--num-classes", type=click.IntRange(min=1), default=None,
                     help="Classifier size, if it differs from the model's default (timm models).")(f)
    f = click.option("--checkpoint", "-c", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Weights file (.safetensors, or .pth/.pt loaded weights-only).")(f)
    return f


def trust_factory_option(f: Callable) -> Callable:
    return click.option("--trust-factory", is_flag=True,
                        help="Run the model factory the file names (your own code, package.module:function) to "
                             "rebuild its architecture. Without it only timm models and pconv's own are built.")(f)


def num_images_option(help: str) -> Callable[[Callable], Callable]:
    return click.option("--num-images", "-n", type=click.IntRange(min=1), default=None, help=help)


def class_map_option(f: Callable) -> Callable:
    return click.option("--class-map", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="Text file naming the class folders, one per line, line k = class k "
                             "[default: DIR/class_map.txt if present].")(f)


def preprocessing_options(f: Callable) -> Callable:
    f = click.option("--input-size", type=InputSize(), default=None, help="Override the input size (C,H,W).")(f)
    f = click.option("--std", type=FloatList(), default=None, help="Override the normalisation std.")(f)
    f = click.option("--mean", type=FloatList(), default=None, help="Override the normalisation mean.")(f)
    return f


def loader_options(default_batch: int = 64) -> Callable[[Callable], Callable]:
    def wrap(f: Callable) -> Callable:
        f = click.option("--workers", "-j", type=click.IntRange(min=0), default=0, show_default=True,
                         help="Data-loading worker processes.")(f)
        f = click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
                         help="Seed of the random --num-images subset.")(f)
        f = click.option("--batch-size", "-b", type=click.IntRange(min=1), default=default_batch, show_default=True,
                         help="Images per batch.")(f)
        return f
    return wrap


def device_option(f: Callable) -> Callable:
    return click.option("--device", default="auto", show_default=True,
                        help="cpu, cuda, cuda:N, or auto (cuda when available).")(f)


def threshold_option(f: Callable) -> Callable:
    return click.option("--threshold", type=Threshold(), default=DEFAULT_THRESHOLD, show_default=True,
                        help=f"Threshold method: {', '.join(THRESHOLDS.names())}; percentile takes a value, "
                             "e.g. percentile:99.99.")(f)


class MemorySize(click.ParamType):
    """`4GiB`, `512M`, `2.5G` -> bytes."""

    name = "SIZE"

    def convert(self, value: Any, param, ctx) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_budget(value)
        except ConfigError as e:
            self.fail(str(e), param, ctx)


def calibration_method_option(f: Callable) -> Callable:
    f = click.option("--memory-budget", type=MemorySize(), default=None,
                     help="Most memory calibration holds beyond the model and one batch, e.g. 4GiB [default: a "
                          f"fifth of this machine's memory, {default_budget() / GiB:.1f} GiB]; past it pconv "
                          "recomputes instead of holding.")(f)
    f = click.option("--population-budget", type=click.FloatRange(0.0, 100.0), default=DEFAULT_POPULATION_BUDGET,
                     show_default=True,
                     help="Also population-code the hidden sites whose quantization costs the most accuracy per "
                          "added neuron (label-free sensitivity), while the added neurons stay within this "
                          "fraction of the network's, e.g. 0.25; 0: encoding sites only.")(f)
    f = click.option("--encoding-levels", type=click.IntRange(0, MAX_TIME_STEPS), default=DEFAULT_ENCODING_LEVELS,
                     show_default=True,
                     help="Levels the encoding layer (the neurons that see the image) resolves at any T, with "
                          "ceil(levels/T) neurons per channel; 0: one neuron per channel.")(f)
    return click.option("--calibration", "method", type=click.Choice(CALIBRATIONS.names()),
                        default=DEFAULT_CALIBRATION, show_default=True,
                        help="auto (pconv's default: fit at T <= 8, mse thresholds above), fit, refit, "
                             "da (the paper's), or none (plain QCFS).")(f)


def neuron_option(default: str | None, help: str) -> Callable[[Callable], Callable]:
    return click.option("--neuron", type=click.Choice(NEURONS.names()), default=default, show_default=bool(default),
                        help=help)


def engine_option(f: Callable) -> Callable:
    return click.option("--engine", type=click.Choice(ENGINES), default=None,
                        help="counts (default; cost independent of T), spikes (T samples per image in one "
                             "pass) or steps (T sequential passes; serial neurons only).")(f)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}", "use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} but CUDA is not available here", "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name} but there are {torch.cuda.device_count()} CUDA devices",
                              "use --device cuda:0")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps but MPS is not available here", "use --device cpu")
    return device


def apply_overrides(data_config: dict[str, Any], mean, std, input_size) -> dict[str, Any]:
    """The data config with --mean/--std/--input-size applied (single values broadcast over channels); a
    value that does not fit is a usage error naming the option."""
    cfg = dict(data_config)
    if input_size is not None:
        channels = (cfg.get("input_size") or (3,))[0]
        size = tuple(input_size)
        cfg["input_size"] = size if len(size) == 3 else (channels, *(size * 2 if len(size) == 1 else size))
    channels = (cfg.get("input_size") or (3,))[0]
    for key, value in (("mean", mean), ("std", std)):
        if value is None:
            continue
        if len(value) == 1:
            value = value * channels
        if len(value) != channels:
            raise click.BadParameter(f"{len(value)} values for {channels} input channels — give one value or "
                                     f"{channels}", param_hint=f"'--{key}'")
        if key == "std" and min(value) <= 0:
            raise click.BadParameter("std values must be positive — for example --std 0.229,0.224,0.225",
                                     param_hint="'--std'")
        cfg[key] = tuple(value)
    return resolve_config(cfg)


def make_loader(root: Path, data_config: dict[str, Any], batch_size: int, num_images: int | None, seed: int,
                workers: int, cap: int | None = None, num_classes: int | None = None,
                class_map: Path | None = None, labelled: bool = True) -> DataLoader:
    """A loader over `num_images` images of `root` drawn with `seed` (all, up to `cap`, when None); labels
    matched to `num_classes` outputs unless `labelled` is False (see pconv.data)."""
    dataset = image_dataset(root, data_config, num_classes, class_map, labelled)
    if num_images is None and cap is not None and len(dataset) > cap:
        num_images = cap
    dataset = subset(dataset, num_images, seed)
    if distributed.active():  # each rank reads its own shard; statistics are reduced across ranks
        dataset = Subset(dataset, distributed.shard(range(len(dataset))))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=False, persistent_workers=False)


class FirstPassProgress:
    """A re-iterable view of a loader whose first pass (decoding every image) is shown as a progress stage;
    calibration keeps the decoded images while they fit its memory budget, else reads the loader again."""

    def __init__(self, loader: DataLoader, progress):
        self.loader = loader
        self.progress = progress
        self._first = True

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        advance = self.progress.stage("reading images", len(self.loader)) if self._first else None
        self._first = False
        for item in self.loader:
            yield item
            if advance is not None:
                advance()


def check_not_given(ctx: click.Context, names: list[str], reason: str) -> None:
    """A usage error if any of the options `names` was given on the command line."""
    given = [n for n in names
             if ctx.get_parameter_source(n) not in (None, click.core.ParameterSource.DEFAULT)]
    if given:
        flags = ", ".join("--" + n.replace("_", "-").replace("method", "calibration") for n in given)
        raise click.UsageError(f"{flags} {reason}", ctx=ctx)


def model_label(spec: str, checkpoint: Path | None) -> str:
    return f"{spec} + {checkpoint.name}" if checkpoint else spec
