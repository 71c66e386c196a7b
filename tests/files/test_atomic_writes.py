"""Writes are atomic, also on SIGTERM: at every moment of a write, the signal leaves no file behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A child process that writes one file through pconv's atomic_write and pauses at the moment under test,
# announcing it by creating READY; the test then sends SIGTERM.
CHILD = textwrap.dedent("""
    import os, sys, time
    import torch
    from safetensors.torch import save_file
    from pconv.files import atomic as fileio

    moment, out, ready = sys.argv[1], sys.argv[2], sys.argv[3]

    def announce():
        open(ready, "w").close()

    def write(tmp):
        if moment == "before-writing":
            announce(); time.sleep(30)
        if moment == "half-written":
            with open(tmp, "wb") as f:
                f.write(b"x" * 1000)
            announce(); time.sleep(30)
        if moment == "inside-safetensors":  # a large real write: safetensors makes its own .tmp file meanwhile
            announce()
            save_file({"w": torch.zeros(150_000_000)}, tmp)
            return
        save_file({"w": torch.zeros(10)}, tmp)

    if moment == "before-rename":  # the file is complete; the signal arrives while it is synced
        real_fsync = os.fsync
        def slow_fsync(fd):
            real_fsync(fd); announce(); time.sleep(30)
        os.fsync = slow_fsync
    try:
        fileio.atomic_write(out, write)
    except fileio.Terminated:
        sys.exit(143)
    sys.exit(0)
""")

MOMENTS = ["before-writing", "half-written", "inside-safetensors", "before-rename"]


def run_and_terminate(tmp_path: Path, moment: str) -> int:
    folder = tmp_path / "out"
    folder.mkdir()
    ready = tmp_path / "READY"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, moment, str(folder / "snn.safetensors"), str(ready)],
                             env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "the child never reached the moment"
        time.sleep(0.01)
    if moment == "inside-safetensors":  # wait until safetensors' own temp file is there too
        while not any(p.name.startswith(".tmp") for p in folder.iterdir()) and child.poll() is None:
            time.sleep(0.001)
    child.send_signal(signal.SIGTERM)
    code = child.wait(timeout=120)
    child.stderr.close()
    return code


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM (the SigCgt mask of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.parametrize("moment", MOMENTS)
def test_sigterm_during_a_write_leaves_nothing(tmp_path, moment):
    code = run_and_terminate(tmp_path, moment)
    assert code == 143  # Terminated was raised in the child, so its cleanup ran
    assert list((tmp_path / "out").iterdir()) == []


def test_sigterm_during_a_cli_calibration_exits_143_and_leaves_nothing(tmp_path):
    import cli_models

    folder = cli_models.write_random_folder(tmp_path / "calib", per_class=30, size=64)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PCONV_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "pconv", "calibrate", "cli_models:tiny_cnn", "--data", str(folder),
               "-T", "2,4,8,16", "-b", "1", "--input-size", "64", "-o", str(out / "calib.safetensors")]
    child = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not catches_sigterm(child.pid):  # pconv's handler is in place: imports are done
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(1.0)  # the calibration under way
    child.send_signal(signal.SIGTERM)
    stdout, stderr = child.communicate(timeout=120)
    if child.returncode == 0:
        pytest.skip("the calibration finished before the signal (a very fast machine)")
    assert child.returncode == 143, stderr
    assert "Terminated" in stderr and "Traceback" not in stderr and stdout == ""
    assert list(out.iterdir()) == []
