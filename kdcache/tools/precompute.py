"""The teacher stage: run the teacher once on V seeded views of every image; store top-k and views.

Read top to bottom:

1. ``expand_urls`` finds the shards; this process (rank / shard group) takes its disjoint share.
2. Shards already complete in the cache are skipped: re-running the same command resumes.
3. DataLoader workers each own whole shards. A worker reads a shard, decodes every image once,
   draws the shard's views (``views.sample_shard_views``: crops, flips, mixup pairs) and renders
   all V views from the decoded images (``render.crop_batch``), in teacher batches that are a
   fixed function of the shard (``teacher_batches``).
4. The main process runs the teacher on each batch (``ensemble.ensemble_batch_topk``: mixed on the
   device, bf16 autocast on CUDA, log-softmax, top-k; with ``--targets sample``,
   ``ensemble.ensemble_batch_logprobs`` and ``targets.draw_batch``: N classes drawn per record,
   seeded by (seed, key, view)) and files the results into the shard's arrays. Several
   ``--teacher``s are an ensemble (``models/ensemble.py``): each batch is rendered at every member's
   resolution from the same boxes and mixes, and the members' probabilities are averaged; one
   teacher is a one-member ensemble, stored exactly as a single teacher.
5. When every record of a shard is in, the shard group is written and only then marked complete.

Growing a cache (``--views`` larger than the cache's, ``cache/store/growth.py``): a complete group
holding fewer views is claimed like an unfinished one; its worker renders only the new views
(``ShardStart.first_view`` on), the main process fills the views the group holds from the cache
(read back and checked against their digests), and the group is rewritten whole. When every group
holds the new V, ``CacheWriter.finish_growth`` ends the growth in the manifest.

The render backend (``--render``: ``render.make_renderer``) decides where pixels are made. PIL, and
the torch backend on the CPU, decode and render in the workers as above. The torch backend on CUDA
decodes on the GPU: the workers only read the tar and the image headers and ship the shard's
encoded images in its ``ShardStart``; the main process decodes them (nvJPEG), drops the records
that do not decode (``views.drop_records``, with ``--skip-bad``), and renders the same teacher
batches on the device (``device_batches``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from .config import PrecomputeConfig
from ..errors import KdcacheError, writing
from ..runtime import (
    barrier, guarded, init_distributed, raise_if_error, resolve_device, set_threads, unbatched, worker_init,
    worker_items, worker_share,
)
from ..data.shards import check_shards_open, decode_shard, expand_urls, load_class_names, shard_name
from ..cache.store import CLAIM_REFRESH_S, CacheWriter, encoding_record, make_manifest
from ..cache.targets import draw_batch, slots, targets_record
from ..models.ensemble import Ensemble, ensemble_batch_logprobs, ensemble_batch_topk, load_ensemble
from ..models.teacher import NonFiniteTeacherOutput, compute_record
from ..data.views import ShardViews, drop_records, sample_shard_views
from ..data.render import CropBatch, crop_batch
from ..data.render import make_renderer


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
    images: list | None = None  # views.Encoded images, when the renderer decodes on the device
    first_view: int = 0  # views the group already holds (a cache being grown): only later ones are rendered


@dataclass
class RecordBatch:
    """One teacher batch of a shard: which (record, view) pairs, and their crops (at the first
    teacher resolution; an ensemble's other resolutions in ``more``)."""

    name: str
    index: np.ndarray  # (b,) record index in shard
    view: np.ndarray  # (b,) view index
    crops: CropBatch
    res: int  # the resolution of ``crops``
    more: dict = field(default_factory=dict)  # resolution -> CropBatch: the same boxes at other sizes

    def at(self) -> dict:
        """The batch's crops by resolution, every teacher resolution it was rendered at."""
        return {self.res: self.crops, **self.more}


def teacher_batches(valid: np.ndarray, views: int, batch_size: int, first: int = 0) -> list[np.ndarray]:
    """How the teacher sees one shard: its (record, view) pairs, records in tar order with all their
    views (from view ``first`` on: a group grown from ``first`` views), bad records left out, cut into
    consecutive batches of ``batch_size`` (the last may be smaller). A pure function of the shard, so a resumed run (which redoes unfinished shards whole)
    and ``kdcache verify`` give the teacher exactly the batches an uninterrupted run gave it: batch
    composition can change a result's last bit (cuDNN/oneDNN pick kernels by shape).

    Returns one (b, 2) int64 array of (record, view) per batch.
    """
    rows = np.flatnonzero(np.asarray(valid, dtype=bool))
    vs = np.arange(first, views)
    pairs = np.stack([np.repeat(rows, len(vs)), np.tile(vs, len(rows))], axis=1).astype(np.int64)
    return [pairs[i : i + batch_size] for i in range(0, len(pairs), batch_size)]


def teacher_sizes(cfg: PrecomputeConfig) -> list[int]:
    """The resolutions every teacher batch is rendered at: each member's, once, in member order."""
    return list(dict.fromkeys(m.res for m in cfg.members()))


def render_batch(name: str, images: list, sv: ShardViews, pairs: np.ndarray, res, renderer=None) -> RecordBatch:
    """The crops of the given (record, view) pairs of one shard: one teacher batch (``renderer``:
    the render backend, default PIL; ``images`` are its decoded images), at ``res`` (one resolution,
    or a list: an ensemble's, each rendered from the same boxes and mixes)."""
    sizes = [int(res)] if isinstance(res, (int, np.integer)) else list(res)
    records = [(images, sv, i, v) for i, v in pairs.tolist()]
    crops = [crop_batch(records, r, renderer) for r in sizes]
    return RecordBatch(name, pairs[:, 0].copy(), pairs[:, 1].copy(), crops[0], sizes[0],
                       dict(zip(sizes[1:], crops[1:])))


def device_batches(start: ShardStart, renderer, cfg: PrecomputeConfig):
    """A shard a worker shipped undecoded (``start.images``): decode it on the renderer's device, once,
    and yield what a worker would have: its ``ShardStart`` (records that failed to decode now
    recorded as bad, with ``--skip-bad``) and its teacher batches."""
    from ..errors import BadImageError

    errors: list = []
    valid = start.valid.copy()
    rows = np.flatnonzero(valid)
    decoded = renderer.decode_many([start.images[i] for i in rows], errors) if len(rows) else []
    if errors and not cfg.skip_bad:
        n, cause = errors[0]
        raise BadImageError(start.url, start.keys[int(rows[n])], cause)
    images: list = [None] * len(start.keys)
    for i, im in zip(rows, decoded):
        images[i] = im
    size, bad, views = start.size.copy(), dict(start.bad), start.views
    if errors:
        lost = [int(rows[n]) for n, _ in errors]
        for (_, cause), i in zip(errors, lost):
            bad[start.keys[i]] = cause
        valid[lost], size[lost] = False, -1
        views = ShardViews(views.box.copy(), views.flip.copy(), views.mix_with.copy(), views.mix_lam.copy())
        drop_records(views, lost)
    yield ShardStart(start.url, start.name, start.keys, size, views, bad, valid, first_view=start.first_view)
    sizes = teacher_sizes(cfg)
    for pairs in teacher_batches(valid, cfg.views, cfg.batch_size, start.first_view):
        yield render_batch(start.name, images, views, pairs, sizes, renderer)


class ShardRenderStream(IterableDataset):
    """Each worker owns whole shards; yields a ``ShardStart`` then ``RecordBatch``es per shard."""

    def __init__(self, urls: list[str], cfg: PrecomputeConfig, renderer=None, first_views: dict | None = None):
        self.urls, self.cfg, self.renderer = urls, cfg, renderer or make_renderer(cfg.render)
        self.first_views = dict(first_views or {})  # url -> views its group already holds (growing)

    def __iter__(self):
        return guarded(self._shards(worker_share(self.urls)))

    def _shards(self, urls):
        cfg = self.cfg
        sizes = teacher_sizes(cfg)  # (the members are matched and checked once, not per batch)
        for url in urls:
            name = shard_name(url)
            d = decode_shard(url, cfg.skip_bad, self.renderer)
            valid = np.array([im is not None for im in d.images], dtype=bool)
            sv = sample_shard_views(cfg.seed, name, d.keys, d.sizes, cfg.views, cfg.aug, valid=valid)
            first = self.first_views.get(url, 0)
            if self.renderer.deferred:  # the main process decodes and renders on the device
                yield ShardStart(url, name, d.keys, d.sizes, sv, d.bad, valid, images=d.images, first_view=first)
                continue
            yield ShardStart(url, name, d.keys, d.sizes, sv, d.bad, valid, first_view=first)
            for pairs in teacher_batches(valid, cfg.views, cfg.batch_size, first):
                yield render_batch(name, d.images, sv, pairs, sizes, self.renderer)


# ---- the main side: teacher → top-k → shard groups --------------------------------------------


class _Pending:
    """A shard whose records are being filled in: top-k log-probs (float16 as the plain layout stores
    them; float32 for the compact one, which quantises them itself) or sampled counts, and classes."""

    def __init__(self, start: ShardStart, views: int, k: int, sampled: bool = False, compact: bool = False):
        n = len(start.keys)
        self.start = start
        self.logprobs = None if sampled else np.full((n, views, k), -np.inf,
                                                     dtype=np.float32 if compact else np.float16)
        self.counts = np.zeros((n, views, k), dtype=np.uint8) if sampled else None
        self.classes = np.full((n, views, k), -1, dtype=np.int64)
        self.remaining = int(start.valid.sum()) * (views - start.first_view)

    def keep_stored_views(self, stored: dict, where: str) -> None:
        """Fill the views a group being grown already holds (``stored``: ``CacheReader.read_shard``,
        checked against its digests) after checking that the shard still has the group's keys, sizes
        and bad records."""
        s, V0 = self.start, self.start.first_view
        same = (list(map(str, stored["keys"])) == list(s.keys)
                and np.array_equal(np.asarray(stored["size"]), np.asarray(s.size)))
        if not same:
            raise KdcacheError(
                f"cannot grow shard group {s.name!r} of {where}: shard {s.url} no longer has the keys or image sizes the "
                "group was written with (the dataset changed). Precompute into a new --out")
        if self.logprobs is not None:
            self.logprobs[:, :V0] = stored["logprobs"]
        else:
            self.counts[:, :V0] = stored["counts"]
        self.classes[:, :V0] = stored["classes"]



UPSCALE_NOTED = 2.0  # a teacher resolution this many times the images' short side gets a note
SIZE_PROBE = 32  # images of the first shard whose sizes are read for it (headers only)


def upscale_note(url: str, res: int) -> str | None:
    """A ``note:`` when ``--res`` renders the teacher's views far larger than the images are: the
    median short side of the first images of the shard ``url`` (local shards only; their headers,
    no pixels decoded) against ``res``. None when the sizes are fine or cannot be read cheaply (a
    bad image is reported where it is decoded, not here)."""
    import io

    from PIL import Image

    from ..data.shards import is_remote, iter_samples

    if is_remote(url):
        return None
    sides = []
    try:
        for sample in iter_samples(url):
            with Image.open(io.BytesIO(sample.image)) as im:
                sides.append(min(im.size))
            if len(sides) == SIZE_PROBE:
                break
    except Exception:  # noqa: BLE001 - the note is a courtesy; decoding reports real problems
        return None
    if not sides:
        return None
    short = float(np.median(sides))
    if res <= UPSCALE_NOTED * short:
        return None
    return (f"note: --res {res} renders the teacher's views at {res} px from images of about {short:.0f} px (median "
            f"short side of the first {len(sides)} in {shard_name(url)}): every view is upscaled at least "
            f"{res / short:.1f}x; pass a --res nearer the images' size unless the teacher needs {res} px")


def precompute(cfg: PrecomputeConfig) -> dict:
    """Run the teacher stage. Returns a summary (shards written and skipped, records, images/s)."""
    urls = expand_urls(cfg.data)
    check_shards_open(urls)  # before anything is made: a failed start leaves no cache behind
    rank, world, _ = init_distributed(cfg.device)
    device = resolve_device(cfg.device)
    threads = set_threads(cfg.threads, cfg.workers)

    teacher = load_ensemble(cfg.members(), device, num_classes=cfg.num_classes, pretrained=cfg.pretrained)
    C, res = teacher.num_classes, teacher.resolutions[0]
    sampled = cfg.targets == "sample"
    if not sampled and cfg.topk > C:
        raise KdcacheError(f"--topk {cfg.topk} exceeds the teacher's {C} classes")
    names = load_class_names(urls)
    renderer = make_renderer(cfg.render, device)
    manifest = make_manifest(
        teacher=teacher.describe(), augmentation=cfg.aug.to_dict(), seed=cfg.seed, views=cfg.views,
        topk=slots(cfg.samples, C) if sampled else cfg.topk,
        resolution=res, render=renderer.describe(), shards=[shard_name(u) for u in urls], sources=urls,
        class_names=names if names is not None and len(names) == C else None,
        compute=compute_record(cfg.batch_size, device),
        targets=targets_record(cfg.targets, cfg.samples, cfg.sample_temperature),
        encoding=encoding_record("compact" if cfg.compact else "plain", cfg.targets),
    )
    # Rank 0 creates the store; the others open it once it exists.
    with writing(cfg.out, "--out"):
        writer = CacheWriter(cfg.out, manifest, cfg.storage_options) if rank == 0 else None
    barrier(world)
    with writing(cfg.out, "--out"):
        writer = writer or CacheWriter(cfg.out, manifest, cfg.storage_options)

    mine = my_shards(urls, cfg.shard_index, cfg.num_shard_groups, rank, world)
    # Claim every unfinished group before any work: a group another live writer holds is left to it.
    claims, elsewhere = {}, []
    try:
        with writing(cfg.out, "--out"):  # an existing cache on a read-only file system fails here
            for u in mine:
                name = shard_name(u)
                if writer.is_complete(name):
                    continue
                c = writer.claim(name)
                if c is None and not writer.is_complete(name):
                    elsewhere.append(name)
                elif c is not None:
                    claims[name] = c
        todo = [u for u in mine if shard_name(u) in claims]
        first_views = ({u: v for u in todo if (v := writer.stored_views(shard_name(u)))}  # groups to grow
                       if writer.growing is not None else {})
        summary = {
            "cache": cfg.out, "shards_total": len(urls), "shards_mine": len(mine),
            "shards_skipped": len(mine) - len(todo) - len(elsewhere), "shards_written": 0,
            "shards_grown": len(first_views), "growth_finished": False,
            "shards_held_elsewhere": sorted(elsewhere), "images": 0, "records": 0, "bad": 0, "seconds": 0.0,
            "images_per_s": 0.0, "threads": threads, "workers": cfg.workers,
        }
        if todo and rank == 0:
            note = upscale_note(todo[0], max(teacher.sizes))
            if note:
                print(note, file=sys.stderr, flush=True)
            if first_views:
                print(f"kdcache precompute: growing {cfg.out} to {cfg.views} views: {len(first_views)} of this "
                      f"process's groups hold {sorted(set(first_views.values()))} views; only the new views are "
                      "computed", file=sys.stderr, flush=True)
            if cfg.progress:
                print(f"kdcache precompute: {len(todo)} of {len(mine)} shards to write, {cfg.views} views per image at "
                      f"{'/'.join(map(str, teacher.sizes))} px, teacher {' + '.join(m.spec for m in cfg.members())} "
                      f"on {device} in batches of {cfg.batch_size}; the bar moves "
                      "once the first shard is decoded and its first batch has run", file=sys.stderr, flush=True)
        if todo:
            _run(cfg, teacher, writer, todo, claims, summary, rank, renderer, first_views)
    finally:
        writer.release_claims()  # the groups not written (an error, a kill is handled by the next run)
        writer.clear_stale_claims()  # and a claim a killed run left on a group it had completed
    barrier(world)
    with writing(cfg.out, "--out"):
        summary["growth_finished"] = writer.finish_growth()  # once every group holds V (any process may)
    return summary


def _run(cfg: PrecomputeConfig, teacher: Ensemble, writer: CacheWriter, todo: list[str], claims: dict, summary: dict,
         rank: int, renderer, first_views: dict) -> None:
    """Render, run the teacher and write every shard of ``todo`` (claimed by this process); the groups
    of ``first_views`` (url -> views held) are grown: only their new views are computed."""
    device = teacher.device
    render = renderer.describe()

    workers = max(0, min(cfg.workers, len(todo)))
    loader = DataLoader(
        ShardRenderStream(todo, cfg, renderer, first_views), batch_size=None, num_workers=workers, collate_fn=unbatched,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
        persistent_workers=False, timeout=cfg.worker_timeout if workers else 0,
        worker_init_fn=worker_init if workers else None,
    )
    bar = _Progress(todo, cfg.views) if cfg.progress and rank == 0 else None
    pending: dict[str, _Pending] = {}
    sampled = cfg.targets == "sample"
    width = int(writer.manifest["topk"])
    t0 = last_refresh = time.perf_counter()
    with torch.inference_mode():
        for item in _on_device(worker_items(loader, cfg.worker_timeout, cfg.out), renderer, cfg):
            if time.perf_counter() - last_refresh > CLAIM_REFRESH_S / 2:
                writer.refresh_claims()  # still alive: other writers leave these groups alone
                last_refresh = time.perf_counter()
            item = raise_if_error(item)
            if isinstance(item, ShardStart):
                pending[item.name] = p = _Pending(item, cfg.views, width, sampled, cfg.compact)
                if item.first_view:
                    p.keep_stored_views(_stored_group(cfg, item.name), cfg.out)
                if bar is not None:
                    bar.shard_started(item.name, p.remaining)
            else:
                p = pending[item.name]
                try:
                    if sampled:  # N draws per record, a pure function of (seed, key, view) and the teacher
                        logp = ensemble_batch_logprobs(teacher, item.at())
                        ids, counts = draw_batch(logp, [p.start.keys[i] for i in item.index], item.view, cfg.seed,
                                                 cfg.samples, cfg.sample_temperature)
                        p.counts[item.index, item.view] = counts
                    else:
                        vals, ids = ensemble_batch_topk(teacher, item.at(), cfg.topk, half=not cfg.compact)
                        p.logprobs[item.index, item.view] = vals
                except NonFiniteTeacherOutput as e:  # nothing of this shard is stored
                    raise e.at(f" for shard {p.start.url}",
                               [f"key {p.start.keys[i]!r} view {v}" for i, v in zip(item.index, item.view)],
                               f"nothing of shard group {item.name!r} was stored (shards finished before it are "
                               "kept); re-run the same command once the teacher is fixed") from None
                p.classes[item.index, item.view] = ids
                p.remaining -= len(item.index)
                if bar is not None:
                    bar.views_done(len(item.index), summary["shards_written"])
            if p.remaining == 0:
                _write(writer, p, claims[p.start.name], render)
                del pending[p.start.name]
                summary["shards_written"] += 1
                summary["images"] += int(p.start.valid.sum())
                summary["records"] += int(p.start.valid.sum()) * (cfg.views - p.start.first_view)
                summary["bad"] += len(p.start.bad)
                if bar is not None:
                    bar.views_done(0, summary["shards_written"])
    if bar is not None:
        bar.close()
    if pending:  # a worker stopped early: never mark partial work complete
        raise KdcacheError(f"precompute ended with unfinished shards {sorted(pending)}; re-run to resume")
    summary["seconds"] = time.perf_counter() - t0
    summary["images_per_s"] = summary["images"] / max(summary["seconds"], 1e-9)


def _stored_group(cfg: PrecomputeConfig, name: str) -> dict:
    """Every view a group being grown holds, decoded and checked against its digests."""
    from ..cache.store import CacheReader

    return CacheReader(cfg.out, cfg.storage_options, growing_ok=True).read_shard(name)


def _on_device(items, renderer, cfg: PrecomputeConfig):
    """The workers' items, a shard shipped undecoded expanded into its teacher batches here."""
    for item in items:  # (a worker's error passes through: the loop raises it)
        if isinstance(item, ShardStart) and item.images is not None:
            yield from device_batches(item, renderer, cfg)
        else:
            yield item


def _write(writer: CacheWriter, p: _Pending, claim, render: dict) -> None:
    s = p.start
    writer.write_shard(
        s.name, source=s.url, keys=s.keys, size=s.size, logprobs=p.logprobs, counts=p.counts, classes=p.classes,
        box=s.views.box, flip=s.views.flip, mix_with=s.views.mix_with, mix_lam=s.views.mix_lam,
        bad=s.bad, render=render, claim=claim,
    )


class _Progress:
    """A bar over the views to compute, so it moves with every teacher batch and shows an ETA from
    the first one. The total is estimated from the first shard's header scan (local shards) and made
    exact as each shard's decode reports its records."""

    def __init__(self, todo: list[str], views: int):
        from tqdm.auto import tqdm

        from ..data.shards import is_remote, scan_keys

        self.views, self.shards = views, len(todo)
        self.known: dict[str, int] = {}
        first = 0 if is_remote(todo[0]) else len(scan_keys(todo[0])[0]) * views
        self.estimate = first  # records per shard, until shards report theirs
        self.bar = tqdm(total=first * self.shards or None, unit="view", desc="precompute", dynamic_ncols=True)
        self.bar.set_postfix_str("decoding the first shard")

    def shard_started(self, name: str, records: int) -> None:
        self.known[name] = records
        self.estimate = sum(self.known.values()) / len(self.known)
        self.bar.total = round(sum(self.known.values()) + self.estimate * (self.shards - len(self.known)))
        if self.bar.n == 0:
            self.bar.set_postfix_str(f"{name} decoded, the teacher's first batch is running", refresh=False)
        self.bar.refresh()

    def views_done(self, n: int, shards_written: int) -> None:
        self.bar.update(n)
        rate = self.bar.format_dict.get("rate") or 0.0
        self.bar.set_postfix_str(f"{rate / self.views:.1f} img/s, {shards_written}/{self.shards} shards",
                                 refresh=False)

    def close(self) -> None:
        self.bar.close()
