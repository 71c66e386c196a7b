"""Sharded calibration under torch.distributed (2 CPU processes, gloo) equals the single-process result."""

import pytest
import torch
import torch.multiprocessing as mp

import dist_worker
import nets
import pconv


def run_two_ranks(tmp_path, threshold, method):
    mp.start_processes(dist_worker.calibrate_shard, args=(2, str(tmp_path / "rendezvous"), str(tmp_path), threshold,
                                                          method), nprocs=2, join=True, start_method="spawn")
    return [pconv.load_calibration(tmp_path / f"rank{r}.safetensors") for r in range(2)]


@pytest.mark.parametrize("threshold,method", [("max", "none"), ("percentile:99.9", "none"), ("mse", "da")])
def test_two_ranks_equal_one_process(tmp_path, threshold, method):
    ranks = run_two_ranks(tmp_path, threshold, method)
    single = pconv.calibrate(nets.vgg_small(), list(dist_worker.images().split(5)), time_steps=[4, 8],
                             threshold=threshold, method=method)
    assert ranks[0].provenance["num_images"] == single.provenance["num_images"] == 37
    for T in (4, 8):
        for name, p in single.params[T].items():
            for rank in ranks:
                q = rank.params[T][name]
                # Maxima and histogram counts reduce exactly: thresholds are identical.
                assert torch.equal(q.theta, p.theta), (T, name)
                # Means are sums in another order: equal to float32 rounding.
                assert torch.allclose(q.delta_in, p.delta_in, atol=1e-6, rtol=0), (T, name)
                assert torch.allclose(q.delta_out, p.delta_out, atol=1e-6, rtol=0), (T, name)
            # Every rank ends with identical parameters.
            assert torch.equal(ranks[0].params[T][name].delta_in, ranks[1].params[T][name].delta_in)
