"""`pconv eval`: the SNN and its source ANN (rebuilt from the same file) side by side on an image folder."""

from __future__ import annotations

from pathlib import Path

import click
import torch
from rich.table import Table

from ..measure.difference import PairedDifference
from ..measure.evaluate import DEFAULT_SOP_IMAGES, evaluate
from ..measure.energy import PJ_PER_AC, PJ_PER_MAC, EnergyModel
from ..measure.plots import check_plotting, plot_result
from ..measure.results import EvalResult
from ..files.export import load
from ..nn.network import SpikingNetwork
from ..files.atomic import check_output
from ..utils import distributed
from ._output import RESULTS_FORMATS, Output, pct, results_row, si, write_results_file
from ._loading import apply_overrides, make_loader, resolve_device
from ._options import (class_map_option, debug_option, device_option, engine_option, json_option, loader_options,
                       neuron_option, num_images_option, preprocessing_options, trust_factory_option)


def num_classes_of(snn: SpikingNetwork, data_config: dict) -> int:
    """The SNN's outputs: recorded in the file, else from one forward of a blank image."""
    if snn.info.num_classes:
        return snn.info.num_classes
    with torch.inference_mode():
        out = snn(torch.zeros(1, *data_config["input_size"], device=next(snn.parameters()).device))
    return int(out.shape[1])


def _uj(picojoules: float | None) -> str:
    return "-" if picojoules is None else f"{picojoules / 1e6:.4g} µJ"


def render_result(console, result: EvalResult, title: str, layers: bool) -> None:
    console.print(title, markup=False, style="bold")
    summary = Table()
    summary.add_column("")
    summary.add_column(f"SNN (T={result.time_steps})", justify="right")
    summary.add_column("ANN", justify="right")
    summary.add_row("top-1", pct(result.top1), pct(result.ann_top1))
    summary.add_row(f"top-{result.topk}", pct(result.top5), pct(result.ann_top5))
    summary.add_row("images/s", f"{result.samples_per_sec:.1f}",
                    "-" if result.ann_samples_per_sec is None else f"{result.ann_samples_per_sec:.1f}")
    summary.add_row("ms per batch", f"{result.step_time:.2f}",
                    "-" if result.ann_step_time is None else f"{result.ann_step_time:.2f}")
    summary.add_row("MACs per image", si(_snn_macs(result)), si(result.ann_macs))
    summary.add_row("SOPs per image", si(result.sops), "-")
    summary.add_row("energy per image", _uj(result.snn_energy_pj(True)), _uj(result.ann_energy_pj))
    console.print(summary)
    if result.top1_agreement is not None:
        console.print(f"top-1 agreement SNN vs ANN: {pct(result.top1_agreement)} of {result.num_images} images "
                      f"(batch {result.batch_size}, {result.neuron} neurons, {result.engine} engine, "
                      f"{result.device})")
    if result.top1_diff is not None:
        console.print(_difference_line(result.top1_diff))
    console.print(f"mean firing rate: {result.to_dict()['mean_firing_rate']:.4f} spikes per neuron per step")
    if result.step_top1 is not None:
        curve = ", ".join(f"{t}: {a:.1f}" for t, a in enumerate(result.step_top1, start=1))
        console.print(f"top-1 of the output accumulated over the first t steps (t: %): {curve}")
    console.print(_energy_note(result))
    if layers:
        _layer_tables(console, result)


def _difference_line(diff: PairedDifference) -> str:
    low, high = diff.interval()
    return (f"top-1 SNN - ANN: {diff.points:+.2f} points, 95% interval {low:+.2f} to {high:+.2f} (paired: "
            f"{diff.ann_only} images right only by the ANN, {diff.snn_only} only by the SNN)")


def _snn_macs(result: EvalResult) -> float | None:
    graded = result.graded_macs(True)
    return None if graded is None else result.snn_macs + graded


def _energy_note(result: EvalResult) -> str:
    if not result.sop_images:
        return "Operations and energy not counted (--sop-images 0)."
    snn, per_step = result.snn_energy_pj(True), result.snn_energy_pj(False)
    e = result.energy
    return (f"Energy at {e.pj_per_ac:g} pJ per accumulate and {e.pj_per_mac:g} pJ per multiply-accumulate: the SNN "
            f"spends {snn / result.ann_energy_pj:.3f}x the ANN's energy per image ({per_step / result.ann_energy_pj:.3f}x "
            f"run step by step). SNN MACs: the layers that see the analog image (once) and the multiplies of graded "
            f"inputs on their time-summed values; SOPs: one accumulate per spike per synapse; neurons included. "
            f"Counted over all {result.time_steps} steps on {result.sop_images} image"
            f"{'s' if result.sop_images != 1 else ''}.")


def _layer_tables(console, result: EvalResult) -> None:
    neurons = Table(title="Spiking layers", title_justify="left", title_style="bold")
    for col, justify in (("site", "left"), ("activation", "left"), ("neurons/img", "right"),
                         ("firing rate", "right"), ("spikes/img", "right")):
        neurons.add_column(col, justify=justify)
    for s in result.sites:
        neurons.add_row(s.name, s.activation, si(s.neurons), f"{s.firing_rate:.4f}", si(s.spikes_per_image))
    console.print(neurons)
    costs = Table(title="Synaptic layers", title_justify="left", title_style="bold",
                  caption="input: image = the analog image (MACs, once); spikes / population = binary spikes (one "
                          "accumulate per spike per synapse); graded = values of varying size after BatchNorm, "
                          "additions or average pooling (a multiply per nonzero input, on the time-summed input; per "
                          "step if run step by step)", caption_justify="left")
    for col in ("layer", "input", "ANN MACs/img", "SNN SOPs/img", "SNN MACs/img", "input rate", "energy/img",
                "per step"):
        costs.add_column(col, justify="left" if col in ("layer", "input") else "right")
    for layer, d in zip(result.layers, result.to_dict()["layers"]):
        macs = layer.macs if layer.input == "image" else d["graded_macs"]
        rate = "-" if layer.input_rate is None else f"{layer.input_rate:.4f}"
        energy = [None if d[k] is None else d[k] * 1e6 for k in ("energy_uj", "energy_per_step_uj")]
        costs.add_row(layer.name, layer.input, si(layer.macs), si(layer.sops), si(macs), rate, _uj(energy[0]),
                      _uj(energy[1]))
    console.print(costs)


@click.command("eval")
@click.argument("snn_file", metavar="SNN_FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", "-d", "data", required=True, type=click.Path(path_type=Path),
              help="Labelled image folder (class subfolders; class_map.txt honoured).")
@num_images_option("Evaluate on this many images, drawn with --seed [default: all].")
@class_map_option
@loader_options(default_batch=64)
@neuron_option(None, "Run with another neuron at the same T, e.g. serial (the classic IF baseline).")
@engine_option
@click.option("--sop-images", type=click.IntRange(min=0), default=DEFAULT_SOP_IMAGES, show_default=True,
              help="Images on which synaptic operations are counted (spike engine); 0 skips.")
@click.option("--layers/--no-layers", default=True, show_default=True, help="Show the per-layer tables.")
@click.option("--pj-per-ac", type=click.FloatRange(min=0, min_open=True), default=PJ_PER_AC, show_default=True,
              help="Picojoules per accumulate (45 nm, 32-bit float: Horowitz, ISSCC 2014).")
@click.option("--pj-per-mac", type=click.FloatRange(min=0, min_open=True), default=PJ_PER_MAC, show_default=True,
              help="Picojoules per multiply-accumulate (the same source).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Draw accuracy after each time step against the ANN's, and firing rate and energy per layer, "
                   "into this PNG file (needs matplotlib).")
@preprocessing_options(train_size=False)
@click.option("--results-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the result row to this file, as timm's validate.py does (CSV, or JSON for .json).")
@click.option("--results-format", type=click.Choice(RESULTS_FORMATS), default=None,
              help="Format of --results-file [default: from its suffix, csv otherwise].")
@click.option("--force", "-f", is_flag=True, help="Overwrite --results-file and --plot if they exist.")
@trust_factory_option
@device_option
@json_option
@debug_option
def eval_command(snn_file: Path, data: Path, num_images: int | None, class_map: Path | None, batch_size: int,
                 seed: int, workers: int, neuron: str | None, engine: str | None, sop_images: int, layers: bool,
                 pj_per_ac: float, pj_per_mac: float, plot: Path | None, overrides: dict, results_file: Path | None, results_format: str | None, force: bool,
                 trust_factory: bool, device: str, as_json: bool) -> None:
    """Evaluate SNN_FILE on the images in --data: SNN and ANN top-1/top-5, their agreement, speed,
    firing rates and synaptic operations."""
    out = Output(as_json)
    for path in (results_file, plot):
        if path is not None:
            check_output(path, force)  # before the evaluation, not after
    if plot is not None:
        check_plotting()
    dev = resolve_device(device)
    snn = load(snn_file, device=dev, trust_factory=trust_factory)
    if neuron and neuron != snn.info.neuron:
        snn = snn.with_neuron(neuron)
    if engine:
        snn.set_engine(engine)  # refuses an engine the neuron cannot run, naming those it can
    data_config = apply_overrides(snn.info.data_config, **overrides)
    loader = make_loader(data, data_config, batch_size, num_images, seed, workers,
                         num_classes=num_classes_of(snn, data_config), class_map=class_map)
    with out.progress() as progress:
        result = evaluate(snn, loader, device=dev, engine=engine, sop_images=sop_images, progress=progress,
                          energy=EnergyModel(pj_per_ac, pj_per_mac), step_curve=plot is not None)
    source = snn.info.source
    doc = {
        "model": source.name if source else None,
        "file": str(snn_file),
        "data": str(data),
        **result.to_dict(),
        "img_size": data_config["input_size"][-1],
        "input_size": data_config["input_size"],
        "crop_pct": data_config.get("crop_pct"),
        "interpolation": data_config.get("interpolation"),
    }
    if results_file is not None and distributed.is_main():
        write_results_file(results_file, [results_row(doc)], results_format, force)
    if plot is not None and distributed.is_main():
        plot_result(result, plot, f"{doc['model']}, T={result.time_steps}", force)
    title = f"{snn_file.name}: {doc['model']}, T={result.time_steps}, {result.num_images} images from {data}"
    out.result(doc, lambda console: render_result(console, result, title, layers))
