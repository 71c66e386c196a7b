"""Options shared by several commands, parsed once at the edge (their values validated by click types)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Any, Callable

import click

from ..calibration import CALIBRATIONS
from ..config import (DEFAULT_ENCODING_LEVELS, DEFAULT_METHOD, DEFAULT_OVERFLOW_SITES, DEFAULT_POPULATION_BUDGET,
                      DEFAULT_RECON_DROP, DEFAULT_RECON_STEPS, DEFAULT_THRESHOLD, MAX_RECON_STEPS, MAX_TIME_STEPS, check_time_steps)
from ..data.config import CROP_MODES, INTERPOLATIONS
from ..errors import ConfigError
from ..nn.neurons import ENGINES, NEURONS
from ..observe.thresholds import THRESHOLDS, ThresholdSpec
from ..utils.memory import GiB, default_budget, parse_budget
from ._loading import ModelChoice

DEBUG_KEY = "pconv.debug"


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


class ModelKwargs(click.ParamType):
    """`key=value` (repeatable, or comma-separated), the value read as a Python literal or else as text."""

    name = "KEY=VALUE"

    def convert(self, value: Any, param, ctx) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        out = {}
        for item in str(value).split(","):
            key, sep, text = item.strip().partition("=")
            if not sep or not key.isidentifier():
                self.fail(f"{item!r} is not key=value — e.g. --model-kwargs drop_rate=0.0", param, ctx)
            try:
                out[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                out[key] = text
        return out


def model_options(f: Callable) -> Callable:
    """--checkpoint, --pretrained, --use-ema, --num-classes, --model-kwargs, --random-weights; the command gets
    them, with its MODEL argument, as one `choice` (a _loading.ModelChoice)."""
    @functools.wraps(f)
    def grouped(*args, **kwargs):
        model_kwargs = {}
        for part in kwargs.pop("model_kwargs"):
            model_kwargs.update(part)
        kwargs["choice"] = ModelChoice(kwargs.pop("model"), kwargs.pop("checkpoint"), kwargs.pop("pretrained"),
                                       kwargs.pop("use_ema"), kwargs.pop("random_weights"), kwargs.pop("num_classes"),
                                       model_kwargs)
        return f(*args, **kwargs)

    grouped = click.option("--random-weights", is_flag=True,
                           help="Convert the architecture with its random initial weights (tests, speed benchmarks); "
                                "without it a model needs --checkpoint or --pretrained.")(grouped)
    grouped = click.option("--model-kwargs", type=ModelKwargs(), multiple=True,
                           help="Keyword arguments for timm.create_model, key=value (repeatable), as validate.py's "
                                "--model-kwargs.")(grouped)
    grouped = click.option("--num-classes", type=click.IntRange(min=1), default=None,
                           help="Classifier size, if it differs from the model's default (timm models).")(grouped)
    grouped = click.option("--use-ema", is_flag=True,
                           help="Take the EMA weights of a timm training checkpoint (state_dict_ema), as "
                                "validate.py --use-ema.")(grouped)
    grouped = click.option("--pretrained", is_flag=True,
                           help="timm's pretrained weights of MODEL (e.g. resnet50.a1_in1k or hf-hub:timm/NAME), "
                                "from the local Hugging Face cache.")(grouped)
    return click.option("--checkpoint", "-c", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="Weights file: .safetensors, .pth/.pt, or a timm training checkpoint (.pth.tar), "
                             "loaded weights-only.")(grouped)


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


def preprocessing_options(train_size: bool) -> Callable[[Callable], Callable]:
    """The data-config options validate.py has (and --use-train-size when the model's config is read, not a
    file's); the command gets them as one `overrides` dict (None: not given)."""
    names = ("input_size", "img_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")

    def wrap(f: Callable) -> Callable:
        @functools.wraps(f)
        def grouped(*args, **kwargs):
            kwargs["overrides"] = {name: kwargs.pop(name) for name in names}
            return f(*args, **kwargs)

        options = [
            click.option("--crop-mode", type=click.Choice(CROP_MODES), default=None, help="Override the crop mode."),
            click.option("--crop-pct", type=click.FloatRange(0.0, 4.0, min_open=True), default=None,
                         help="Override the centre-crop fraction."),
            click.option("--interpolation", type=click.Choice(INTERPOLATIONS), default=None,
                         help="Override the resize interpolation."),
            click.option("--std", type=FloatList(), default=None, help="Override the normalisation std."),
            click.option("--mean", type=FloatList(), default=None, help="Override the normalisation mean."),
            click.option("--img-size", type=click.IntRange(min=1), default=None,
                         help="Override the input image size (square)."),
            click.option("--input-size", type=InputSize(), default=None, help="Override the input size (C,H,W)."),
        ]
        if train_size:
            options.insert(0, click.option("--use-train-size", is_flag=True,
                                           help="The model's training input size and crop instead of its test ones "
                                                "(validate.py --use-train-size)."))
        for option in options:
            grouped = option(grouped)
        return grouped
    return wrap


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


def calibration_options(f: Callable) -> Callable:
    """--threshold, --calibration, --recon-steps, --recon-drop, --encoding-levels, --population-budget,
    --overflow-sites and --memory-budget."""
    f = click.option("--memory-budget", type=MemorySize(), default=None,
                     help="Most memory calibration holds beyond the model and one batch, e.g. 4GiB [default: a "
                          f"fifth of this machine's memory, {default_budget() / GiB:.1f} GiB]; past it pconv "
                          "recomputes instead of holding.")(f)
    f = click.option("--recon-steps", type=click.IntRange(0, MAX_RECON_STEPS), default=None,
                     help=f"Adam steps per block of --calibration recon [default: {DEFAULT_RECON_STEPS}]; more "
                          "steps, closer to the ANN and longer to calibrate.")(f)
    f = click.option("--recon-drop", type=click.FloatRange(0.0, 1.0), default=None,
                     help=f"Probability that --calibration recon passes an activation of the block it trains "
                          f"unrounded (QDrop) [default: {DEFAULT_RECON_DROP}]; 0: every block trains on rounded "
                          "activations only.")(f)
    f = click.option("--overflow-sites", type=click.FloatRange(0.0, 1.0), default=None,
                     help="Give the last this fraction of the activation sites one more neuron per channel that "
                          "counts up to T levels above the site's top one, for what unseen images bring above the "
                          f"calibration's range [default: {DEFAULT_OVERFLOW_SITES} with population coding on, 0 "
                          "with --encoding-levels 0 or --population-budget 0]; 0: none.")(f)
    f = click.option("--population-budget", type=click.FloatRange(0.0, 100.0), default=DEFAULT_POPULATION_BUDGET,
                     show_default=True,
                     help="Choose every site's neurons per channel, the encoding sites' included, where they "
                          "gain the most accuracy per added neuron (label-free sensitivity), while the added "
                          "neurons stay within this fraction of the network's plus the encoding population's, "
                          "e.g. 0.25; 0: no choice, the encoding sites take ceil(levels/T).")(f)
    f = click.option("--encoding-levels", type=click.IntRange(0, MAX_TIME_STEPS), default=DEFAULT_ENCODING_LEVELS,
                     show_default=True,
                     help="Most levels a population reaches at any T (at most ceil(levels/T) neurons per channel; "
                          "without a budget the encoding layer, the neurons that see the image, has that many); "
                          "0: one neuron per channel.")(f)
    methods = "; ".join(f"{m}: {CALIBRATIONS.get(m).summary.rstrip('.')}" for m in CALIBRATIONS.names())
    f = click.option("--calibration", "method", type=click.Choice(CALIBRATIONS.names()),
                     default=DEFAULT_METHOD, show_default=True, help=f"Calibration method ({methods}).")(f)
    return threshold_option(f)


#: The parameter names calibration_options adds (convert refuses them with --calib).
CALIBRATION_PARAMETERS = ["threshold", "method", "encoding_levels", "population_budget", "overflow_sites",
                          "recon_steps",
                          "recon_drop", "memory_budget"]


def neuron_option(default: str | None, help: str) -> Callable[[Callable], Callable]:
    return click.option("--neuron", type=click.Choice(NEURONS.names()), default=default, show_default=bool(default),
                        help=help)


def engine_option(f: Callable) -> Callable:
    return click.option("--engine", type=click.Choice(ENGINES), default=None,
                        help="counts (default; cost independent of T), spikes (T samples per image in one "
                             "pass) or steps (T sequential passes; serial neurons only).")(f)


def check_not_given(ctx: click.Context, names: list[str], reason: str) -> None:
    """A usage error if any of the options `names` (parameter names) was given on the command line."""
    given = [n for n in names
             if ctx.get_parameter_source(n) not in (None, click.core.ParameterSource.DEFAULT)]
    if given:
        flags = {p.name: max(p.opts, key=len) for p in ctx.command.params}
        raise click.UsageError(f"{', '.join(flags[n] for n in given)} {reason}", ctx=ctx)
