"""`pconv calibrate`: record thresholds and DA calibration statistics for one or more T, once.

`pconv convert MODEL --calib FILE -T t` then rebuilds the SNN for any recorded t without touching the data.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from .. import distributed
from ..export import save_calibration
from ..fileio import check_output
from ..models import create_model
from ..pipeline import Calibration, calibrate as run_calibrate, data_config_of
from ..sites import Site, find_sites
from .output import Output, RichProgress, human_bytes, key_value_table
from .options import (DEFAULT_CALIBRATION_IMAGES, FirstPassProgress, TimeStepsList, apply_overrides,
                      calibration_method_option, debug_option, device_option, json_option, loader_options,
                      make_loader, model_label, model_options, num_images_option, preprocessing_options,
                      resolve_device, threshold_option)


def load_model(spec: str, checkpoint: Path | None, num_classes: int | None, random_weights: bool, device: torch.device,
               mean, std, input_size) -> tuple[nn.Module, dict[str, Any], list[Site]]:
    """The source ANN on `device`, its data config (with overrides) and its activation sites.

    The sites come from a probe on one blank input of the configured size, so an unsupported network is
    refused before any image is read.
    """
    model = create_model(spec, checkpoint=checkpoint, num_classes=num_classes, random_weights=random_weights)
    data_config = apply_overrides(data_config_of(model), mean, std, input_size)
    model.to(device)
    sites = find_sites(model, torch.zeros(1, *data_config["input_size"], device=device))
    return model, data_config, sites


def encoding_summary(sites: list[Site], time_steps: list[int], encoding_levels: int) -> str:
    """One line: how many neurons per channel the encoding sites have at each T."""
    encoders = [s for s in sites if s.encoding]
    if not encoders or encoding_levels == 0:
        return "one neuron per channel at every site"
    per_t = ", ".join(f"{encoders[0].population(T, encoding_levels)} at T={T}" for T in time_steps)
    return f"{', '.join(s.name for s in encoders)}: neurons per channel {per_t} (≥ {encoding_levels} levels)"


def population_summary(calibration: Calibration, time_steps: list[int]) -> str:
    """One line: the hidden sites population-coded at each T (chosen under --population-budget)."""
    parts = []
    for T in time_steps:
        names = calibration.populated.get(T, [])
        if names:
            m = calibration.populations(T)[names[0]]
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            sites = "1 site" if len(names) == 1 else f"{len(names)} sites"
            parts.append(f"T={T}: {sites} × {m} neurons per channel ({shown})")
    return "; ".join(parts) or "none"


MEMORY_KEYS = ("memory_budget_mb", "peak_tensor_mb", "peak_rss_mb")


def memory_summary(provenance: dict) -> str:
    """One line: what the calibration held at its peak, against its budget."""
    return (f"peak {provenance['peak_tensor_mb'] / 1024:.2f} GiB of tensors (budget "
            f"{provenance['memory_budget_mb'] / 1024:.2f} GiB), process peak {provenance['peak_rss_mb'] / 1024:.2f} GiB")


def calibrate_on_folder(model: nn.Module, data_config: dict[str, Any], data: Path, time_steps: list[int],
                        threshold: str, method: str, num_images: int | None, batch_size: int, seed: int,
                        workers: int, progress: RichProgress, extra: dict[str, Any],
                        encoding_levels: int, population_budget: float, memory_budget: int | None) -> Calibration:
    """Calibrate `model` on images of the folder `data`; provenance says where everything came from."""
    torch.manual_seed(seed)
    loader = make_loader(data, data_config, batch_size, num_images, seed, workers, cap=DEFAULT_CALIBRATION_IMAGES,
                         labelled=False)
    calibration = run_calibrate(model, FirstPassProgress(loader, progress), time_steps=time_steps,
                                threshold=threshold, method=method, progress=progress,
                                encoding_levels=encoding_levels, population_budget=population_budget,
                                memory_budget=memory_budget)
    calibration.data_config = dict(data_config)
    calibration.provenance.update({"data": str(data), "seed": seed, **extra})
    return calibration


@click.command("calibrate")
@click.argument("model")
@click.option("--data", "-d", "data", required=True, type=click.Path(path_type=Path),
              help="Image folder (class subfolders; labels are not used).")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Calibration file to write (.safetensors).")
@click.option("--time-steps", "-T", "time_steps", type=TimeStepsList(), default="8", show_default=True,
              help="One or more T, e.g. 4,8,16.")
@model_options
@num_images_option(f"Calibration images, drawn with --seed [default: all, at most {DEFAULT_CALIBRATION_IMAGES}].")
@loader_options(default_batch=64)
@threshold_option
@calibration_method_option
@preprocessing_options
@device_option
@click.option("--force", "-f", is_flag=True, help="Overwrite the output file if it exists.")
@json_option
@debug_option
def calibrate(model: str, data: Path, output: Path, time_steps: list[int], checkpoint: Path | None,
              num_classes: int | None, random_weights: bool, num_images: int | None, batch_size: int, seed: int, workers: int,
              threshold: str, method: str, encoding_levels: int, population_budget: float, memory_budget: int | None,
              mean, std, input_size,
              device: str, force: bool,
              as_json: bool) -> None:
    """Record thresholds and DA calibration statistics of MODEL on the images in --data.

    The file holds everything `pconv convert --calib` needs for each T given with -T, so conversion can be
    re-run without the data.
    """
    out = Output(as_json)
    check_output(output, force)  # fail before the expensive part
    started = time.perf_counter()
    dev = resolve_device(device)
    net, data_config, sites = load_model(model, checkpoint, num_classes, random_weights, dev, mean, std, input_size)
    with out.progress() as progress:
        calibration = calibrate_on_folder(net, data_config, data, time_steps, threshold, method, num_images,
                                          batch_size, seed, workers, progress,
                                          {"checkpoint": checkpoint.name if checkpoint else None}, encoding_levels,
                                          population_budget, memory_budget)
        path = save_calibration(calibration, output, force=force) if distributed.is_main() else output
        distributed.barrier()  # rank 0 has written the file before any rank reads it
    doc = {
        "output": str(path),
        "bytes": path.stat().st_size,
        "model": model,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "time_steps": calibration.time_steps,
        "threshold": calibration.threshold,
        "calibration": calibration.method,
        "encoding_levels": calibration.encoding_levels,
        "population_budget": population_budget,
        "populations": {T: {n: m for n, m in calibration.populations(T).items() if m > 1}
                        for T in calibration.time_steps},
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
            ("model", model_label(model, checkpoint)),
            ("sites", f"{len(calibration.sites)} activations → spiking neurons"),
            ("T", ", ".join(map(str, calibration.time_steps))),
            ("threshold", calibration.threshold),
            ("calibration", calibration.method),
            ("encoding", encoding_summary(calibration.sites, calibration.time_steps, calibration.encoding_levels)),
            *([("population", population_summary(calibration, calibration.time_steps))] if population_budget else []),
            ("images", f"{doc['num_images']} from {data} (seed {seed})"),
            ("input", f"{'x'.join(map(str, data_config['input_size']))}, mean {tuple(data_config['mean'])}, "
                      f"std {tuple(data_config['std'])}"),
            ("time", f"{doc['seconds']:.1f} s on {dev}"),
            ("memory", memory_summary(calibration.provenance)),
        ], title=f"Calibration written to {path} ({human_bytes(doc['bytes'])})"))

    out.result(doc, render)
