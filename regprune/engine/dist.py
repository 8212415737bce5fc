"""Thin helpers around torch.distributed for runs launched by torchrun (no-ops otherwise).

`torchrun_env` is the only place the library reads environment variables: RANK, WORLD_SIZE and LOCAL_RANK,
which torchrun sets for every process it starts.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["torchrun_env", "init_distributed", "is_distributed", "get_rank", "get_world_size", "get_local_rank",
           "is_main", "barrier", "broadcast_object", "all_gather_object", "all_reduce_sum", "all_reduce_mean",
           "cleanup"]


def is_distributed() -> bool:
    """True when a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def torchrun_env() -> tuple[int | None, int | None, int]:
    """(rank, world_size, local_rank) as torchrun describes this process; the only environment read.

    This is torchrun's contract (https://pytorch.org/docs/stable/elastic/run.html): in each process it starts it
    sets RANK (global rank), WORLD_SIZE (number of processes) and LOCAL_RANK (the process's index on its node).
    rank and world_size are None when unset (not launched by torchrun); local_rank is 0 when unset.

    Raises:
        ValueError: one of the variables is set but is not an integer.
    """
    env = os.environ
    rank = int(env["RANK"]) if "RANK" in env else None
    world_size = int(env["WORLD_SIZE"]) if "WORLD_SIZE" in env else None
    return rank, world_size, int(env.get("LOCAL_RANK", "0"))


def get_local_rank() -> int:
    """Rank within this node, from torchrun's LOCAL_RANK (0 when absent; see `torchrun_env`)."""
    return torchrun_env()[2]


def is_main() -> bool:
    """True on rank 0, the only rank that writes files and prints."""
    return get_rank() == 0


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> tuple[int, int, int]:
    """Join the process group torchrun describes; returns (rank, world_size, local_rank)."""
    rank, world, local_rank = torchrun_env()
    if rank is None or world is None:
        return 0, 1, 0
    if world <= 1:
        return rank, 1, local_rank
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank
    use_cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        # one GPU per process; must precede the first CUDA allocation on this rank
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world, local_rank


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return `obj` from rank `src` on every rank (pickled between trusted peers)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """List of every rank's `obj`, indexed by rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over ranks (a new tensor; the input is left alone)."""
    if not is_distributed():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over ranks (a new tensor; the input is left alone)."""
    if not is_distributed():
        return tensor
    out = all_reduce_sum(tensor)
    return out / dist.get_world_size() if out.is_floating_point() else out // dist.get_world_size()


def cleanup() -> None:
    """Leave the process group if one was joined, every rank together (a barrier first: a rank that tears its gloo
    connections down while another still uses them can make that one abort)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
