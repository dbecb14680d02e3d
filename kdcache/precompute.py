"""The teacher stage: run the teacher once on V seeded views of every image; store top-k and views.

Read top to bottom:

1. ``expand_urls`` finds the shards; this process (rank / shard group) takes its disjoint share.
2. Shards already complete in the cache are skipped: re-running the same command resumes.
3. DataLoader workers each own whole shards. A worker reads a shard, decodes every image once,
   draws the shard's views (crops, flips, mixup pairs) and renders all V views from the decoded
   images, in teacher batches that are a fixed function of the shard (``teacher_batches``).
4. The main process runs the teacher on each batch (autocast on CUDA), takes log-softmax and top-k,
   and files the results into the shard's arrays.
5. When every record of a shard is in, the shard group is written and only then marked complete.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import KdcacheError
from .models import create_model, logits_of, normalize
from .shards import decode_shard, expand_urls, load_class_names, shard_name
from .store import CacheWriter, make_manifest
from .views import AugSpec, ShardViews, mix_pixels, render_backend, render_crops, sample_shard_views


@dataclass
class PrecomputeConfig:
    data: str | list[str]
    teacher: str
    out: str
    teacher_weights: str | None = None
    pretrained: bool = False
    num_classes: int | None = None
    views: int = 10
    topk: int = 10
    seed: int = 0
    res: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    mixup: bool = False
    batch_size: int = 256
    device: str = "auto"
    workers: int = 2
    mean: tuple | None = None
    std: tuple | None = None
    shard_index: int = 0
    num_shard_groups: int = 1
    skip_bad: bool = False
    progress: bool = True
    storage_options: dict | None = field(default=None)

    def augmentation(self) -> AugSpec:
        return AugSpec(scale=tuple(self.scale), ratio=tuple(self.ratio), flip=self.flip, mixup=self.mixup)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device(f"cuda:{local}")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise KdcacheError(f"--device {device!r} is not a device torch knows: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdcacheError(f"--device {device} asked for CUDA but no CUDA GPU is visible; use --device cpu")
    return dev


def distributed_context() -> tuple[int, int]:
    """(rank, world size) under torchrun; (0, 1) otherwise. Initialises a gloo group if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def my_shards(urls: list[str], index: int, groups: int, rank: int, world: int) -> list[str]:
    """This process's disjoint share: shard group ``index`` of ``groups``, then rank ``rank`` of ``world``."""
    if groups < 1 or not 0 <= index < groups:
        raise KdcacheError(f"--shard-index must be in [0, --num-shard-groups); got {index} of {groups}")
    slot, slots = index * world + rank, groups * world
    return urls[slot::slots]


# ---- the worker side: shards → rendered teacher inputs ------------------------------------------


@dataclass
class ShardStart:
    """First item a worker yields for a shard: everything but the teacher outputs."""

    url: str
    name: str
    keys: list[str]
    size: np.ndarray  # (N, 2) height, width; -1 for bad
    views: ShardViews
    bad: dict[str, str]
    valid: np.ndarray  # (N,) bool


@dataclass
class WorkerError:
    """A user-facing error raised inside a worker, carried to the main process as a message."""

    message: str


@dataclass
class RecordBatch:
    """Rendered views as uint8 crops; ``views.mix_pixels(own, other, lam)`` gives the pixels."""

    name: str
    index: np.ndarray  # (b,) record index in shard
    view: np.ndarray  # (b,) view index
    own: torch.Tensor  # (b, 3, R, R) uint8
    other: torch.Tensor  # (b, 3, R, R) uint8, zeros where not mixed
    lam: torch.Tensor  # (b,) float32, 1.0 where not mixed


def shard_views(seed: int, name: str, keys, sizes, valid, num_views: int, aug: AugSpec) -> ShardViews:
    """Views for a shard, with bad records given no view and no mixup partner."""
    safe = np.where(valid[:, None], sizes, 1)
    sv = sample_shard_views(seed, name, keys, safe, num_views, aug)
    for i in np.flatnonzero(~valid):
        for v in range(num_views):
            j = sv.mix_with[i, v]
            if j >= 0:  # the partner keeps its own image alone
                sv.mix_with[j, v], sv.mix_lam[j, v] = -1, 1.0
        sv.box[i], sv.flip[i], sv.mix_with[i], sv.mix_lam[i] = 0, False, -1, 1.0
    return sv


class ShardRenderStream(IterableDataset):
    """Each worker owns whole shards; yields a ``ShardStart`` then ``RecordBatch``es per shard."""

    def __init__(self, urls: list[str], cfg: PrecomputeConfig):
        self.urls, self.cfg = urls, cfg

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        try:
            yield from self._shards(self.urls[wid::nw])
        except KdcacheError as e:
            yield WorkerError(str(e))

    def _shards(self, urls):
        cfg, aug = self.cfg, self.cfg.augmentation()
        for url in urls:
            name = shard_name(url)
            d = decode_shard(url, cfg.skip_bad)
            keys, sizes, images, bad = d.keys, d.sizes, d.images, d.bad
            valid = np.array([im is not None for im in images], dtype=bool)
            sv = shard_views(cfg.seed, name, keys, sizes, valid, cfg.views, aug)
            yield ShardStart(url, name, keys, sizes, sv, bad, valid)
            for pairs in teacher_batches(valid, cfg.views, cfg.batch_size):
                yield render_batch(name, images, sv, pairs, cfg.res)


def teacher_batches(valid: np.ndarray, views: int, batch_size: int) -> list[np.ndarray]:
    """How the teacher sees one shard: its (record, view) pairs, records in tar order with all their
    views, bad records left out, cut into consecutive batches of ``batch_size`` (the last may be
    smaller). A pure function of the shard, so a resumed run (which redoes unfinished shards whole)
    and ``kdcache verify`` give the teacher exactly the batches an uninterrupted run gave it: batch
    composition can change a result's last bit (cuDNN/oneDNN pick kernels by shape).

    Returns one (b, 2) int64 array of (record, view) per batch.
    """
    rows = np.flatnonzero(np.asarray(valid, dtype=bool))
    pairs = np.stack([np.repeat(rows, views), np.tile(np.arange(views), len(rows))], axis=1).astype(np.int64)
    return [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]


def render_batch(name: str, images: list, sv: ShardViews, pairs: np.ndarray, res: int) -> "RecordBatch":
    """The uint8 crops of the given (record, view) pairs of one shard: one teacher batch."""
    b = len(pairs)
    own = torch.empty((b, 3, res, res), dtype=torch.uint8)
    other = torch.zeros((b, 3, res, res), dtype=torch.uint8)
    lam = torch.ones(b, dtype=torch.float32)
    for j, (i, v) in enumerate(pairs.tolist()):
        view = sv.view(i, v)
        partner = images[view.mix_with] if view.mixed else None
        pview = sv.view(view.mix_with, v) if view.mixed else None
        own[j], crop = render_crops(images[i], view, res, partner, pview)
        if crop is not None:
            other[j], lam[j] = crop, float(view.mix_lam)
    return RecordBatch(name, pairs[:, 0].copy(), pairs[:, 1].copy(), own, other, lam)


# ---- the main side: teacher → top-k → shard groups --------------------------------------------


class _Pending:
    """A shard whose records are being filled in."""

    def __init__(self, start: ShardStart, views: int, k: int):
        n = len(start.keys)
        self.start = start
        self.logprobs = np.full((n, views, k), -np.inf, dtype=np.float16)
        self.classes = np.full((n, views, k), -1, dtype=np.int64)
        self.remaining = int(start.valid.sum()) * views


def _identity(x):
    return x


def teacher_topk_tensors(model, pixels: torch.Tensor, mean, std, k: int, device: torch.device):
    """Top-k log-probabilities (T=1, descending, float16) and class ids of the teacher, as tensors
    on ``device``, for a batch of float pixels in [0, 1] (B, 3, H, W)."""
    x = pixels.to(device, non_blocking=True)
    x = normalize(x, mean, std)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = logits_of(model(x))
    else:
        logits = logits_of(model(x))
    logp = torch.log_softmax(logits.float(), dim=-1)
    vals, ids = torch.topk(logp, k, dim=-1, largest=True, sorted=True)
    return vals.half(), ids


def teacher_topk(model, pixels: torch.Tensor, mean, std, k: int, device: torch.device):
    """``teacher_topk_tensors`` as numpy arrays on the host (what the store keeps)."""
    vals, ids = teacher_topk_tensors(model, pixels, mean, std, k, device)
    return vals.cpu().numpy(), ids.cpu().numpy()


def batch_topk(model, batch: RecordBatch, mean, std, k: int, device: torch.device):
    """The teacher's top-k for a rendered batch: crops mixed on the device, then ``teacher_topk``."""
    pixels = mix_pixels(
        batch.own.to(device, non_blocking=True), batch.other.to(device, non_blocking=True),
        batch.lam.to(device, non_blocking=True),
    )
    return teacher_topk(model, pixels, mean, std, k, device)


def compute_record(batch_size: int, device: torch.device) -> dict:
    """How the teacher ran, as the manifest records it. The same data, settings and seed give the
    same outputs bit for bit only with these fixed too."""
    return {"batch_size": int(batch_size), "device": device.type,
            "precision": "bf16" if device.type == "cuda" else "fp32"}


def precompute(cfg: PrecomputeConfig) -> dict:
    """Run the teacher stage. Returns a summary (shards written and skipped, records, images/s)."""
    if cfg.views < 1:
        raise KdcacheError("--views must be at least 1")
    if cfg.topk < 1:
        raise KdcacheError("--topk must be at least 1")
    if cfg.batch_size < 1:
        raise KdcacheError("--batch-size must be at least 1")
    try:
        aug = cfg.augmentation()  # validates the ranges
    except ValueError as e:
        raise KdcacheError(f"invalid --scale/--ratio: {e}") from None
    urls = expand_urls(cfg.data)
    rank, world = distributed_context()
    device = resolve_device(cfg.device)

    info = create_model(
        cfg.teacher, num_classes=cfg.num_classes, weights=cfg.teacher_weights, pretrained=cfg.pretrained,
        mean=cfg.mean, std=cfg.std, resolution=cfg.res,
    )
    if cfg.topk > info.num_classes:
        raise KdcacheError(f"--topk {cfg.topk} exceeds the teacher's {info.num_classes} classes")
    names = load_class_names(urls)
    manifest = make_manifest(
        teacher=info.describe(), augmentation=aug.to_dict(), seed=cfg.seed, views=cfg.views, topk=cfg.topk,
        resolution=cfg.res, render=render_backend(), shards=[shard_name(u) for u in urls], sources=urls,
        class_names=names if names is not None and len(names) == info.num_classes else None,
        compute=compute_record(cfg.batch_size, device),
    )
    # Rank 0 creates the store; the others open it once it exists.
    if rank == 0:
        writer = CacheWriter(cfg.out, manifest, cfg.storage_options)
    if world > 1:
        dist.barrier()
    if rank != 0:
        writer = CacheWriter(cfg.out, manifest, cfg.storage_options)

    mine = my_shards(urls, cfg.shard_index, cfg.num_shard_groups, rank, world)
    todo = [u for u in mine if not writer.is_complete(shard_name(u))]
    summary = {
        "cache": cfg.out, "shards_total": len(urls), "shards_mine": len(mine),
        "shards_skipped": len(mine) - len(todo), "shards_written": 0, "images": 0, "records": 0,
        "bad": 0, "seconds": 0.0, "images_per_s": 0.0,
    }
    if not todo:
        return summary

    model = info.model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    workers = max(0, min(cfg.workers, len(todo)))
    loader = DataLoader(
        ShardRenderStream(todo, cfg), batch_size=None, num_workers=workers, collate_fn=_identity,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    bar = _progress(len(todo), rank, cfg.progress)
    pending: dict[str, _Pending] = {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for item in loader:
            if isinstance(item, WorkerError):
                raise KdcacheError(item.message)
            if isinstance(item, ShardStart):
                pending[item.name] = p = _Pending(item, cfg.views, cfg.topk)
            else:
                p = pending[item.name]
                vals, ids = batch_topk(model, item, info.mean, info.std, cfg.topk, device)
                p.logprobs[item.index, item.view] = vals
                p.classes[item.index, item.view] = ids
                p.remaining -= len(item.index)
            if p.remaining == 0:
                _write(writer, p)
                del pending[p.start.name]
                summary["shards_written"] += 1
                summary["images"] += int(p.start.valid.sum())
                summary["records"] += int(p.start.valid.sum()) * cfg.views
                summary["bad"] += len(p.start.bad)
                if bar is not None:
                    elapsed = time.perf_counter() - t0
                    bar.update(1)
                    bar.set_postfix_str(
                        f"{summary['images']} img, {summary['images'] / elapsed:.1f} img/s, "
                        f"{summary['records'] / elapsed:.1f} views/s"
                    )
    if bar is not None:
        bar.close()
    if pending:  # a worker stopped early: never mark partial work complete
        raise KdcacheError(f"precompute ended with unfinished shards {sorted(pending)}; re-run to resume")
    summary["seconds"] = time.perf_counter() - t0
    summary["images_per_s"] = summary["images"] / max(summary["seconds"], 1e-9)
    if world > 1:
        dist.barrier()
    return summary


def _write(writer: CacheWriter, p: _Pending) -> None:
    s = p.start
    writer.write_shard(
        s.name, source=s.url, keys=s.keys, size=s.size, logprobs=p.logprobs, classes=p.classes,
        box=s.views.box, flip=s.views.flip, mix_with=s.views.mix_with, mix_lam=s.views.mix_lam,
        bad=s.bad, render=render_backend(),
    )


def _progress(total: int, rank: int, enabled: bool):
    if not enabled or rank != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="shard", desc="precompute", dynamic_ncols=True)
