"""Peak memory and seconds of `pconv calibrate` on EfficientNet-Lite0 with the defaults (docs/benchmarks.md).

Each run is a fresh `pconv calibrate` process (so its resident-set peak is its own), with OMP_NUM_THREADS=1,
on the 500 ImageNet samples of ../shared/data and on 1,000 images (the 500 and their horizontal flips, written
losslessly as PNG):

    OMP_NUM_THREADS=1 python bench/calibration_memory.py --images 500,1000 --json docs/calibration_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

MODEL = "pconv.pretrained:tf_efficientnet_lite0"


def image_folder(root: Path, with_flips: bool) -> Path:
    """The 500 samples (JPEG bytes unchanged), and with `with_flips` their mirror images as PNG beside them."""
    import shared_data as sd
    from PIL import Image, ImageOps

    folder = sd.imagenet_samples_folder(root)
    if with_flips:
        for path in sorted(folder.rglob("*.jpg")):
            flipped = path.with_name(path.stem + "_flip.png")
            if not flipped.exists():
                ImageOps.mirror(Image.open(path).convert("RGB")).save(flipped)
    return folder


def run(folder: Path, images: int, steps: str, budget: str | None, out: Path) -> dict:
    command = [sys.executable, "-m", "pconv", "calibrate", MODEL, "--data", str(folder), "-n", str(images),
               "-T", steps, "-o", str(out), "--force", "--json"]
    if budget:
        command += ["--memory-budget", budget]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = child.communicate()
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"pconv calibrate failed: {stderr.strip()}")
    doc = json.loads(stdout)
    return {
        "model": MODEL, "images": images, "time_steps": steps, "memory_budget_mb": doc["memory_budget_mb"],
        "peak_tensor_mb": doc["peak_tensor_mb"], "peak_rss_mb": doc["peak_rss_mb"], "seconds": round(seconds, 1),
        "calibration_seconds": doc["seconds"], "threads": int(env["OMP_NUM_THREADS"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="500,1000", help="calibration set sizes (500: the samples; 1000: "
                                                             "with their flips)")
    parser.add_argument("--time-steps", default="4,8,16,32")
    parser.add_argument("--memory-budget", default=None, help="pconv's --memory-budget (default: pconv's)")
    parser.add_argument("--json", type=Path, default=None, help="append the rows to this JSON list")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pconv-calmem-") as tmp:
        for n in (int(v) for v in args.images.split(",")):
            folder = image_folder(Path(tmp) / f"set{n}", with_flips=n > 500)
            row = run(folder, n, args.time_steps, args.memory_budget, Path(tmp) / f"calib{n}.safetensors")
            rows.append(row)
            print(f"{n:5d} images, T={row['time_steps']}: peak RSS {row['peak_rss_mb'] / 1024:.2f} GiB, "
                  f"peak tensors {row['peak_tensor_mb'] / 1024:.2f} GiB (budget {row['memory_budget_mb'] / 1024:.2f}"
                  f" GiB), {row['seconds']:.0f} s", flush=True)
    if args.json:
        previous = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps(previous + rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
