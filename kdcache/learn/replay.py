"""The training stream: WebDataset shards joined with the cache by key, views replayed exactly.

Read top to bottom:

1. ``prepare_shards`` (main process, before training) finds how many usable records each shard
   holds — from the cache's attributes (``num_samples`` minus ``bad``), or from a tar header scan
   when there is no cache (with ``skip_bad``: a pass that decodes every image once and records
   the undecodable ones in ``ShardInfo.bad``) — and checks what can be checked without decoding:
   every shard has a complete cache group, the tar's keys equal the cache's keys, ``cls`` labels
   are present when needed.
2. ``ReplayStream.plan(epoch)`` is a pure function of ``(seed, epoch, rank, world, workers,
   batch size)``: a seeded permutation of the shards, dealt greedily to the ranks (balancing
   sample counts) and, inside a rank, to the DataLoader workers. Every rank runs the same number
   of steps: ``min over ranks of ceil(rank samples / batch size)`` (see *Step equalisation*).
3. A worker owns whole shards. For each it decodes every image once, reads view ``e mod V`` of
   the shard's cache group in one go, checks keys and image sizes against the cache, and pushes
   ``(shard, record)`` references through a seeded shuffle buffer. Rendering happens only when a
   reference leaves the buffer: ``render.crop_batch`` gives uint8 crops (own, and the partner's
   for a mixed record), exactly as precompute renders them; ``render.mix_pixels`` on the device
   turns them into the float pixels. Workers ship chunks of ``batch_size`` records.
4. ``epoch_batches`` runs the DataLoader, re-cuts the chunks into batches of ``batch_size`` and
   stops after the plan's step count. DataLoader returns worker chunks round-robin in a fixed
   order, so with deterministic workers the batch sequence is a pure function of the plan.

Step equalisation: uneven shard sizes give ranks different sample counts; each rank stops after
the same ``steps = min_r ceil(N_r / B)`` batches (its last batch may be partial). Records a rank
holds beyond ``steps * B`` are dropped for that epoch (they differ from epoch to epoch, because
the shard permutation changes). With one rank nothing is ever dropped. ``plan().dropped`` says
how many.

Resume: ``epoch_batches(..., skip_batches=N)`` reproduces the epoch from batch N. Workers replace
every chunk that lies wholly inside the first ``N * B`` records by a ``Skipped`` marker (the
shuffle buffer still runs on references, nothing is rendered), so the round-robin interleave and
the remaining batches are exactly those of an uninterrupted epoch.

Modes: with a cache the views (and, for cached KD, the targets) come from the cache. Without a
cache the views are drawn by ``views.sample_shard_views`` from ``view_seed`` — the sampler
precompute uses — for view index ``e mod V`` (``views`` given) or ``e`` (fresh views every
epoch); with the cache's seed, augmentation and V they are the cache's views exactly.

Render backend: with a cache, the cache's (``render.renderer_for`` of its manifest's ``render``),
so the student sees pixels made the way the teacher's were; without one, PIL. The torch backend on
CUDA decodes on the GPU: workers then ship ``views.DeferredCrops`` (the encoded images and views),
which decode and crop on the device when the batch's pixels are asked for.

The validation stream is ``validation.ValStream``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import BadImageError, KdcacheError, size_text
from ..runtime import guarded, raise_if_error, unbatched, worker_init, worker_items, worker_share
from ..data.shards import decode_image, decode_shard, is_remote, iter_samples, scan_keys, scan_labels, shard_name
from ..cache.store import CacheReader
from ..data.render import backend_conflict, renderer_for
from ..data.views import AugSpec, ShardViews, sample_shard_views, stable_seed
from ..data.render import CropBatch, crop_batch
from ..models.factory import normalize
from .losses import Targets

# ---- shard table (main process) ------------------------------------------------------------


@dataclass
class ShardInfo:
    url: str
    name: str
    count: int  # usable records (num_samples minus bad)
    # key -> cause for the records left out: the cache's ``bad`` attribute, or (no cache, --skip-bad)
    # the images that failed to decode before training
    bad: dict[str, str] = field(default_factory=dict)


def _first_difference(a: list[str], b: list[str]) -> tuple[int, str | None, str | None]:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i, x, y
    i = min(len(a), len(b))
    return i, (a[i] if i < len(a) else None), (b[i] if i < len(b) else None)


def _key_mismatch(url: str, name: str, cache_path: str, data_keys: list[str], cache_keys: list[str]) -> KdcacheError:
    i, d, c = _first_difference(data_keys, cache_keys)
    return KdcacheError(
        f"shard {url} does not match cache group {name!r} of {cache_path}: the first differing key is at "
        f"record {i} (data has {d!r}, cache has {c!r}; data holds {len(data_keys)} samples, cache "
        f"{len(cache_keys)}). The cache was made from other data; use the matching --data and --cache"
    )


def _decode_scan(url: str) -> tuple[list[str], list[int | None], dict[str, str]]:
    """Keys, labels (None where absent), and the undecodable images (key -> cause): every image of
    the shard decoded once and dropped (no images are kept)."""
    keys, labels, bad = [], [], {}
    for sample in iter_samples(url):
        keys.append(sample.key)
        labels.append(sample.cls)
        try:
            decode_image(sample)
        except BadImageError as e:
            bad[sample.key] = e.cause
    return keys, labels, bad


def _check_one(url: str, reader: CacheReader | None, need_labels: bool, scan_local: bool,
               skip_bad: bool = False, num_classes: int | None = None) -> ShardInfo:
    name = shard_name(url)
    # Without a cache the scan gives the count (with skip_bad: a decoding pass, which also finds
    # the bad images); with one it checks keys (local tars only: a remote tar would have to be
    # downloaded whole; the stream checks those when it reads them). When labels are needed the
    # scan reads them too (the small cls members only), so a label outside the classes stops the
    # run here, not in the middle of an epoch.
    bad: dict[str, str] = {}
    if reader is None and skip_bad:
        keys, labels, bad = _decode_scan(url)
        scan = (keys, labels)
    elif reader is None or (scan_local and not is_remote(url)):
        scan = scan_labels(url) if need_labels else scan_keys(url)
    else:
        scan = None
    if reader is not None:
        if not reader.has_shard(name):
            raise KdcacheError(
                f"cache {reader.path} has no group for shard {name!r} ({url}); the cache was made for other "
                "data, or precompute has not covered this shard yet"
            )
        n = reader.check_shard(name)  # complete, shapes
        conflict = backend_conflict(reader.manifest.get("render"), reader.shard_attrs(name).get("render"), name,
                                    reader.path)
        if conflict:
            raise KdcacheError(conflict)
        bad = dict(reader.shard_attrs(name).get("bad", {}) or {})
        count = n - len(bad)
        if scan is not None:
            ckeys = reader.keys(name).tolist()
            if scan[0] != ckeys:
                raise _key_mismatch(url, name, reader.path, scan[0], ckeys)
    else:
        count = len(scan[0]) - len(bad)
    if need_labels and scan is not None:
        for key, label in zip(*scan):
            if key in bad:
                continue
            if label is None or label is False:
                raise KdcacheError(
                    f"sample {key!r} in shard {url} has no cls label, but training needs labels "
                    "(--label-weight > 0, labels-only mode, or --val-data); use labelled shards or --label-weight 0"
                )
            if num_classes is not None and type(label) is int and not 0 <= label < num_classes:
                raise KdcacheError(
                    f"sample {key!r} in shard {url} has cls {label}, outside the run's {num_classes} classes "
                    f"(0..{num_classes - 1}): the shards hold other classes than the model (for --val-data: "
                    "the validation shards must use the training classes)")
    return ShardInfo(url, name, int(count), {str(k): str(v) for k, v in bad.items()})


def _check_group(path: str, storage_options: dict | None, check_digests: bool, name: str) -> str | None:
    """``check_cache_groups``' work on one group, in a fresh reader (a pool process): the error's
    message, or None."""
    return _check_in(CacheReader(path, storage_options, check_digests=check_digests), name)


def _check_in(reader: CacheReader, name: str) -> str | None:
    """Read group ``name`` whole through ``reader`` (digests and values checked): the error's message, or None."""
    try:
        reader.read_shard(name)
    except KdcacheError as e:
        return str(e)
    return None


def check_cache_groups(reader: CacheReader, names: list[str], workers: int, rank: int = 0, world: int = 1,
                       storage_options: dict | None = None) -> None:
    """Read every view of every cache group a run is about to use, once, before training: each view
    against the digest precompute recorded (unless the reader skips digests: --allow-edited-cache)
    and its targets for values no teacher gives (``CacheReader.read_shard``). An edited view then
    stops the run before its first step, not in the epoch that reaches it. The groups are split over
    the ranks and, with ``workers`` > 1, over that many processes (a compact cache re-derives every
    view's geometry, the main cost: docs/training.md gives figures)."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    share = names[rank::world]
    if reader.is_remote and len(share) > 1:  # waiting on requests, not the CPU: threads, all in this reader
        found = dict(zip(share, reader.read_ahead(share, partial(_check_in, reader))))
    elif workers > 1 and len(share) > 1:
        check = partial(_check_group, reader.path, storage_options, reader.check_digests)
        with ProcessPoolExecutor(min(workers, len(share))) as pool:
            found = dict(zip(share, pool.map(check, share)))
    else:
        found = {}
        for name in share:
            try:
                reader.read_shard(name)
                found[name] = None
            except KdcacheError as e:
                found[name] = str(e)
                break

    def result(name):
        if found.get(name):
            raise KdcacheError(found[name])

    gather_across_ranks(result, names, rank, world)


def gather_across_ranks(fn, items: list, rank: int, world: int, each=None) -> list:
    """``[fn(x) for x in items]`` with the work split over ranks; errors re-raised on every rank (the
    first in item order wins). ``each(share, fn)`` yields ``fn`` of this rank's items in order (for
    example ``CacheReader.read_ahead``, which reads a remote cache's groups together); default: in turn."""
    mine = {}
    err = None
    share = list(range(rank, len(items), world))
    results = (each or _in_turn)([items[i] for i in share], fn)
    try:
        for i, value in zip(share, results):
            mine[i] = value
    except KdcacheError as e:
        err = str(e)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (mine, err))
    else:
        parts = [(mine, err)]
    errors = [e for _, e in parts if e]
    if errors:
        raise KdcacheError(errors[0])
    merged = {}
    for m, _ in parts:
        merged.update(m)
    return [merged[i] for i in range(len(items))]


def _in_turn(items, fn):
    for x in items:
        yield fn(x)


def prepare_shards(
    urls: list[str], reader: CacheReader | None, need_labels: bool, rank: int = 0, world: int = 1,
    scan_local: bool = True, skip_bad: bool = False, num_classes: int | None = None,
) -> list[ShardInfo]:
    """Usable record counts per shard, with the checks that need no decoding (see module doc).

    ``skip_bad`` matters only without a cache: every image is then decoded once (shards split
    over ranks) to find the undecodable ones, which go into ``ShardInfo.bad`` and are not counted.
    With a cache the bad records are the cache's (``bad`` attribute) either way.
    """
    if reader is not None:
        reader.load_index()  # a remote cache's index of complete groups: no request per group below
    # each shard's keys are one read that waits on a remote cache: read ahead there
    return gather_across_ranks(lambda u: _check_one(u, reader, need_labels, scan_local, skip_bad, num_classes), urls,
                               rank, world, reader.read_ahead if reader is not None else None)


# ---- what workers ship ------------------------------------------------------------------


@dataclass
class Batch:
    """Rendered records: a worker chunk, or a training batch. Pixels stay uint8 until the device.

    What a training loop reads (``ReplayLoader`` binds the batch to a device and a normalisation
    before handing it out): ``images`` (normalised float32 on the device), ``targets`` (the cache's
    ``losses.Targets``, or None), ``labels`` (hard class ids, or None when some record has none),
    ``label_targets(C)`` (soft labels where records are mixed), ``keys``, ``shards`` and ``views``.
    """

    crops: CropBatch  # at the student's resolution (a render.DeferredCrops when decoded on the device)
    label: torch.Tensor  # (b,) int64 own class id, -1 where the shard has no cls
    label_other: torch.Tensor  # (b,) int64 partner class id (= label where unmixed)
    index: torch.Tensor  # (b,) int64 record index in its shard
    keys: list[str]
    shards: list[str]
    view: int
    logprobs: torch.Tensor | None = None  # (b, k) cached teacher top-k (or sampled log-weights)
    classes: torch.Tensor | None = None  # (b, k) int64
    teacher_crops: CropBatch | None = None  # at the live teacher's resolution when it differs
    # At every live-teacher resolution that differs from the student's (an ensemble may have several;
    # the first is ``teacher_crops`` itself).
    more_crops: dict = field(default_factory=dict)
    bound: "Binding | None" = field(default=None, repr=False)  # set in the main process by ReplayLoader
    _pixels: torch.Tensor | None = field(default=None, repr=False)
    _images: torch.Tensor | None = field(default=None, repr=False)

    # -- what a training loop reads (after ``bind``) --

    def bind(self, binding: "Binding") -> "Batch":
        """Tie the batch to a device, a normalisation and a target kind (``ReplayLoader`` does this)."""
        self.bound, self._pixels, self._images = binding, None, None
        return self

    def _binding(self) -> "Binding":
        if self.bound is None:
            raise RuntimeError("this batch is not bound to a device yet; batches from ReplayLoader are")
        return self.bound

    @property
    def images(self) -> torch.Tensor:
        """(b, 3, R, R) float32 on the bound device: the replayed pixels, normalised (channels-last if asked)."""
        if self._images is None:
            b = self._binding()
            x = normalize(self.pixels(b.device), b.mean, b.std)
            self._images = x.contiguous(memory_format=torch.channels_last) if b.channels_last else x
        return self._images

    @property
    def targets(self):
        """The cache's targets for these records (``losses.Targets`` on the bound device), or None
        without cached targets."""
        if self.logprobs is None:
            return None
        b = self._binding()
        return Targets(self.classes.to(b.device, non_blocking=True), self.logprobs.to(b.device, non_blocking=True),
                       b.kind, b.tail, b.sample_temperature)

    @property
    def labels(self) -> torch.Tensor | None:
        """(b,) int64 own class ids on the bound device; None when some record has no cls label."""
        if bool((self.label < 0).any()):
            return None
        return self.label.to(self._binding().device, non_blocking=True)

    @property
    def views(self) -> torch.Tensor:
        """(b,) int64: the view index each record was replayed with (the epoch's: e mod V)."""
        return torch.full((len(self.keys),), int(self.view), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def own(self) -> torch.Tensor:
        return self.crops.own

    @property
    def lam(self) -> torch.Tensor:
        return self.crops.lam

    def pin_memory(self):
        self.crops = self.crops.pin_memory()
        if self.more_crops:
            self.more_crops = {r: c.pin_memory() for r, c in self.more_crops.items()}
            self.teacher_crops = next(iter(self.more_crops.values()))
        elif self.teacher_crops is not None:
            self.teacher_crops = self.teacher_crops.pin_memory()
        for f in ("label", "label_other", "logprobs", "classes"):
            t = getattr(self, f)
            if t is not None:
                setattr(self, f, t.pin_memory())
        return self

    def pixels(self, device) -> torch.Tensor:
        """Float32 pixels in [0, 1] on ``device`` (mixed as precompute mixes them), not normalised."""
        device = torch.device(device)
        if self.bound is not None and device == self.bound.device:
            if self._pixels is None:
                self._pixels = self.crops.pixels(device)
            return self._pixels
        return self.crops.pixels(device)

    def teacher_pixels(self, device) -> torch.Tensor | None:
        """Pixels at the live teacher's resolution, or None when it equals the student's."""
        return None if self.teacher_crops is None else self.teacher_crops.pixels(device)

    def pixels_at(self, res: int, device) -> torch.Tensor:
        """Pixels of the same views at ``res``: one of the live-teacher resolutions the loader renders
        (``teacher_res``), or the student's own. Any other resolution is an error."""
        if res in self.more_crops:
            return self.more_crops[res].pixels(device)
        px = self.pixels(device)
        if px.shape[-1] != res:
            raise KdcacheError(f"this batch is rendered at {px.shape[-1]} px (the student's) and at "
                               f"{sorted(self.more_crops) or 'no other resolution'}, not at {res} px: pass "
                               f"teacher_res={res} (or the list of a live ensemble's resolutions) to the ReplayLoader")
        return px

    def mixed(self) -> bool:
        return bool((self.crops.lam < 1).any())  # λ is 1.0 wherever a record is unmixed

    def label_targets(self, num_classes: int, device) -> torch.Tensor:
        """Hard labels (b,) when nothing is mixed, else soft labels λ·onehot(own) + (1−λ)·onehot(partner)."""
        a = self.label.to(device, non_blocking=True)
        if not self.mixed():
            return a
        b = self.label_other.to(device, non_blocking=True)
        lam = self.crops.lam.to(device, non_blocking=True).unsqueeze(1)
        soft = torch.zeros(len(self), num_classes, device=device)
        soft.scatter_(1, a.unsqueeze(1), lam)
        soft.scatter_add_(1, b.unsqueeze(1), 1.0 - lam)
        return soft

    def slice(self, lo: int, hi: int) -> "Batch":
        def s(t):
            return None if t is None else t[lo:hi]

        return Batch(
            crops=self.crops.slice(lo, hi), label=s(self.label), label_other=s(self.label_other),
            index=s(self.index), keys=self.keys[lo:hi], shards=self.shards[lo:hi], view=self.view,
            logprobs=s(self.logprobs), classes=s(self.classes), **teacher_fields(
                {r: c.slice(lo, hi) for r, c in self.more_crops.items()},
                None if self.teacher_crops is None else self.teacher_crops.slice(lo, hi)),
        )

    @staticmethod
    def cat(parts: list["Batch"]) -> "Batch":
        if len(parts) == 1:
            return parts[0]

        def c(f):
            ts = [getattr(p, f) for p in parts]
            return None if ts[0] is None else torch.cat(ts)

        return Batch(
            crops=parts[0].crops.cat([p.crops for p in parts]), label=c("label"), label_other=c("label_other"),
            index=c("index"), keys=[k for p in parts for k in p.keys], shards=[s for p in parts for s in p.shards],
            view=parts[0].view, logprobs=c("logprobs"), classes=c("classes"), **teacher_fields(
                {r: c0.cat([p.more_crops[r] for p in parts]) for r, c0 in parts[0].more_crops.items()},
                None if parts[0].teacher_crops is None else parts[0].teacher_crops.cat(
                    [p.teacher_crops for p in parts])),
        )


def teacher_sizes(teacher_res) -> list[int]:
    """The live-teacher resolutions a stream renders besides the student's: none, one, or a list."""
    if not teacher_res:
        return []
    return [int(teacher_res)] if isinstance(teacher_res, (int, np.integer)) else list(dict.fromkeys(teacher_res))


def teacher_fields(more: dict, first=None) -> dict:
    """A Batch's ``teacher_crops`` and ``more_crops`` from the crops at each teacher resolution
    (``first``: the single teacher crops of a batch made before ``more_crops`` existed)."""
    return {"teacher_crops": next(iter(more.values())) if more else first, "more_crops": more}


@dataclass(frozen=True)
class Binding:
    """Where and how a batch's pixels and targets are handed to a training loop."""

    device: torch.device
    mean: tuple
    std: tuple
    channels_last: bool = False
    kind: str = "topk"  # the cache's target kind
    tail: str = "uniform"  # the loss's default tail for these targets
    sample_temperature: float | None = None


@dataclass
class Skipped:
    """Stands for a chunk of ``n`` records a resumed epoch has already trained on."""

    n: int


# ---- epoch plan -------------------------------------------------------------------------


@dataclass
class EpochPlan:
    epoch: int
    view: int
    rank_shards: list[list[int]]  # shard indices per rank
    worker_shards: list[list[int]]  # this rank's shard indices per worker
    worker_counts: list[int]  # records per worker (this rank)
    rank_counts: list[int]
    steps: int
    batch_size: int

    @property
    def dropped(self) -> int:
        """Records (all ranks together) left out this epoch by step equalisation."""
        return sum(max(0, n - self.steps * self.batch_size) for n in self.rank_counts)

    def chunk_order(self) -> list[tuple[int, int]]:
        """(worker, records) of every chunk in the order DataLoader delivers them: round-robin
        over workers, an exhausted worker dropping out."""
        B = self.batch_size
        chunks = [[B] * (n // B) + ([n % B] if n % B else []) for n in self.worker_counts]
        out = []
        for j in range(max((len(c) for c in chunks), default=0)):
            for w, c in enumerate(chunks):
                if j < len(c):
                    out.append((w, c[j]))
        return out

    def skip_chunks(self, skip_batches: int) -> list[int]:
        """Per worker: how many of its leading chunks lie wholly inside the first ``skip_batches`` batches."""
        limit = skip_batches * self.batch_size
        skips = [0] * len(self.worker_counts)
        pos = 0
        for w, n in self.chunk_order():
            pos += n
            if pos <= limit:
                skips[w] += 1
        return skips


def fresh_seed(view_seed: int) -> int:
    """The seed of the student's fresh crops: never the cache's own view stream, even when the
    user's view seed equals the cache's seed."""
    return stable_seed("fresh student views", view_seed)


def _deal(order, counts, bins: int) -> list[list[int]]:
    """Deal items (in ``order``) to ``bins``, each to the bin holding fewest records so far."""
    out = [[] for _ in range(bins)]
    totals = [0] * bins
    for i in order:
        b = min(range(bins), key=lambda j: (totals[j], j))
        out[b].append(int(i))
        totals[b] += counts[i]
    return out


# ---- the stream ---------------------------------------------------------------------------


@dataclass
class StreamConfig:
    batch_size: int
    res: int  # student resolution
    seed: int = 0  # shard permutation and shuffle buffer
    cache: str | None = None  # views (and targets) from this cache
    storage_options: dict | None = None
    with_targets: bool = True  # ship the cached top-k (cached-KD mode)
    # Live teacher resolution(s) when they differ from ``res``: one, or a live ensemble's list.
    teacher_res: int | tuple | list | None = None
    views: int | None = None  # V without a cache (None: view index = epoch)
    view_seed: int = 0  # without a cache
    aug: AugSpec = field(default_factory=AugSpec)  # without a cache
    need_labels: bool = False
    num_classes: int | None = None  # checks cls < C
    skip_bad: bool = False  # without a cache: leave out the records ShardInfo.bad lists (found before training)
    worker_timeout: float = 600.0  # seconds to wait for a chunk from the workers (runtime.worker_items)
    check_digests: bool = True  # refuse cache views edited after precompute (store.view_digest)
    # With a cache: "cache" replays the view the teacher saw (consistent teaching); "fresh" draws the
    # student a new crop each epoch (seeded by view_seed, key and epoch; aug's ranges), the targets
    # still the cache's view e mod V (independent views; the fixed-teacher baseline with a
    # centre-crop cache).
    student_view: str = "cache"
    views_used: int | None = None  # with a cache: replay only its first N views (epoch e: view e mod N)
    shuffle_buffer: int = 1024
    rank: int = 0
    world: int = 1
    workers: int = 0


@dataclass
class _Shard:
    """One decoded shard and the one view each of its records gets this epoch."""

    name: str
    url: str
    keys: list[str]
    images: list
    labels: np.ndarray  # (N,) int64, -1 = none
    views: ShardViews  # one column: this epoch's view
    usable: np.ndarray  # record indices that take part
    logprobs: np.ndarray | None = None  # (N, k) cached targets of this view
    classes: np.ndarray | None = None


def _check_bad_unchanged(info: ShardInfo, keys: list[str], bad_now: dict[str, str]) -> None:
    """Without a cache, the records that fail to decode now must be those found before training
    (``info.bad``): the plan's counts and the mixup partners depend on them."""
    for k in keys:
        if k in bad_now and k not in info.bad:
            raise KdcacheError(
                f"cannot decode image {k!r} in shard {info.url} ({bad_now[k]}), but it decoded before training: "
                "the data changed during the run"
            )
        if k in info.bad and k not in bad_now:
            raise KdcacheError(
                f"image {k!r} in shard {info.url} could not be decoded before training ({info.bad[k]}) but decodes "
                "now: the data changed during the run"
            )


class ReplayStream(IterableDataset):
    """Replayed views of the training shards. Call ``set_epoch`` before iterating (or use ``epoch_batches``)."""

    def __init__(self, shards: list[ShardInfo], cfg: StreamConfig):
        if cfg.batch_size < 1:
            raise KdcacheError("--batch-size must be at least 1")
        self.shards, self.cfg = shards, cfg
        self.epoch, self._skips = 0, None
        self._reader = None
        self._cache_views = None
        self.renderer = renderer_for(None)
        if cfg.cache is not None:
            reader = CacheReader(cfg.cache, cfg.storage_options)
            self._cache_views = reader.views
            if cfg.views_used is not None:
                if not 1 <= cfg.views_used <= reader.views:
                    raise KdcacheError(f"--views-used {cfg.views_used}: cache {reader.path} holds {reader.views} views "
                                       f"per record; use 1..{reader.views}")
                self._cache_views = cfg.views_used  # the first N stored views, epoch e replays e mod N
            self.renderer = renderer_for(reader.manifest.get("render"))  # the backend that made the cache

    # -- plan --

    def view_index(self, epoch: int) -> int:
        if self._cache_views is not None:
            return epoch % self._cache_views
        return epoch if self.cfg.views is None else epoch % self.cfg.views

    @property
    def num_views(self) -> int | None:
        return self._cache_views if self._cache_views is not None else self.cfg.views

    def plan(self, epoch: int) -> EpochPlan:
        cfg = self.cfg
        counts = [s.count for s in self.shards]
        order = np.random.Generator(np.random.PCG64(stable_seed("shards", cfg.seed, epoch))).permutation(len(counts))
        ranks = _deal(order, counts, cfg.world)
        rank_counts = [sum(counts[i] for i in r) for r in ranks]
        if min(rank_counts) == 0:
            raise KdcacheError(
                f"{len(counts)} shards holding {sum(counts)} usable records cannot feed {cfg.world} ranks: "
                "a rank would get no data; use more (smaller) shards or fewer processes"
            )
        W = max(1, cfg.workers)
        mine = ranks[cfg.rank]
        workers = _deal(mine, counts, W)
        return EpochPlan(
            epoch=epoch, view=self.view_index(epoch), rank_shards=ranks, worker_shards=workers,
            worker_counts=[sum(counts[i] for i in w) for w in workers], rank_counts=rank_counts,
            steps=min(math.ceil(n / cfg.batch_size) for n in rank_counts), batch_size=cfg.batch_size,
        )

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> EpochPlan:
        plan = self.plan(epoch)
        self.epoch = epoch
        self._skips = plan.skip_chunks(skip_batches)
        return plan

    # -- worker side --

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        plan = self.plan(self.epoch)
        if nw != len(plan.worker_shards):
            raise RuntimeError(f"ReplayStream planned for {len(plan.worker_shards)} workers but runs in {nw}")
        skips = self._skips or [0] * nw
        return guarded(self._stream(plan, wid, skips[wid]))

    def _open_reader(self):
        if self._reader is None and self.cfg.cache is not None:
            self._reader = CacheReader(self.cfg.cache, self.cfg.storage_options, check_digests=self.cfg.check_digests)
            self._reader.load_index()  # remote: its groups' metadata from the index, not a read per group
        return self._reader

    def _load(self, info: ShardInfo, view: int, epoch: int = 0, rec=None) -> _Shard:
        """One shard's records for this epoch: its images decoded, and (with a cache) its view ``view``
        (``rec``, when read ahead by the caller) checked against them."""
        cfg = self.cfg
        reader = self._open_reader()
        d = decode_shard(info.url, skip_bad=reader is not None or cfg.skip_bad, renderer=self.renderer)
        keys, sizes, images, bad_decode, labels = d.keys, d.sizes, d.images, d.bad, d.labels
        n = len(keys)
        if reader is not None:
            rec = rec if rec is not None else reader.read_view(info.name, view)
            ckeys = [str(k) for k in rec.keys]
            if keys != ckeys:
                raise _key_mismatch(info.url, info.name, reader.path, keys, ckeys)
            bad = rec.bad
            valid = np.array([k not in bad for k in keys], dtype=bool)
            for i in np.flatnonzero(valid):
                if images[i] is None:
                    raise KdcacheError(
                        f"cannot decode image {keys[i]!r} in shard {info.url} ({bad_decode[keys[i]]}), but the cache "
                        "holds teacher outputs for it: the data changed since precompute"
                    )
                h, w = int(rec.size[i, 0]), int(rec.size[i, 1])
                if (int(sizes[i, 0]), int(sizes[i, 1])) != (h, w):
                    raise KdcacheError(
                        f"image {keys[i]!r} in shard {info.url} is {size_text(int(sizes[i, 1]), int(sizes[i, 0]))} but "
                        f"cache {reader.path} recorded {size_text(w, h)}: cache and data come from different datasets "
                        "(or the images changed since precompute)"
                    )
                if cfg.with_targets and int(rec.classes[i, 0]) < 0:
                    raise KdcacheError(f"cache group {info.name!r} has no teacher output for {keys[i]!r}; the store is damaged")
            if cfg.student_view == "fresh":  # the student's own crop; the targets stay the cache's view
                views = sample_shard_views(fresh_seed(cfg.view_seed), info.name, keys, sizes, [epoch], cfg.aug,
                                           valid=valid)
            else:
                views = ShardViews.single(rec.box, rec.flip, rec.mix_with, rec.mix_lam)
            logprobs = rec.logprobs if cfg.with_targets else None
            classes = rec.classes.astype(np.int64) if cfg.with_targets else None
        else:
            _check_bad_unchanged(info, keys, bad_decode)
            valid = np.array([k not in info.bad for k in keys], dtype=bool)
            views = sample_shard_views(cfg.view_seed, info.name, keys, sizes, [view], cfg.aug, valid=valid)
            logprobs = classes = None
        lab = np.full(n, -1, dtype=np.int64)
        for i in np.flatnonzero(valid):
            c = labels[i]
            if c is None:
                if cfg.need_labels:
                    raise KdcacheError(
                        f"sample {keys[i]!r} in shard {info.url} has no cls label, but training needs labels "
                        "(--label-weight > 0 or labels-only mode)"
                    )
                continue
            if c < 0 or (cfg.num_classes is not None and c >= cfg.num_classes):
                raise KdcacheError(
                    f"sample {keys[i]!r} in shard {info.url} has cls {c}, outside 0..{(cfg.num_classes or 1) - 1}"
                )
            lab[i] = c
        usable = np.flatnonzero(valid)
        if len(usable) != info.count:
            raise KdcacheError(
                f"shard {info.url} yields {len(usable)} usable records but {info.count} were planned; "
                "the data or the cache changed during the run"
            )
        return _Shard(name=info.name, url=info.url, keys=keys, images=images, labels=lab, views=views, usable=usable,
                      logprobs=logprobs, classes=classes)

    def _refs(self, plan: EpochPlan, wid: int):
        """(shard, record) references of this worker's stream, through the seeded shuffle buffer."""
        cfg = self.cfg
        rng = np.random.Generator(np.random.PCG64(stable_seed("shuffle", cfg.seed, plan.epoch, cfg.rank, wid)))
        size = max(0, int(cfg.shuffle_buffer))
        buf: list = []
        infos = [self.shards[si] for si in plan.worker_shards[wid]]
        reader = self._open_reader()
        # A remote cache's views are read ahead (their requests wait together); the images in turn.
        views = (reader.read_ahead([s.name for s in infos], lambda name: reader.read_view(name, plan.view))
                 if reader is not None else (None for _ in infos))
        for info, rec in zip(infos, views):
            shard = self._load(info, plan.view, plan.epoch, rec)
            for i in rng.permutation(shard.usable):
                if len(buf) < size:
                    buf.append((shard, int(i)))
                    continue
                if size == 0:
                    yield shard, int(i)
                    continue
                j = int(rng.integers(len(buf)))
                out, buf[j] = buf[j], (shard, int(i))
                yield out
            del shard
        for j in rng.permutation(len(buf)):
            yield buf[j]

    def _stream(self, plan: EpochPlan, wid: int, skip_chunks: int):
        B = self.cfg.batch_size
        skip_records = min(skip_chunks * B, plan.worker_counts[wid])
        builder = _ChunkBuilder(self.cfg, plan.view, self.renderer)
        pos = 0
        for shard, i in self._refs(plan, wid):
            if pos < skip_records:
                pos += 1
                if pos % B == 0 or pos == plan.worker_counts[wid]:
                    yield Skipped(B if pos % B == 0 else pos % B)
                continue
            pos += 1
            if builder.add(shard, i):
                yield builder.take()
        if len(builder):
            yield builder.take()


class _ChunkBuilder:
    """Renders references into a chunk of up to ``batch_size`` records."""

    def __init__(self, cfg: StreamConfig, view: int, renderer=None):
        self.cfg, self.viewi, self.renderer = cfg, view, renderer
        self._new()

    def _new(self):
        self.items: list = []

    def __len__(self):
        return len(self.items)

    def add(self, shard: _Shard, i: int) -> bool:
        self.items.append((shard, i))
        return len(self.items) == self.cfg.batch_size

    def take(self) -> Batch:
        cfg, items = self.cfg, self.items
        records = [(s.images, s.views, i, 0) for s, i in items]
        with_t = cfg.with_targets and items[0][0].logprobs is not None

        def stack(f):
            return torch.from_numpy(np.stack([np.asarray(getattr(s, f)[i]) for s, i in items]))

        out = Batch(
            crops=crop_batch(records, cfg.res, self.renderer),
            **teacher_fields({r: crop_batch(records, r, self.renderer) for r in teacher_sizes(cfg.teacher_res)}),
            label=torch.tensor([int(s.labels[i]) for s, i in items], dtype=torch.int64),
            label_other=torch.tensor([int(s.labels[s.views.mix_with[i, 0]]) if s.views.mix_with[i, 0] >= 0
                                      else int(s.labels[i]) for s, i in items], dtype=torch.int64),
            index=torch.tensor([i for _, i in items], dtype=torch.int64),
            keys=[s.keys[i] for s, i in items], shards=[s.name for s, _ in items], view=self.viewi,
            logprobs=stack("logprobs") if with_t else None,
            classes=stack("classes").to(torch.int64) if with_t else None,
        )
        self._new()
        return out



def epoch_batches(stream: ReplayStream, epoch: int, skip_batches: int = 0, pin_memory: bool = False,
                  prefetch_factor: int = 2):
    """The training batches of ``epoch`` for this rank, from batch ``skip_batches`` on.

    Exactly ``plan.steps - skip_batches`` batches of ``batch_size`` records (the last may be
    smaller). Raises ``KdcacheError`` for a user-facing problem met inside a worker.
    """
    plan = stream.set_epoch(epoch, skip_batches)
    W = stream.cfg.workers
    loader = DataLoader(
        stream, batch_size=None, num_workers=W, collate_fn=unbatched, pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if W else None, persistent_workers=False,
        worker_init_fn=worker_init if W else None,
        generator=torch.Generator().manual_seed(stable_seed("loader", stream.cfg.seed, epoch) % (1 << 62)),
        timeout=stream.cfg.worker_timeout if W else 0,
    )
    B = stream.cfg.batch_size
    to_drop = skip_batches * B
    want = plan.steps - skip_batches
    done = 0
    pending: list[Batch] = []
    have = 0
    it = iter(worker_items(loader, stream.cfg.worker_timeout))
    try:
        for item in it:
            if done >= want:
                break
            item = raise_if_error(item)
            if isinstance(item, Skipped):
                to_drop -= item.n
                continue
            if to_drop > 0:
                d = min(to_drop, len(item))
                to_drop -= d
                if d == len(item):
                    continue
                item = item.slice(d, len(item))
            pending.append(item)
            have += len(item)
            while have >= B and done < want:
                merged = Batch.cat(pending)
                yield merged.slice(0, B) if len(merged) > B else merged
                done += 1
                rest = merged.slice(B, len(merged)) if len(merged) > B else None
                pending, have = ([rest], len(rest)) if rest is not None else ([], 0)
        if done < want and have > 0:
            yield Batch.cat(pending)
            done += 1
    finally:
        del it
    if done < want:
        raise KdcacheError(f"epoch {epoch}: the stream ended after {done} of {want} batches; the data changed during the run")
