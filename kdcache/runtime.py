"""Where code runs: the device, the process group under torchrun, DataLoader worker shares, and
carrying a user-facing error out of a worker.

- ``resolve_device``     ``auto``/``cpu``/``cuda``/``cuda:N`` → a ``torch.device`` (a clear error otherwise)
- ``init_distributed``   (rank, world, local rank): joins the torchrun process group once (NCCL for
                         CUDA processes, gloo otherwise); (0, 1, 0) without torchrun
- ``default_workers``    a DataLoader worker count that fits the machine's cores
- ``set_threads``        torch's threads for the main process, by default the cores the workers leave
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
            return cuda_device(None)
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise KdcacheError(f"--device {device!r} is not a device torch knows: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdcacheError(f"--device {device} asked for CUDA but no CUDA GPU is visible; use --device cpu")
    if dev.type == "cuda" and dev.index is None:
        # `cuda` alone is this process's GPU, as for ``auto``: an index, so that tensors made on it
        # (``cuda:N``) compare equal to it and ``torch.cuda.set_device`` takes it
        return cuda_device(None)
    return dev


def cuda_device(index: int | None):
    """A CUDA device with its index: ``index``, or this process's GPU (torchrun's LOCAL_RANK, else 0)."""
    import torch

    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if index is None else index)


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
    return max(0, min(4, available_cores() - 1))


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads(workers: int) -> int:
    """torch threads for the main process: the cores this process may use (its share under
    torchrun) less one per data worker, at least one."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, available_cores() // max(1, local_world) - workers)


def set_threads(threads: int | None, workers: int) -> int:
    """Set torch's intra-op threads (``threads``, or ``default_threads``); returns the count."""
    import torch

    n = default_threads(workers) if threads is None else int(threads)
    if n < 1:
        raise KdcacheError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    return n


def unbatched(x):
    """A DataLoader ``collate_fn`` for streams that already yield whole batches: the item as it is
    (a module-level function, so worker processes can pickle it)."""
    return x


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


def space_problems(path: str | None = None) -> list[str]:
    """What about this machine's limits could stop data workers or writes: a file-size limit,
    little shared memory (/dev/shm, through which DataLoader workers ship batches), a full disk."""
    import shutil

    found = []
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY:
            found.append(f"a file-size limit (ulimit -f) of {soft:,} bytes is set for this process")
    except (ImportError, ValueError, OSError):
        pass
    for where, what, low in (("/dev/shm", "shared memory (/dev/shm, through which data workers ship batches; "
                              "Docker's default is 64 MiB: run the container with --shm-size 8g or --ipc=host)",
                              256 << 20),
                             (path, f"the disk holding {path}", 1 << 30)):
        if where and "://" not in str(where):
            target = where if os.path.exists(where) else os.path.dirname(os.path.abspath(where)) or "."
            try:
                free = shutil.disk_usage(target).free
            except OSError:
                continue
            if free < low:
                found.append(f"only {free / 2**20:.0f} MiB are free in {what}")
    return found


SHIP_FAILED_EXIT = 75  # a data worker's exit code when it could not ship a batch to the main process


def _ship_failed(e, obj) -> None:
    """In a data worker: a batch could not be sent to the main process (its shared memory could
    not be made: /dev/shm full, a file-size limit). The queue would print a traceback and drop the
    batch, leaving the main process to wait; instead the worker removes the shared-memory files it
    made and ends at once, so the main process learns of it and names the cause."""
    import glob
    import sys

    sys.stderr.write(f"kdcache: a data worker could not ship a batch ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:200] if str(e) else ''}); it stops\n")
    sys.stderr.flush()
    for f in glob.glob(f"/dev/shm/torch_{os.getpid()}_*"):
        try:
            os.remove(f)
        except OSError:
            pass
    os._exit(SHIP_FAILED_EXIT)


def worker_init(_worker_id: int) -> None:
    """``worker_init_fn`` of every kdcache DataLoader: one torch thread per worker, and a batch that
    cannot be shipped ends the worker quietly (``_ship_failed``) instead of vanishing."""
    import multiprocessing.queues

    import torch

    torch.set_num_threads(1)
    multiprocessing.queues.Queue._on_queue_feeder_error = staticmethod(_ship_failed)


def worker_items(loader, timeout: float, out: str | None = None):
    """Iterate a DataLoader, turning a lost worker into a ``KdcacheError`` that names the likely
    cause. A worker that cannot ship a batch (shared memory or file-size limit exhausted) can drop it
    silently and leave the main process waiting forever; the loader's ``timeout`` ends that wait."""
    try:
        yield from loader
    except RuntimeError as e:
        msg = str(e)
        if "timed out" not in msg and "DataLoader worker" not in msg:
            raise
        causes = space_problems(out)
        if "timed out" in msg:
            what = f"no batch arrived from the data workers for {timeout:.0f} s"
        else:  # a worker that cannot ship a batch ends with SHIP_FAILED_EXIT, saying so on stderr
            what = f"a data worker died ({msg.splitlines()[0]})"
        raise KdcacheError(
            f"{what}. " + (f"Likely cause: {'; '.join(causes)}. " if causes else
                           "A worker that cannot ship a batch (shared memory or disk full) stalls the job. ")
            + "Free the space or raise the limit, or use --workers 0 (no shared memory), then re-run the same "
            "command: it resumes (--worker-timeout sets how long to wait for a batch)") from None
