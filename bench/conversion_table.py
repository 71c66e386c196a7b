"""ANN vs SNN top-1 on the real checkpoints of ../shared/data at T = 4, 8, 16, 32 (default method).

    python bench/conversion_table.py [--threshold max] [--calibration da]

ResNet-20: calibrated on the 1,000 CIFAR-10 training images, evaluated on the 1,000 lossless test images.
LeNet-5: calibrated on MNIST test digits 0-999, evaluated on digits 1000-9999.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import realdata  # noqa: E402

import pconv  # noqa: E402
from pconv.config import DEFAULT_ENCODING_LEVELS, DEFAULT_METHOD, DEFAULT_THRESHOLD  # noqa: E402

STEPS = [4, 8, 16, 32]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threshold", default=DEFAULT_THRESHOLD)
    parser.add_argument("--calibration", default=DEFAULT_METHOD)
    parser.add_argument("--encoding-levels", type=int, default=DEFAULT_ENCODING_LEVELS,
                        help="0 for the paper's network (one neuron per channel everywhere)")
    args = parser.parse_args()
    print(f"# pconv {pconv.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; threshold={args.threshold}, calibration={args.calibration}, "
          f"encoding levels={args.encoding_levels}\n")
    print("| model | ANN | " + " | ".join(f"SNN T={T}" for T in STEPS) + " | calibration s |")
    print("|---|---|" + "---|" * len(STEPS) + "---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(realdata.MODELS):
            model = realdata.load_zoo_model(name)
            calib, test = realdata.SPLITS[name](Path(tmp) / name, model)
            started = time.perf_counter()
            calibration = pconv.calibrate(model, calib, time_steps=STEPS, threshold=args.threshold,
                                          method=args.calibration, encoding_levels=args.encoding_levels)
            seconds = time.perf_counter() - started
            accs = [realdata.top1(pconv.convert(model, calibration, time_steps=T), test) for T in STEPS]
            ann = realdata.top1(model, test)
            print(f"| {name} | {ann:.2f} | " + " | ".join(f"{a:.2f} ({a - ann:+.2f})" for a in accs)
                  + f" | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
