"""Sharded calibration under torch.distributed (2 CPU processes, gloo) equals the single-process result, for
every registered calibration method, the population choice, and both schedules of the paired pass."""

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker
import pconv
from pconv.calibration import CALIBRATIONS

pytestmark = pytest.mark.slow

CASES = [("max", method, 0.5, "2GiB") for method in CALIBRATIONS.names()] + [
    ("percentile:99.9", "none", 0.0, "2GiB"),
    ("mse", "da", 0.0, "2GiB"),
    ("max", "fit", 1.0, "1MiB"),  # the paired pass in rounds of a few images, a population on every site
    ("max", "refit", 0.0, "1MiB"),
    ("max", "recon", 0.0, "1MiB"),  # block inputs recomputed per step
]


def run_two_ranks(tmp_path, *case):
    mp.start_processes(dist_worker.calibrate_shard, args=(2, str(tmp_path / "rendezvous"), str(tmp_path), *case),
                       nprocs=2, join=True, start_method="spawn")
    return [pconv.load_calibration(tmp_path / f"rank{r}.safetensors") for r in range(2)]


@pytest.mark.parametrize("threshold, method, population_budget, memory_budget", CASES,
                         ids=[f"{t}-{m}-{p}-{b}" for t, m, p, b in CASES])
def test_two_ranks_equal_one_process(tmp_path, threshold, method, population_budget, memory_budget):
    ranks = run_two_ranks(tmp_path, threshold, method, population_budget, memory_budget)
    # One process sees the 37 images as one batch. Samples are chosen by each image's content and every
    # statistic is a sum, a count or a maximum, so only float summation order differs; float64 keeps that
    # far below anything a threshold choice could see. The workers' one thread: the thread count can change
    # float results too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = dist_worker.calibrate([dist_worker.images()], threshold, method, population_budget, memory_budget)
    finally:
        torch.set_num_threads(threads)
    assert ranks[0].provenance["num_images"] == single.provenance["num_images"] == 37
    assert ranks[0].populated == ranks[1].populated == single.populated
    # recon: each step's gradients are summed over the processes, in another order than one process sums them;
    # after the Adam steps the stored (float32) parameters differ by a rounding or two (measured <= 1.5e-7
    # relative), so recon is held to 1e-6
    tol = 1e-6 if method == "recon" else 1e-9
    for T in (4, 8):
        for name, p in single.params[T].items():
            for rank in ranks:
                q = rank.params[T][name]
                assert torch.allclose(q.theta, p.theta, rtol=tol, atol=0), (T, name)
                assert torch.allclose(q.delta_in, p.delta_in, atol=tol, rtol=0), (T, name)
                assert torch.allclose(q.delta_out, p.delta_out, atol=tol, rtol=0), (T, name)
            # Every rank ends with identical parameters.
            for leaf in ("theta", "delta_in", "delta_out"):
                assert torch.equal(getattr(ranks[0].params[T][name], leaf), getattr(ranks[1].params[T][name], leaf))
        for key, value in single.weights.get(T, {}).items():
            # Adam divides each gradient by its own running scale, so a weight near zero can move by a rounding of
            # the layer's scale rather than of its own value (measured: 6.9e-9 on a weight of 2e-3 in a layer of
            # scale 0.19): the absolute tolerance is the relative one times the layer's largest weight.
            atol = max(1e-9, tol * value.abs().max().item())
            for rank in ranks:
                assert torch.allclose(rank.weights[T][key], value, rtol=max(tol, 1e-7), atol=atol), (T, key)


def torchrun(tmp_path, *args):
    """`torchrun --nproc-per-node 2 -m pconv ...` on the CPU (gloo); returns the completed process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PCONV_BACKEND": "gloo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "pconv", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_torchrun_cli_equals_single_process(tmp_path):
    import json

    from click.testing import CliRunner

    import cli_models
    from pconv.cli.main import cli

    calib_dir = cli_models.write_random_folder(tmp_path / "calib", per_class=5, seed=1)  # 15 images: 8 + 7
    test_dir = cli_models.write_random_folder(tmp_path / "test", per_class=7, seed=2)  # 21 images: 11 + 10
    model = "cli_models:tiny_cnn"
    two = torchrun(tmp_path, "convert", model, "--data", calib_dir, "-T", "4", "-b", "4", "--threshold",
                   "max", "-o", tmp_path / "two.safetensors", "--json")
    assert two.returncode == 0, two.stderr
    assert json.loads(two.stdout)["calibrated_on"].startswith("15 images")  # exactly one JSON document
    runner = CliRunner()
    one = runner.invoke(cli, ["convert", model, "--data", str(calib_dir), "-T", "4", "-b", "4", "--threshold",
                              "max", "-o", str(tmp_path / "one.safetensors"), "--json"])
    assert one.exit_code == 0, one.stderr
    a, b = pconv.load(tmp_path / "one.safetensors", trust_factory=True), pconv.load(tmp_path / "two.safetensors", trust_factory=True)
    for name, neuron in a.neurons().items():
        other = b.neurons()[name]
        # Batches differ between the runs, and a convolution's last bit may depend on its batch.
        assert torch.allclose(neuron.theta_in, other.theta_in, rtol=1e-5, atol=0)
        assert torch.allclose(neuron.bias, other.bias, atol=1e-5, rtol=0)
        assert torch.allclose(neuron.theta_out, other.theta_out, atol=1e-5, rtol=0)

    ev2 = torchrun(tmp_path, "eval", tmp_path / "one.safetensors", "--trust-factory", "--data", test_dir, "-b", "4", "--json")
    assert ev2.returncode == 0, ev2.stderr
    ev1 = runner.invoke(cli, ["eval", str(tmp_path / "one.safetensors"), "--trust-factory", "--data", str(test_dir), "-b", "4", "--json"])
    d1, d2 = json.loads(ev1.stdout), json.loads(ev2.stdout)
    for key in ("num_images", "top1", "top5", "ann_top1", "ann_top5", "top1_agreement", "mean_firing_rate",
                "top1_diff", "top1_diff_ci95_low", "top1_diff_ci95_high", "top1_ann_only", "top1_snn_only"):
        assert d1[key] == pytest.approx(d2[key], abs=1e-6), key
    assert d2["num_images"] == 21
