"""Latency and throughput against T for each engine (ANN, serial IF, spikes, counts); JSON + PNG.

    python bench/speed.py --model resnet18 --steps 4,8,16,32 --batch-size 32 --out docs/speed_cpu

Weights are random and calibration uses random images: speed does not depend on them (every layer is
dense), and no download is needed. For EfficientNet-Lite0 with its real weights pass
--model pconv.pretrained:tf_efficientnet_lite0.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

import pconv
from pconv.measure.benchmark import BENCH_ENGINES, BenchConfig, benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--steps", default="4,8,16,32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--engines", default=",".join(BENCH_ENGINES))
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--cuda-graph", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.png")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = pconv.create_model(args.model, random_weights=True).to(args.device)  # speed only
    size = (3, args.img_size, args.img_size)
    calib = [torch.randn(8, *size, device=args.device) for _ in range(2)]
    steps = [int(t) for t in args.steps.split(",")]
    calibration = pconv.calibrate(model, calib, time_steps=steps, method="none")
    runs = []
    for T in steps:
        snn = pconv.convert(model, calibration, time_steps=T)
        config = BenchConfig(batch_size=args.batch_size, device=args.device, engines=tuple(args.engines.split(",")),
                             precision=args.precision, channels_last=args.channels_last, cuda_graph=args.cuda_graph,
                             compile=args.compile, warmup=args.warmup, rounds=args.rounds, iters=args.iters,
                             latency_iters=2 * args.iters)
        result = benchmark(snn, size, config)
        runs.append(result.to_dict())
        for e in result.engines:
            print(f"T={T:3d} {e.engine:7s} {e.samples_per_sec:9.1f} img/s  batch {e.step_time:9.1f} ms  "
                  f"bs1 {e.latency_ms:8.2f} ms  peak {e.peak_memory_mb:8.1f} MB  "
                  f"x{e.samples_per_sec_vs_ann or 0:.3f} of ANN img/s", flush=True)
    machine = {"machine": platform.machine(), "processor": platform.processor(), "threads": torch.get_num_threads(),
               "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
               "torch": torch.__version__, "pconv": pconv.__version__, "args": vars(args)}
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps({"machine": machine, "runs": runs}, indent=1))
        plot(runs, Path(args.out).with_suffix(".png"), f"{args.model} on {machine['cuda'] or 'CPU'}")


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["time_steps"] for r in runs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for engine in [e["engine"] for e in runs[0]["engines"]]:
        per_t = [next(e for e in r["engines"] if e["engine"] == engine) for r in runs]
        ax1.plot(steps, [e["samples_per_sec"] for e in per_t], marker="o", label=engine)
        ax2.plot(steps, [e["latency_ms"] for e in per_t], marker="o", label=engine)
    for ax, label in ((ax1, f"images/s at batch {runs[0]['engines'][0]['batch_size']}"), (ax2, "ms per image at batch 1")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(steps, [str(t) for t in steps])
        ax.set_xlabel("T (time steps)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
