"""Running under torch.distributed (e.g. `torchrun --nproc-per-node N -m pconv ...`).

Each rank reads its own shard of the images; every statistic pconv gathers is a sum, a count or a maximum,
so reducing them across ranks gives exactly the single-process statistic (up to float summation order), and
every rank ends with identical parameters. Nothing here does anything without an initialised process group.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def _collective_device(t: Tensor) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo works on CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(t: Tensor, op) -> Tensor:
    if not active():
        return t
    work = t.detach().to(_collective_device(t)).clone()
    dist.all_reduce(work, op=op)
    return work.to(t.device)


def reduce_sum(t: Tensor) -> Tensor:
    return _reduce(t, dist.ReduceOp.SUM)


def reduce_max(t: Tensor) -> Tensor:
    return _reduce(t, dist.ReduceOp.MAX)


def reduce_any(flag: bool) -> bool:
    """Whether `flag` holds on any process (every process gets the same answer)."""
    if not active():
        return bool(flag)
    return bool(reduce_max(torch.tensor([1.0 if flag else 0.0])).item())


def reduce_count(n: int) -> int:
    return int(reduce_sum(torch.tensor([n], dtype=torch.float64)).item()) if active() else n


def shard(indices: Sequence[int]) -> list[int]:
    """This rank's part of `indices`: every world_size-th one from position rank. Shards may differ in
    length by one; nothing is padded or repeated, so reduced statistics equal the single-process ones."""
    return list(indices)[rank()::world_size()]


def init_from_environment() -> bool:
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1); True if it did."""
    if active() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("PCONV_BACKEND") != "gloo" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()
