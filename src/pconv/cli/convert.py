"""`pconv convert`: the whole pipeline (from images) or from a calibration file, to one SNN file."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..config import DEFAULT_CALIBRATION_IMAGES, DEFAULT_T
from ..files.atomic import check_output
from ..files.export import load_calibration, save
from ..pipeline import build_snn
from ..utils import distributed
from ._loading import (FolderRun, ModelChoice, calibrate_on_folder, calibration_config, load_model,
                       resolve_device)
from ._options import (CALIBRATION_PARAMETERS, TimeSteps, calibration_options, check_not_given, debug_option,
                       device_option, json_option, loader_options, model_options, neuron_option, num_images_option,
                       preprocessing_options)
from ._output import (Output, encoding_summary, human_bytes, key_value_table, overflow_summary, plan_summary,
                      population_summary)

#: What only applies when calibrating from images: refused with --calib, which fixes them.
CALIBRATION_OPTIONS = ["num_images", "batch_size", "seed", "workers", *CALIBRATION_PARAMETERS,
                       "input_size", "img_size", "mean", "std", "interpolation", "crop_pct", "crop_mode",
                       "use_train_size"]


@click.command("convert")
@click.argument("model")
@click.option("--calib", "calib", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Calibration file from `pconv calibrate` (no images needed).")
@click.option("--data", "-d", "data", type=click.Path(path_type=Path), default=None,
              help="Image folder to calibrate on (instead of --calib).")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="SNN file to write (.safetensors).")
@click.option("--time-steps", "-T", "time_steps", type=TimeSteps(), default=None,
              help=f"Time steps [default: {DEFAULT_T}, or the only T of --calib].")
@neuron_option("parallel", "Spiking neuron of the exported SNN.")
@model_options
@num_images_option(f"Calibration images (--data), drawn with --seed [default: all, at most "
                   f"{DEFAULT_CALIBRATION_IMAGES}].")
@loader_options(default_batch=64)
@calibration_options
@preprocessing_options(train_size=True)
@device_option
@click.option("--force", "-f", is_flag=True, help="Overwrite the output file if it exists.")
@json_option
@debug_option
@click.pass_context
def convert(ctx: click.Context, choice: ModelChoice, calib: Path | None, data: Path | None, output: Path,
            time_steps: int | None, neuron: str, num_images: int | None, batch_size: int, seed: int, workers: int,
            threshold: str, method: str, encoding_levels: int, population_budget: float,
            overflow_sites: float | None, recon_steps: int | None,
            recon_drop: float | None, memory_budget: int | None,
            overrides: dict, use_train_size: bool, device: str, force: bool, as_json: bool) -> None:
    """Convert MODEL into a spiking network with T time steps and write it to one safetensors file.

    Calibrate on the images in --data, or reuse a calibration file made by `pconv calibrate` with --calib.
    """
    if (calib is None) == (data is None):
        raise click.UsageError("give exactly one of --calib CALIB or --data DIR", ctx=ctx)
    if calib is not None:
        check_not_given(ctx, CALIBRATION_OPTIONS, "only apply when calibrating (--data); the calibration file "
                                                  "already fixes them")
    out = Output(as_json)
    if data is not None:
        config = calibration_config([time_steps or DEFAULT_T], threshold, method, encoding_levels, population_budget,
                                    recon_steps, recon_drop, overflow_sites)
    check_output(output, force)
    started = time.perf_counter()
    dev = resolve_device(device)
    net, data_config, sites = load_model(choice, dev, overrides, use_test_size=not use_train_size)
    with out.progress() as progress:
        if calib is not None:
            calibration = load_calibration(calib)
            if not calibration.provenance.get("weights_sha256"):
                out.warn(f"{calib} records no weights fingerprint, so pconv cannot check that it was made for "
                         "these weights")
            if time_steps is None:
                if len(calibration.time_steps) != 1:
                    raise click.UsageError(f"{calib} holds T = {', '.join(map(str, calibration.time_steps))}; "
                                           "choose one with -T", ctx=ctx)
                time_steps = calibration.time_steps[0]
            calibration.provenance["calibration_file"] = calib.name
            source = f"calibration file {calib}"
        else:
            time_steps = config.time_steps[0]
            run = FolderRun(data, num_images, batch_size, seed, workers, memory_budget, choice.provenance)
            calibration = calibrate_on_folder(net, data_config, config, run, progress)
            source = f"{calibration.provenance.get('num_images')} images from {data} (seed {seed})"
        snn = build_snn(net, calibration, time_steps, neuron)
        snn.info.source = net.pconv_source  # how this model was built, whatever the calibration recorded
        path = save(snn.to("cpu"), output, force=force) if distributed.is_main() else output
        distributed.barrier()  # rank 0 has written the file before any rank reads it
    neurons_per_site = {s.name: s.channels for s in snn.info.sites}
    doc = {
        "output": str(path),
        "bytes": path.stat().st_size,
        "model": choice.spec,
        "checkpoint": str(choice.checkpoint) if choice.checkpoint else None,
        "pretrained": choice.pretrained,
        "time_steps": time_steps,
        "neuron": neuron,
        "threshold": snn.info.threshold,
        "calibration": snn.info.method,
        "config": calibration.config.to_dict(),
        "encoding_levels": calibration.encoding_levels,
        "populations": {n: m for n, m in calibration.populations(time_steps).items() if m > 1},
        "overflow": list(snn.info.overflow),
        "calibrated_on": source,
        "num_sites": len(snn.info.sites),
        "num_channels": sum(neurons_per_site.values()),
        "data_config": snn.info.data_config,
        "device": str(dev),
        "seconds": round(time.perf_counter() - started, 3),
    }

    def render(console) -> None:
        console.print(key_value_table([
            ("model", choice.label),
            ("T", time_steps),
            ("neuron", neuron),
            ("sites", f"{len(snn.info.sites)} spiking layers, {doc['num_channels']} channels"),
            ("threshold", snn.info.threshold),
            ("calibration", f"{plan_summary(calibration, [time_steps])} on {source}"),
            ("encoding", encoding_summary(calibration, [time_steps])),
            *([("population", population_summary(calibration, [time_steps]))] if calibration.populated else []),
            *([("overflow", overflow_summary(calibration))] if calibration.overflow else []),
            ("time", f"{doc['seconds']:.1f} s on {dev}"),
        ], title=f"SNN written to {path} ({human_bytes(doc['bytes'])})"))
        console.print(f"Next: pconv eval {path} --data DIR", markup=False)

    out.result(doc, render)
