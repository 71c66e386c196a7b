"""How well a calibration carries over to images it did not see: KL(ANN‖SNN) and agreement with the ANN on
the calibration images themselves and on the held-out evaluation images (neither needs a label).

    OMP_NUM_THREADS=1 python bench/generalization.py --model lite2-a --methods max/none,max/auto -T 16
    OMP_NUM_THREADS=1 python bench/generalization.py --model lite2-a --methods max/none -T 16 --images all

A large gap between the two says the calibration fits its own images better than the population they were
drawn from. `--images` chooses what the calibration sees: `calibration` (the model's calibration half, what
bench/accuracy.py uses), `mirrored` (those and their left-right mirror images, twice as many activations
with no new image), or `all` (the calibration and the evaluation images together: a diagnosis of how much of
the gap more images of the same kind would close, never a result to report as accuracy). Models and
methods as in bench/accuracy.py.
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

import pconv  # noqa: E402


def outputs(net: torch.nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([net(x).float() for x in batches])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="lite2-a", choices=sorted(bench.MODELS))
    parser.add_argument("--methods", default="max/none,max/auto")
    parser.add_argument("-T", "--time-steps", type=int, default=16)
    parser.add_argument("--images", choices=("calibration", "mirrored", "all"), default="calibration")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:  # the image folders the loaders read live here
        run(args, Path(tmp))


def run(args: argparse.Namespace, root: Path) -> None:
    model, calib, test = bench.MODELS[args.model](root)
    unseen = [x for x, _ in test]
    seen = {"calibration": calib, "mirrored": calib + [x.flip(-1) for x in calib],
            "all": calib + unseen}[args.images]
    ann_calib, ann_unseen = outputs(model, calib), outputs(model, unseen)
    T = args.time_steps
    print("| model | method | T | calibrated on | KL on its calibration images | on unseen images "
          "| agreement (%), calibration / unseen | calibration s |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for method in args.methods.split(","):
        started = time.perf_counter()
        cal = pconv.calibrate(model, seen, time_steps=[T], **bench.method_options(method))
        seconds = time.perf_counter() - started
        snn = pconv.convert(model, cal, time_steps=T)
        inside, outside = (bench.label_free(ann_calib, outputs(snn, calib)),
                           bench.label_free(ann_unseen, outputs(snn, unseen)))
        rows.append({"model": args.model, "method": method, "time_steps": T, "images": args.images,
                     "calibration_images": cal.provenance["num_images"], "calibration_kl": round(inside["kl"], 5),
                     "unseen_kl": round(outside["kl"], 5), "calibration_agreement": round(inside["agreement"], 2),
                     "unseen_agreement": round(outside["agreement"], 2), "calibration_seconds": round(seconds, 1)})
        print(f"| {args.model} | {method} | {T} | {args.images} ({cal.provenance['num_images']}) | {inside['kl']:.4f} "
              f"| {outside['kl']:.4f} | {inside['agreement']:.1f} / {outside['agreement']:.1f} | {seconds:.0f} |",
              flush=True)
        if args.json:
            args.json.write_text(json.dumps({"torch": torch.__version__, "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
