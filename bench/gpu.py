"""The CUDA paths of `pconv bench`, measured on a GPU in one run, with the checks that only a GPU can fail.

For each SNN file, on the first --batch-size images of its image folder (real images, so that reduced
precision's agreement with fp32 means something):

* agreement: the CUDA count engine against the CUDA spike engine and against the CPU (same images, same file),
  in IEEE float32 as pconv's CLI runs CUDA (--tf32: torch's default, TF32 convolutions), as max |Δ logit| and
  top-1 agreement; the two engines in float64 on the GPU (no ties left to round: they must agree to rounding);
  and the count engine replayed from a CUDA graph (pconv's one-kernel neuron) against its eager run;
* speed: `pconv.measure.benchmark` at --batch-size and at batch 1, in eager mode, replayed from CUDA graphs,
  channels-last, bf16 and fp16 autocast (agreement with fp32 reported), torch.compile (with and without
  CUDA graphs) where --compile names the file.

Every variant runs inside a try (an error is recorded, the next variant runs) and the JSON document is
rewritten after each, so a run stopped at its time limit still leaves what it measured. --deadline (seconds
since the epoch) skips what would start after it.

    python bench/gpu.py work/r20-T8.safetensors work/lite0-T8.safetensors --data work/cifar10_test \
        --data work/imagenet --out out/gpu.json --compile r20-T8,lite0-T8 --deadline $(( $(date +%s) + 400 ))

(--data once per file, in order; a single --data serves every file.)
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import traceback
from pathlib import Path

import torch

import pconv
from pconv.cli._loading import full_fp32_convolutions, make_loader
from pconv.data.batches import images_of
from pconv.measure.benchmark import BenchConfig, benchmark
from pconv.measure.timing import cuda_graphed
from pconv.nn import count_kernel
from pconv.nn.neurons import Engine

#: (name, engines, BenchConfig fields); compiled variants run only for the files --compile names.
VARIANTS = [
    ("eager", ("ann", "serial", "spikes", "counts"), {}),
    ("cuda-graph", ("ann", "serial", "spikes", "counts"), {"cuda_graph": True}),
    ("channels-last+cuda-graph", ("ann", "counts"), {"channels_last": True, "cuda_graph": True}),
    ("bf16+cuda-graph", ("ann", "spikes", "counts"), {"precision": "bf16", "cuda_graph": True}),
    ("fp16+cuda-graph", ("ann", "counts"), {"precision": "fp16", "cuda_graph": True}),
]
COMPILED = [
    ("compile", ("ann", "counts"), {"compile": True}),
    ("compile+cuda-graph", ("ann", "counts"), {"compile": True, "cuda_graph": True}),
]


def real_images(snn, folder: Path, batch_size: int) -> torch.Tensor:
    loader = make_loader(folder, snn.info.data_config, batch_size, None, seed=0, workers=0, cap=batch_size,
                         labelled=False)
    return images_of(next(iter(loader)))


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float().cpu(), b.float().cpu()
    return {"max_abs_diff": (a - b).abs().max().item(), "top1_agreement": 100.0 * (a.argmax(1) == b.argmax(1)).float().mean().item()}


def agreement(path: Path, x: torch.Tensor, device: str) -> dict:
    """Count vs spike engine on the device, device vs CPU, under the convolution precision in force; the two
    engines in float64; and on CUDA the count engine replayed from a CUDA graph (pconv's one-kernel neuron,
    nn/count_kernel.py) against its eager run (torch's passes): they must be equal bit for bit."""
    # (torch's legacy allow_tf32 getters raise once the new API has set a precision: read the new one)
    doc = {"conv_fp32_precision": getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)}
    cpu = pconv.load(path, device="cpu")
    with torch.inference_mode():
        cpu_counts = cpu.set_engine(Engine.COUNTS)(x)
        cpu_ann = cpu.to_ann()(x)
    gpu = pconv.load(path, device=device)
    xg = x.to(device)
    with torch.inference_mode():
        counts = gpu.set_engine(Engine.COUNTS)(xg)
        spikes = gpu.set_engine(Engine.SPIKES)(xg)
        ann = gpu.to_ann().to(device)(xg)
    doc["fp32"] = {"counts_vs_spikes": compare(counts, spikes), "counts_vs_cpu_counts": compare(counts, cpu_counts),
                   "ann_vs_cpu_ann": compare(ann, cpu_ann), "counts_vs_ann": compare(counts, ann)}
    if device.startswith("cuda"):
        gpu.set_engine(Engine.COUNTS)
        replay = cuda_graphed(gpu, xg)
        with torch.inference_mode():
            graphed = replay(xg).clone()
        doc["fp32"]["graph_vs_eager_counts"] = {**compare(graphed, counts), "equal": torch.equal(graphed, counts),
                                                "kernel_compiled_for": [str(k) for k in count_kernel._compiled]}
    # float64 leaves no ties for rounding to break: the two engines must agree to rounding on the GPU too
    gpu64 = pconv.load(path, device=device).double()
    with torch.inference_mode():
        counts64 = gpu64.set_engine(Engine.COUNTS)(x.to(device).double())
        spikes64 = gpu64.set_engine(Engine.SPIKES)(x.to(device).double())
    doc["float64"] = {"counts_vs_spikes": compare(counts64, spikes64)}
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, action="append", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", default="", help="file stems (comma-separated) to also time compiled")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (CUDA graphs then fail)")
    parser.add_argument("--tf32", action="store_true", help="leave torch's TF32 default (pconv's CLI turns it off)")
    parser.add_argument("--variants", default=None, help="comma-separated subset of the variants' names")
    parser.add_argument("--deadline", type=float, default=float("inf"))
    parser.add_argument("--compile-margin", type=float, default=120.0,
                        help="start a compiled variant only with this many seconds left before the deadline")
    args = parser.parse_args()
    folders = args.data if len(args.data) > 1 else args.data * len(args.files)
    compiled = set(filter(None, args.compile.split(",")))
    cuda = args.device.startswith("cuda")
    if cuda and not args.tf32:
        full_fp32_convolutions()  # as pconv's CLI runs on CUDA
    doc = {"machine": {"gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
                       "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
                       "python": platform.python_version(), "cpu_threads": torch.get_num_threads()},
           "args": {k: str(v) for k, v in vars(args).items()}, "files": {}}

    def save() -> None:
        args.out.write_text(json.dumps(doc, indent=1))

    # Every file's checks and plain variants first, the compiled ones (slow to build) last.
    inputs = {}
    for path, folder in zip(args.files, folders):
        entry = doc["files"].setdefault(path.stem, {"file": str(path), "data": str(folder), "runs": {}})
        try:
            snn = pconv.load(path, device="cpu")
            inputs[path] = (real_images(snn, folder, args.batch_size), tuple(snn.info.data_config["input_size"]), folder)
            entry["agreement"] = agreement(path, inputs[path][0], args.device)
        except Exception:
            entry["error"] = traceback.format_exc()
            print(f"{path.stem}: FAILED\n{entry['error']}", flush=True)
        save()
    jobs = [(path, variant) for path in inputs for variant in VARIANTS]
    jobs += [(path, variant) for path in inputs if path.stem in compiled for variant in COMPILED]
    if args.variants:
        jobs = [(path, variant) for path, variant in jobs if variant[0] in args.variants.split(",")]
    for path, (name, engines, fields) in jobs:
        runs = doc["files"][path.stem]["runs"]
        x, input_size, folder = inputs[path]
        margin = args.compile_margin if fields.get("compile") else 0.0
        if time.time() + margin > args.deadline:
            runs[name] = {"skipped": "deadline"}
            continue
        started = time.time()
        try:
            config = BenchConfig(batch_size=args.batch_size, device=args.device, engines=engines, iters=args.iters,
                                 latency_iters=2 * args.iters, rounds=args.rounds, **fields)
            result = benchmark(pconv.load(path, device=args.device), input_size, config, images=x).to_dict()
            result["inputs"] = f"{folder}: {x.shape[0]} images"
            runs[name] = {**result, "seconds": round(time.time() - started, 1)}
            line = "  ".join(f"{e['engine']} {e['step_time']:.3f}/{e['latency_ms']:.3f} ms" for e in result["engines"])
            print(f"{path.stem} {name}: {line}", flush=True)
        except Exception:
            runs[name] = {"error": traceback.format_exc(), "seconds": round(time.time() - started, 1)}
            print(f"{path.stem} {name}: FAILED\n{runs[name]['error']}", flush=True)
        if cuda:
            torch.cuda.empty_cache()
        save()


if __name__ == "__main__":
    main()
