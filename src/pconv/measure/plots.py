"""The figure SNN papers show for an evaluation: top-1 after each time step against the ANN's, and firing rate
and energy per layer (`pconv eval --plot FILE.png`). matplotlib is optional: `pip install matplotlib`."""

from __future__ import annotations

from pathlib import Path

from ..errors import PconvError
from ..files.atomic import atomic_write
from .results import EvalResult


def check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PconvError("drawing a plot needs matplotlib, which is not installed",
                         "pip install matplotlib (or pip install 'pconv[bench]')") from None


def plot_result(result: EvalResult, path: str | Path, title: str, force: bool = False) -> Path:
    """Three panels: top-1 after t = 1..T steps with the ANN's top-1; firing rate per spiking layer; energy per
    synaptic layer (accumulated and per-step schedules) against the ANN's."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    _accuracy_panel(axes[0], result)
    _firing_panel(axes[1], result)
    _energy_panel(axes[2], result)
    fig.suptitle(title)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110), force)
    finally:
        plt.close(fig)


def _accuracy_panel(ax, result: EvalResult) -> None:
    steps = list(range(1, result.time_steps + 1))
    if result.step_top1:
        ax.plot(steps, result.step_top1, marker="o", label="SNN, output after t steps")
    if result.ann_top1 is not None:
        ax.axhline(result.ann_top1, color="black", linestyle="--", label=f"ANN ({result.ann_top1:.1f} %)")
    ax.set_xlabel("time step t")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("accuracy after each time step")
    ax.legend(loc="lower right")


def _firing_panel(ax, result: EvalResult) -> None:
    ax.bar(range(len(result.sites)), [s.firing_rate for s in result.sites])
    ax.set_xlabel("spiking layer (in execution order)")
    ax.set_ylabel("spikes per neuron per step")
    ax.set_title(f"firing rate (mean {result.mean_firing_rate:.3f})")


def _energy_panel(ax, result: EvalResult) -> None:
    layers = result.to_dict()["layers"]
    index = range(len(layers))
    ann = [layer["macs"] * result.energy.pj_per_mac / 1e6 for layer in layers]
    ax.plot(index, ann, color="black", linestyle="--", label="ANN")
    for key, label in (("energy_uj", "SNN"), ("energy_per_step_uj", "SNN, run step by step")):
        values = [layer[key] for layer in layers]
        if all(v is not None for v in values):
            ax.plot(index, values, marker=".", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("conv / linear layer (in execution order)")
    ax.set_ylabel("µJ per image")
    snn, ann_total = result.snn_energy_pj(True), result.ann_energy_pj
    ratio = f", SNN/ANN {snn / ann_total:.2f}x" if snn is not None and ann_total else ""
    ax.set_title(f"energy per layer{ratio}")
    ax.legend()
