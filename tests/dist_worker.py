"""Worker of tests/test_distributed.py: one rank of a 2-process gloo group on the CPU."""

from __future__ import annotations

import torch
import torch.distributed as dist

import nets
import pconv
from pconv.utils import distributed

N_IMAGES = 37


def images(n: int = N_IMAGES, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def shard_batches(rank: int, world: int) -> list[torch.Tensor]:
    """Rank `rank`'s images (uneven shards: 19 and 18) in batches of different sizes."""
    return list(images()[list(range(N_IMAGES))[rank::world]].split(7))


#: Steps per block for `recon`: enough to move every parameter, few enough for a quick test
RECON_STEPS = 6


def calibrate(batches, threshold: str, method: str, population_budget: float, memory_budget: str):
    options = {"recon_steps": RECON_STEPS} if method == "recon" else {}
    return pconv.calibrate(nets.vgg_small().double(), batches, time_steps=[4, 8], threshold=threshold,
                           method=method, population_budget=population_budget, memory_budget=memory_budget,
                           **options)


def calibrate_shard(rank: int, world: int, rendezvous: str, out_dir: str, threshold: str, method: str,
                    population_budget: float, memory_budget: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        assert distributed.shard(range(N_IMAGES)) == list(range(N_IMAGES))[rank::world]
        calibration = calibrate(shard_batches(rank, world), threshold, method, population_budget, memory_budget)
        pconv.save_calibration(calibration, f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()
