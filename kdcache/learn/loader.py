"""``ReplayLoader``: a cache's exact views, as batches for any training loop.

The library's data path, and the trainer's: ``kdcache train`` iterates a ``ReplayLoader`` too.
It joins WebDataset shards with a cache (``replay.prepare_shards`` checks them against each other
before anything is decoded), replays view ``e mod V`` of every record in epoch ``e``
(``replay.ReplayStream``: whole shards per worker, a seeded shuffle buffer, the same number of
steps on every rank) and hands out ``replay.Batch`` objects bound to a device: ``images``
normalised there, ``targets`` ready for ``losses.kd_loss``, ``labels``, ``keys``, ``views``.

Determinism: the batches of epoch ``e`` are a function of (data, cache, seed, batch size,
workers, rank, world) only, so ``set_epoch(e, skip_batches=n)`` resumes an epoch at batch ``n``
without rendering the batches before it. Under DDP give every rank its ``rank`` and ``world``
(read from ``torch.distributed`` when it is initialised); every rank then gets the same number
of steps per epoch, its share of the shards (``len(loader)``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..cache.store import CacheReader
from ..data.shards import expand_urls
from ..data.views import AugSpec
from ..errors import KdcacheError
from ..models.factory import IMAGENET_MEAN, IMAGENET_STD
from ..runtime import resolve_device
from .replay import (
    Binding, EpochPlan, ReplayStream, ShardInfo, StreamConfig, check_cache_groups, epoch_batches, prepare_shards,
)

STUDENT_VIEWS = ("cache", "fresh")


def _reader(cache, storage_options, check_digests: bool) -> CacheReader | None:
    if cache is None or isinstance(cache, CacheReader):
        return cache
    inner = getattr(cache, "reader", None)  # a handle from open_cache
    if isinstance(inner, CacheReader):
        return inner
    return CacheReader(str(cache), storage_options, check_digests=check_digests)


class ReplayLoader:
    """Batches of replayed views of ``data`` (shards: a brace pattern, glob, directory or list).

    With ``cache`` (a path, an fsspec URL or ``open_cache``'s handle) every record is seen in the
    view its teacher output was made on and ``batch.targets`` holds that output; without one,
    views are drawn by the cache's sampler from ``view_seed`` (``views``: V views, epoch e uses
    e mod V; None: a fresh view every epoch) and there are no targets.

    Args (keyword-only after ``batch_size``):
        res: the student's resolution [default: the cache's, else 224].
        rank, world: this process's place under DDP [default: torch.distributed's, else 0 of 1].
        workers: DataLoader worker processes (each owns whole shards). seed: shard order and shuffle.
        student_view: ``"cache"`` (the teacher's view: consistent teaching) or ``"fresh"`` (the
            student draws its own crop each epoch, the targets stay the cache's view).
        views_used: replay only the cache's first N views (epoch e uses view e mod N), so one cache
            serves a sweep over the view budget.
        device, mean, std, channels_last: where ``batch.images`` live and how they are normalised.
        labels: require a ``cls`` label on every record (for a loss on labels).
        targets: ship the cache's targets (False: the cache's views only).
        teacher_res: also render every batch at this resolution (``batch.teacher_pixels``), or at each
            of a list of them (a live ensemble's ``resolutions``: ``batch.pixels_at(r)``).
    """

    def __init__(self, data, cache=None, batch_size: int = 128, *, res: int | None = None,
                 rank: int | None = None, world: int | None = None, workers: int = 0, seed: int = 0,
                 student_view: str = "cache", views_used: int | None = None, device=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 channels_last: bool = False, labels: bool = False, targets: bool = True,
                 num_classes: int | None = None, views: int | None = None, view_seed: int | None = None,
                 aug: AugSpec | None = None, teacher_res: int | list[int] | None = None, shuffle_buffer: int = 1024,
                 skip_bad: bool = False, worker_timeout: float = 600.0, check_digests: bool = True,
                 storage_options: dict | None = None, pin_memory: bool | None = None):
        if student_view not in STUDENT_VIEWS:
            raise KdcacheError(f"student_view must be one of {', '.join(STUDENT_VIEWS)}, got {student_view!r}")
        if views_used is not None and cache is None:
            raise KdcacheError("views_used picks among a cache's stored views; without a cache use views=")
        if student_view == "fresh" and cache is None:
            raise KdcacheError("student_view='fresh' draws the student its own crops against a cache's targets; it "
                               "needs a cache")
        if batch_size < 1:
            raise KdcacheError(f"batch_size must be at least 1, got {batch_size}")
        if rank is None or world is None:
            on = dist.is_available() and dist.is_initialized()
            rank = (dist.get_rank() if on else 0) if rank is None else rank
            world = (dist.get_world_size() if on else 1) if world is None else world
        self.reader = _reader(cache, storage_options, check_digests)
        m = self.reader.manifest if self.reader is not None else None
        self.res = res if res is not None else (int(m["resolution"]) if m else 224)
        self.num_classes = num_classes if num_classes is not None else (self.reader.num_classes if m else None)
        self.rank, self.world = rank, world
        self.device = resolve_device("auto") if device is None else torch.device(device)
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory
        urls = expand_urls(data)
        # Ranks split the checks between them when they can talk (a process group); otherwise each checks all.
        together = world > 1 and dist.is_available() and dist.is_initialized()
        self.shards: list[ShardInfo] = prepare_shards(urls, self.reader, labels, rank if together else 0,
                                                      world if together else 1, skip_bad=skip_bad,
                                                      num_classes=self.num_classes)
        if self.reader is not None:  # every view of every group read once: an edited one stops us here
            check_cache_groups(self.reader, [s.name for s in self.shards], workers, rank if together else 0,
                               world if together else 1, storage_options)
        with_targets = bool(targets) and self.reader is not None
        kind = self.reader.kind if self.reader is not None else "topk"
        tau = float(m["targets"].get("temperature", 1.0)) if kind == "sample" else None
        self.binding = Binding(self.device, tuple(mean), tuple(std), channels_last, kind,
                               "sampled" if kind == "sample" else "uniform", tau)
        self.stream = ReplayStream(self.shards, StreamConfig(
            batch_size=batch_size, res=self.res, seed=seed, cache=None if self.reader is None else self.reader.path,
            storage_options=storage_options, with_targets=with_targets, teacher_res=teacher_res, views=views,
            view_seed=seed if view_seed is None else view_seed, aug=aug or AugSpec(), need_labels=labels,
            num_classes=self.num_classes, shuffle_buffer=shuffle_buffer, rank=rank, world=world, workers=workers,
            skip_bad=skip_bad, worker_timeout=worker_timeout, check_digests=check_digests, student_view=student_view,
            views_used=views_used,
        ))
        self.epoch, self.skip_batches = 0, 0

    @property
    def num_views(self) -> int | None:
        """The views replayed: the cache's V (or ``views_used`` of them; ``views`` without a cache; None:
        a fresh view every epoch)."""
        return self.stream.num_views

    @property
    def batch_size(self) -> int:
        return self.stream.cfg.batch_size

    def plan(self, epoch: int) -> EpochPlan:
        """Epoch ``epoch``'s plan: its view, the shards of every rank and worker, its step count."""
        return self.stream.plan(epoch)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """The epoch the next iteration runs (its view is ``epoch mod V``), from batch ``skip_batches``."""
        if skip_batches < 0:
            raise KdcacheError(f"skip_batches must be >= 0, got {skip_batches}")
        self.epoch, self.skip_batches = int(epoch), int(skip_batches)

    def __len__(self) -> int:
        """Batches the next iteration yields (the epoch's steps, less those skipped)."""
        return max(0, self.plan(self.epoch).steps - self.skip_batches)

    def __iter__(self):
        for batch in epoch_batches(self.stream, self.epoch, skip_batches=self.skip_batches, pin_memory=self.pin_memory):
            yield batch.bind(self.binding)
