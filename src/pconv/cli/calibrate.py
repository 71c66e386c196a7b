"""`pconv calibrate`: record thresholds and calibration statistics for one or more T, once.

`pconv convert MODEL --calib FILE -T t` then rebuilds the SNN for any recorded t without touching the data.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..config import DEFAULT_CALIBRATION_IMAGES
from ..files.atomic import check_output
from ..files.export import save_calibration
from ..utils import distributed
from ._loading import (FolderRun, ModelChoice, calibrate_on_folder, calibration_config, load_model,
                       resolve_device)
from ._options import (TimeStepsList, calibration_options, debug_option, device_option, json_option, loader_options,
                       model_options, num_images_option, preprocessing_options)
from ._output import (MEMORY_KEYS, Output, encoding_summary, human_bytes, key_value_table, memory_summary,
                      overflow_summary, plan_summary, population_summary)


@click.command("calibrate")
@click.argument("model")
@click.option("--data", "-d", "data", required=True, type=click.Path(path_type=Path),
              help="Image folder (any layout; labels are not used).")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Calibration file to write (.safetensors).")
@click.option("--time-steps", "-T", "time_steps", type=TimeStepsList(), default="8", show_default=True,
              help="One or more T, e.g. 4,8,16.")
@model_options
@num_images_option(f"Calibration images, drawn with --seed [default: all, at most {DEFAULT_CALIBRATION_IMAGES}].")
@loader_options(default_batch=64)
@calibration_options
@preprocessing_options(train_size=True)
@device_option
@click.option("--force", "-f", is_flag=True, help="Overwrite the output file if it exists.")
@json_option
@debug_option
def calibrate(choice: ModelChoice, data: Path, output: Path, time_steps: list[int], num_images: int | None,
              batch_size: int, seed: int, workers: int, threshold: str, method: str, encoding_levels: int,
              population_budget: float, overflow_sites: float | None, recon_steps: int | None,
              recon_drop: float | None, memory_budget: int | None, overrides: dict, use_train_size: bool, device: str,
              force: bool, as_json: bool) -> None:
    """Record thresholds and calibration statistics of MODEL on the images in --data.

    The file holds everything `pconv convert --calib` needs for each T given with -T, so conversion can be
    re-run without the data.
    """
    out = Output(as_json)
    config = calibration_config(time_steps, threshold, method, encoding_levels, population_budget, recon_steps,
                                recon_drop, overflow_sites)
    check_output(output, force)  # fail before the expensive part
    started = time.perf_counter()
    dev = resolve_device(device)
    net, data_config, sites = load_model(choice, dev, overrides, use_test_size=not use_train_size)
    run = FolderRun(data, num_images, batch_size, seed, workers, memory_budget, choice.provenance)
    with out.progress() as progress:
        calibration = calibrate_on_folder(net, data_config, config, run, progress)
        path = save_calibration(calibration, output, force=force) if distributed.is_main() else output
        distributed.barrier()  # rank 0 has written the file before any rank reads it
    doc = {
        "output": str(path),
        "bytes": path.stat().st_size,
        "model": choice.spec,
        "checkpoint": str(choice.checkpoint) if choice.checkpoint else None,
        "pretrained": choice.pretrained,
        "time_steps": calibration.time_steps,
        "threshold": calibration.threshold,
        "calibration": calibration.method,
        "config": calibration.config.to_dict(),
        "encoding_levels": calibration.encoding_levels,
        "population_budget": population_budget,
        "populations": {T: {n: m for n, m in calibration.populations(T).items() if m > 1}
                        for T in calibration.time_steps},
        "overflow": calibration.overflow,
        "num_sites": len(calibration.sites),
        "num_images": calibration.provenance.get("num_images"),
        "seed": seed,
        "data": str(data),
        "data_config": calibration.data_config,
        "device": str(dev),
        "weights_sha256": calibration.provenance["weights_sha256"],
        "seconds": round(time.perf_counter() - started, 3),
        **{key: calibration.provenance[key] for key in MEMORY_KEYS},
    }

    def render(console) -> None:
        console.print(key_value_table([
            ("model", choice.label),
            ("sites", f"{len(calibration.sites)} activations → spiking neurons"),
            ("T", ", ".join(map(str, calibration.time_steps))),
            ("threshold", calibration.threshold),
            ("calibration", plan_summary(calibration, calibration.time_steps)),
            ("encoding", encoding_summary(calibration, calibration.time_steps)),
            *([("population", population_summary(calibration, calibration.time_steps))] if population_budget else []),
            *([("overflow", overflow_summary(calibration))] if calibration.overflow else []),
            ("images", f"{doc['num_images']} from {data} (seed {seed})"),
            ("input", f"{'x'.join(map(str, data_config['input_size']))}, mean {tuple(data_config['mean'])}, "
                      f"std {tuple(data_config['std'])}"),
            ("time", f"{doc['seconds']:.1f} s on {dev}"),
            ("memory", memory_summary(calibration.provenance)),
        ], title=f"Calibration written to {path} ({human_bytes(doc['bytes'])})"))

    out.result(doc, render)
