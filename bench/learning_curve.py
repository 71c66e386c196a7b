"""How an SNN's distance from its ANN on unseen images falls with the number of calibration images: the
learning curve of a calibration, label-free (KL(ANN‖SNN), agreement with the ANN's top-1), with top-1 beside.

    OMP_NUM_THREADS=1 python bench/learning_curve.py --model lite2-a -T 16 --sizes 125,250,375

Every size is evaluated on the same images, the last `--held-out` of the model's evaluation half; the
calibration takes the first N of a pool that is the model's calibration half followed by the rest of its
evaluation half (so N = 250 is bench/accuracy.py's calibration of an ImageNet half, and N > 250 borrows
evaluation images the held-out ones are not among). If the distance keeps falling with N, the calibration is
limited by how many images it sees rather than by its method: the question issue 16's EfficientNet-Lite2
rows raise (docs/accuracy.md). Sizes run one after another; run one size per process to use more cores.
Models and methods as in bench/accuracy.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as bench  # noqa: E402
from generalization import outputs  # noqa: E402

import pconv  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lite2-a", choices=sorted(bench.MODELS))
    parser.add_argument("--method", default="max/auto", help="THRESHOLD/CALIBRATION[/ENCODING_LEVELS[/...]]")
    parser.add_argument("-T", "--time-steps", type=int, default=16)
    parser.add_argument("--sizes", default="125,250", help="calibration images, comma-separated")
    parser.add_argument("--held-out", type=int, default=125, help="evaluation images, from the end of the half")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:  # the image folders the loaders read live here
        run(args, Path(tmp))


def run(args: argparse.Namespace, root: Path) -> None:
    model, calib, test = bench.MODELS[args.model](root)
    calib_images = torch.cat(list(calib))
    test_images = torch.cat([x for x, _ in test])
    labels = torch.cat([y for _, y in test])
    if not 0 < args.held_out < len(test_images):
        raise SystemExit(f"Error: --held-out must be between 1 and {len(test_images) - 1}")
    split = len(test_images) - args.held_out
    pool = torch.cat([calib_images, test_images[:split]])
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise SystemExit(f"Error: --sizes takes whole numbers separated by commas, e.g. 125,250 (got {args.sizes})")
    if not all(0 < size <= len(pool) for size in sizes):
        raise SystemExit(f"Error: every size must be between 1 and {len(pool)} (got {args.sizes})")
    evaluation, evaluation_labels = test_images[split:], labels[split:]
    held_out = list(evaluation.split(16))
    ann = outputs(model, held_out)
    T = args.time_steps
    options = bench.method_options(args.method)
    print("| model | method | T | calibration images | KL(ANN‖SNN), held-out | agreement (%) | SNN − ANN "
          "| calibration s |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for size in sizes:
        started = time.perf_counter()
        cal = pconv.calibrate(model, list(pool[:size].split(16)), time_steps=[T], **options)
        seconds = time.perf_counter() - started
        snn = pconv.convert(model, cal, time_steps=T)
        result = bench.compare(ann, outputs(snn, held_out), evaluation_labels)
        rows.append({"model": args.model, "method": args.method, "time_steps": T, "calibration_images": size,
                     "held_out_images": len(evaluation), "kl": round(result["kl"], 5),
                     "agreement": round(result["agreement"], 2), "snn_minus_ann": round(result["diff"].points, 2),
                     "interval": [round(v, 2) for v in result["diff"].interval()],
                     "calibration_seconds": round(seconds, 1)})
        print(f"| {args.model} | {args.method} | {T} | {size} | {result['kl']:.4f} | {result['agreement']:.1f} "
              f"| {bench.interval_text(result['diff'])} | {seconds:.0f} |", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"torch": torch.__version__, "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
