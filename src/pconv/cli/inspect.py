"""`pconv inspect`: what a calibration or SNN file holds, from its header (the weights are never loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from ..errors import FormatError
from ..nn.population import populations
from ..files.format import CALIBRATION_TENSORS, NEURON_TENSORS, check_tensor_shapes, read_metadata
from ._output import Output, human_bytes, key_value_table
from ._options import debug_option, json_option


def _theta_stats(path: Path, names: list[str]) -> dict[str, dict[str, float]]:
    """min/mean/max of a few small per-channel tensors, read one by one (memory-mapped)."""
    from safetensors import SafetensorError, safe_open

    stats = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                t = f.get_tensor(name).double()
                stats[name] = {"min": round(float(t.min()), 6), "mean": round(float(t.mean()), 6),
                               "max": round(float(t.max()), 6)}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise FormatError(f"cannot read the thresholds of {str(path)!r}: {e}", "the file is corrupt") from None
    return stats


def describe(path: Path, thresholds: bool = True) -> dict[str, Any]:
    meta, header = read_metadata(path)
    model = None
    if meta.model is not None:
        model = {"kind": meta.model.kind.value, "name": meta.model.name, "kwargs": meta.model.kwargs,
                 "needs_trust": meta.model.needs_trust}
    doc: dict[str, Any] = {
        "file": str(path),
        "kind": meta.kind,
        "format_version": meta.format_version,
        "pconv_version": meta.pconv_version,
        "created": meta.created,
        "model": model,
        "time_steps": meta.time_steps[0] if meta.kind == "snn" else list(meta.time_steps),
        "neuron": meta.neuron,
        "threshold": meta.threshold,
        "calibration": meta.method,
        "config": meta.config.to_dict() if meta.config else None,
        "encoding_levels": meta.encoding_levels,
        "num_classes": meta.num_classes,
        "data_config": meta.data_config,
        "provenance": meta.provenance,
        "num_tensors": len(header.tensors),
        "bytes": header.file_size,
        "weight_bytes": sum(t["data_offsets"][1] - t["data_offsets"][0] for n, t in header.tensors.items()
                            if n.startswith("weights.")),
        "populated": {str(t): dict(sizes) for t, sizes in meta.populated.items()},
        "overflow": list(meta.overflow),
    }
    steps = meta.time_steps
    if meta.kind == "snn":
        names = {s.name: f"neurons.{s.name}.theta_in" for s in meta.sites}
        check_tensor_shapes(header, meta.sites, "neurons.", NEURON_TENSORS)
    else:
        names = {f"{s.name}@{t}": f"T{t}.{s.name}.theta" for s in meta.sites for t in steps}
        for t in steps:
            check_tensor_shapes(header, meta.sites, f"T{t}.", CALIBRATION_TENSORS)
    stats = _theta_stats(path, list(names.values())) if thresholds else {}
    out_sites = []
    for site in meta.sites:
        entry = site.to_dict()
        population = {str(t): populations([site], t, meta.encoding_levels, meta.populated.get(t))[site.name]
                      for t in steps}
        entry["population"] = population[str(steps[0])] if meta.kind == "snn" else population
        entry["overflow"] = site.name in meta.overflow  # one more neuron per channel, at every T
        if thresholds and meta.kind == "snn":
            entry["theta"] = stats[names[site.name]]
        elif thresholds:
            entry["theta"] = {str(t): stats[names[f"{site.name}@{t}"]] for t in steps}
        out_sites.append(entry)
    doc["sites"] = out_sites
    return doc


def _plan(doc: dict[str, Any]) -> str:
    """For a calibration made with a method that resolves per T (auto): what ran at each T."""
    config = doc.get("config") or {}
    plan = config.get("plan", {})
    if not plan or all(step.endswith(f"/{config.get('method')}") for step in plan.values()):
        return ""
    shown = ", ".join(f"{step} at T={T}" for T, step in sorted(plan.items(), key=lambda kv: int(kv[0])))
    return f" (configured {config['method']}: {shown})" if doc["kind"] == "snn" else f" ({shown})"


def render(console, doc: dict[str, Any]) -> None:
    model = doc["model"] or {}
    label = model.get("name", "?") + (f" {model['kwargs']}" if model.get("kwargs") else "")
    kind = model.get("kind", "?")
    if model.get("needs_trust"):
        kind = "your factory: eval/bench/load run it only with --trust-factory"
    rows = [
        ("kind", "spiking network" if doc["kind"] == "snn" else "calibration"),
        ("model", f"{label} ({kind})"),
        ("T", doc["time_steps"] if doc["kind"] == "snn" else ", ".join(map(str, doc["time_steps"]))),
    ]
    if doc["neuron"]:
        rows.append(("neuron", doc["neuron"]))
    rows += [
        ("threshold", doc["threshold"]),
        ("calibration", doc["calibration"] + _plan(doc)),
        ("encoding levels", doc["encoding_levels"]),
        ("data config", ", ".join(f"{k}={v}" for k, v in sorted(doc["data_config"].items()))),
    ]
    rows += [(f"provenance.{k}", v) for k, v in sorted(doc["provenance"].items())]
    rows += [
        ("format", f"pconv v{doc['format_version']}, written by pconv {doc['pconv_version']} on {doc['created']}"),
        ("size", f"{human_bytes(doc['bytes'])}, {doc['num_tensors']} tensors"
                 + (f" ({human_bytes(doc['weight_bytes'])} of weights)" if doc["weight_bytes"] else "")),
    ]
    console.print(key_value_table(rows, title=doc["file"]))
    table = Table(title=f"{len(doc['sites'])} sites (activation → spiking neuron)", title_justify="left",
                  title_style="bold")
    table.add_column("#", justify="right")
    table.add_column("site", no_wrap=True)
    table.add_column("activation")
    table.add_column("channels", justify="right")
    steps = [doc["time_steps"]] if doc["kind"] == "snn" else doc["time_steps"]
    per_t = "" if doc["kind"] == "snn" else f" (T={'/'.join(map(str, steps))})"
    table.add_column(f"neurons/channel{per_t}", justify="right")
    if doc.get("overflow"):  # one more neuron per channel at these sites, at every T
        table.add_column("overflow", justify="center")
    # Thresholds at one T (for a calibration: the smallest; they differ across T only for T-aware methods).
    t0 = steps[0]
    with_theta = bool(doc["sites"]) and "theta" in doc["sites"][0]
    suffix = "" if doc["kind"] == "snn" else f" (T={t0})"
    if with_theta:
        table.add_column(f"θ mean{suffix}", justify="right")
        table.add_column(f"θ max{suffix}", justify="right")
    for i, s in enumerate(doc["sites"]):
        cells = [str(i), s["name"], s["activation"] + (f" (cap {s['cap']:g})" if s.get("cap") else ""),
                 str(s["channels"]),
                 str(s["population"]) if doc["kind"] == "snn" else "/".join(str(s["population"][str(t)]) for t in steps)]
        if doc.get("overflow"):
            cells.append("+1" if s["overflow"] else "")
        if with_theta:
            th = s["theta"] if doc["kind"] == "snn" else s["theta"][str(t0)]
            cells += [f"{th['mean']:.4g}", f"{th['max']:.4g}"]
        table.add_row(*cells)
    console.print(table)


@click.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--thresholds/--no-thresholds", default=True, show_default=True,
              help="Summarise each site's per-channel thresholds (reads those small tensors only).")
@json_option
@debug_option
def inspect(file: Path, thresholds: bool, as_json: bool) -> None:
    """Show what a calibration or SNN FILE holds: model, T, neuron, sites with thresholds, provenance.

    Reads the header (and, unless --no-thresholds, the per-site threshold vectors); weights are never loaded.
    """
    out = Output(as_json)
    doc = describe(file, thresholds)
    out.result(doc, lambda console: render(console, doc))
