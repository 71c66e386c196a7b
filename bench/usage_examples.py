"""Re-run the commands of docs/usage.md and print what each one prints, to paste back into the guide.

The examples use ResNet-20 (`resnet20.safetensors`), the 1,000 CIFAR-10 training images (`cifar10-calib/`) and
the 1,000 lossless test images (`cifar10-test/`) of ../shared/data, written into a work folder; commands run
there with OMP_NUM_THREADS=1, one after another, exactly as the guide shows them:

    python bench/usage_examples.py --workdir /tmp/usage > /tmp/usage.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

COMMANDS = [
    "pconv calibrate pconv.zoo:cifar10_resnet20 --checkpoint resnet20.safetensors --data cifar10-calib "
    "--num-images 256 -T 4,8,16 -o resnet20-calib.safetensors",
    "pconv inspect resnet20-calib.safetensors",
    "pconv convert pconv.zoo:cifar10_resnet20 --checkpoint resnet20.safetensors --calib resnet20-calib.safetensors "
    "-T 8 -o resnet20-T8.safetensors",
    "pconv convert pconv.zoo:cifar10_resnet20 -c resnet20.safetensors --data cifar10-calib -n 256 -T 16 "
    "-o resnet20-T16.safetensors",
    "pconv eval resnet20-T8.safetensors --data cifar10-test",
    "pconv eval resnet20-T8.safetensors --data cifar10-test --neuron serial --no-layers",
    "pconv eval resnet20-T16.safetensors --data cifar10-test --no-layers",
    "pconv convert pconv.zoo:cifar10_resnet20 -c resnet20.safetensors --data cifar10-calib -n 256 -T 8 "
    "--calibration recon --encoding-levels 0 --population-budget 0 -o resnet20-recon-T8.safetensors",
    "pconv eval resnet20-recon-T8.safetensors --data cifar10-test --no-layers --plot resnet20-recon-T8.png",
    "pconv eval resnet20-T8.safetensors --data cifar10-test --num-images 200 --json --sop-images 4 | head -45",
    "OMP_NUM_THREADS=1 pconv bench resnet20-T8.safetensors --batch-size 64 --iters 3",
    "pconv eval crafted.safetensors --data cifar10-test",
    "pconv eval resnet20-T8.safetensors --data five-classes",
    "pconv convert pconv.zoo:cifar10_resnet20 -c resnet20.safetensors --calib resnet20-calib.safetensors -T 8 "
    "-o resnet20-T8.safetensors",
    "pconv convert resnet19 --data cifar10-calib -o x.safetensors",
    "pconv convert resnet18 --data cifar10-calib -o x.safetensors",
    "pconv convert convnext_atto --num-classes 10 --random-weights --data cifar10-calib -o x.safetensors",
    "pconv convert pconv.zoo:cifar10_resnet20 -c resnet20.safetensors --calib resnet20-calib.safetensors -T 32 "
    "-o x.safetensors",
    "pconv convert pconv.zoo:cifar10_cnn --random-weights --calib resnet20-calib.safetensors -T 8 -o x.safetensors",
    "pconv convert pconv.zoo:cifar10_resnet20 --random-weights --calib resnet20-calib.safetensors -T 8 "
    "-o x.safetensors",
    "pconv eval truncated.safetensors --data cifar10-test",
    "pconv eval corrupt.safetensors --data cifar10-test",
    "pconv calibrate pconv.zoo:cifar10_resnet20 -c resnet20.safetensors --data cifar10-calib -n 5000 -o x.safetensors",
    "pconv calibrate pconv.zoo:cifar10_resnet20 -c resnet20.safetensors --data cifar10-calib -T 0 -o x.safetensors",
]


def prepare(work: Path) -> None:
    """The checkpoint and the two folders, plus the broken files the error examples read."""
    import shared_data as sd

    work.mkdir(parents=True, exist_ok=True)
    staging = work / ".staging"
    for make, name in ((sd.cifar10_calib_folder, "cifar10-calib"), (sd.cifar10_test_folder, "cifar10-test")):
        if not (work / name).exists():
            shutil.copytree(make(staging), work / name)
    if not (work / "five-classes").exists():  # 5 of the 10 classes, named, without a class map
        for folder in sorted((work / "cifar10-test").iterdir()):
            if folder.is_dir() and folder.name.split("_", 1)[1] in ("cat", "deer", "frog", "ship", "truck"):
                shutil.copytree(folder, work / "five-classes" / folder.name.split("_", 1)[1])
    shutil.copy(sd.checkpoint("cifar10_resnet20_akamaster"), work / "resnet20.safetensors")
    shutil.rmtree(staging, ignore_errors=True)


def broken_files(work: Path) -> None:
    """After the SNN exists: a truncated copy, one whose `time_steps` is 'abc', and one naming os:system."""
    from safetensors.torch import load_file, save_file

    from pconv.files.format import read_header

    snn = work / "resnet20-T8.safetensors"
    (work / "truncated.safetensors").write_bytes(snn.read_bytes()[:300000])
    meta = read_header(snn).metadata
    tensors = load_file(str(snn))
    save_file(tensors, str(work / "corrupt.safetensors"), metadata={**meta, "time_steps": "abc"})
    crafted = {**meta, "model": json.dumps({"kind": "factory", "name": "os:system", "kwargs": {"command": "touch PWNED"}})}
    save_file(tensors, str(work / "crafted.safetensors"), metadata=crafted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    work = args.workdir.resolve()
    for stale in ("resnet20-calib.safetensors", "resnet20-T8.safetensors", "resnet20-T16.safetensors",
                  "resnet20-recon-T8.safetensors", "resnet20-recon-T8.png"):
        (work / stale).unlink(missing_ok=True)
    prepare(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    for command in COMMANDS:
        if command.startswith("pconv eval crafted"):
            broken_files(work)
        proc = subprocess.run(command, shell=True, cwd=work, env=env, capture_output=True, text=True)
        print(f"```\n$ {command}\n{(proc.stdout + proc.stderr).rstrip()}\n```\n(exit {proc.returncode})\n", flush=True)
    assert not (work / "PWNED").exists()


if __name__ == "__main__":
    main()
