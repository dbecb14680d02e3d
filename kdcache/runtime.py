"""Where code runs: the device, the process group under torchrun, DataLoader worker shares, and
carrying a user-facing error out of a worker.

- ``resolve_device``     ``auto``/``cpu``/``cuda``/``cuda:N`` → a ``torch.device`` (a clear error otherwise)
- ``init_distributed``   (rank, world, local rank): joins the torchrun process group once (NCCL for
                         CUDA processes, gloo otherwise); (0, 1, 0) without torchrun
- ``default_workers``    a DataLoader worker count that fits the machine's cores
- ``worker_share``       the part of a list this DataLoader worker owns
- ``WorkerError``, ``guarded``, ``raise_if_error``   a ``KdcacheError`` raised in a worker travels
                         to the main process as a message and is raised there again
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import KdcacheError

# torch is imported inside the functions that need it: the CLI reads default_workers at start-up.


def resolve_device(device: str):
    """``auto`` (this process's CUDA device under torchrun, else the first, else the CPU) or a device name."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise KdcacheError(f"--device {device!r} is not a device torch knows: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdcacheError(f"--device {device} asked for CUDA but no CUDA GPU is visible; use --device cpu")
    return dev


def init_distributed(device: str = "auto") -> tuple[int, int, int]:
    """(rank, world size, local rank). Under torchrun, joins the process group the first time:
    NCCL when this process runs on CUDA, gloo otherwise."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def default_workers() -> int:
    """DataLoader workers by default: one core stays with the main process, at most 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cores - 1))


def worker_share(items: list) -> list:
    """The items this DataLoader worker owns (every item in the main process)."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    return items if info is None else items[info.id :: info.num_workers]


@dataclass
class WorkerError:
    """A ``KdcacheError`` raised inside a DataLoader worker, carried to the main process as its message."""

    message: str


def guarded(items):
    """Yield from ``items``; a ``KdcacheError`` ends the stream with a ``WorkerError`` item instead
    of a worker traceback (use in a worker's ``__iter__``)."""
    try:
        yield from items
    except KdcacheError as e:
        yield WorkerError(str(e))


def raise_if_error(item):
    """Raise the ``KdcacheError`` a worker sent; return any other item unchanged."""
    if isinstance(item, WorkerError):
        raise KdcacheError(item.message)
    return item
