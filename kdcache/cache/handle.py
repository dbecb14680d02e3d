"""``open_cache``: a read-only handle on a cache, for code outside kdcache's commands.

The handle answers what a cache is (teacher, classes, V, k, target kind, layout, seed,
resolution, shards) from its manifest, and reads one record's view: its crop box, flip, mixup
partner, and the teacher's targets for it, decoded whatever the layout. Every read goes through
``store.CacheReader``, so the same integrity checks apply (a damaged group or an edited view is an
error naming it).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np

from ..errors import KdcacheError
from .store import CacheReader, members_of


@dataclass(frozen=True)
class Record:
    """One record's view as the cache holds it.

    ``box`` is (x, y, w, h) in source pixels, ``size`` the source image's (height, width); a mixed
    view names its partner (``mix_with``, the partner's index in the shard; -1 = unmixed) and the
    own image's weight ``mix_lam``. ``classes``/``logprobs``: the teacher's top-k log-probabilities
    at T = 1, descending (``kind="topk"``), or the drawn classes with ``log(count / N)``
    (``kind="sample"``; ``counts`` holds the counts, unused slots are class -1)."""

    shard: str
    key: str
    index: int
    view: int
    size: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool
    mix_with: int
    mix_lam: float
    classes: np.ndarray
    logprobs: np.ndarray
    kind: str
    counts: np.ndarray | None = None


class Cache:
    """A read-only handle on a kdcache cache (``open_cache``)."""

    def __init__(self, reader: CacheReader):
        self.reader = reader
        self._keys: dict[str, list[str]] = {}

    @property
    def path(self) -> str:
        return self.reader.path

    @property
    def manifest(self) -> dict:
        """The whole manifest, as stored (a copy)."""
        import copy

        return copy.deepcopy(self.reader.manifest)

    @property
    def teacher(self) -> dict:
        """Spec, weights hash, class count and input normalisation of the teacher that made the cache."""
        return dict(self.reader.manifest["teacher"])

    @property
    def members(self) -> list[dict]:
        """The teacher as a list of members, each with its ``resolution``: an ensemble's in
        ``--teacher`` order, one entry for a single teacher."""
        return members_of(self.reader.manifest["teacher"], self.resolution)

    @property
    def num_classes(self) -> int:
        return self.reader.num_classes

    @property
    def class_names(self) -> list[str] | None:
        return self.reader.class_names

    @property
    def views(self) -> int:
        """V: views per record; epoch e of training replays view e mod V."""
        return self.reader.views

    @property
    def topk(self) -> int:
        return self.reader.topk

    @property
    def kind(self) -> str:
        """``"topk"`` or ``"sample"`` (classes drawn from the teacher)."""
        return self.reader.kind

    @property
    def samples(self) -> int | None:
        return self.reader.samples

    @property
    def layout(self) -> str:
        """``"plain"`` or ``"compact"``."""
        return self.reader.layout

    @property
    def seed(self) -> int:
        return int(self.reader.manifest["seed"])

    @property
    def resolution(self) -> int:
        """The teacher's input resolution (pixels, square)."""
        return int(self.reader.manifest["resolution"])

    @property
    def augmentation(self) -> dict:
        return dict(self.reader.manifest["augmentation"])

    @property
    def shards(self) -> list[str]:
        """The cache's complete shard groups (named after the source shards' file stems)."""
        return [s for s in self.reader.shard_names() if self.reader.is_complete(s)]

    def keys(self, shard: str) -> list[str]:
        """The record keys of ``shard``, in tar order."""
        if shard not in self._keys:
            self.reader.check_shard(shard)
            self._keys[shard] = [str(k) for k in self.reader.keys(shard)]
        return self._keys[shard]

    def find(self, key: str) -> str:
        """The shard that holds ``key`` (reads every shard's keys once)."""
        for shard in self.shards:
            if key in self.keys(shard):
                return shard
        close = difflib.get_close_matches(key, [k for s in self.shards for k in self.keys(s)], n=5)
        raise KdcacheError(f"cache {self.path} holds no record {key!r}"
                           + (f"; close ones: {', '.join(close)}" if close else ""))

    def record(self, key: str, view: int, shard: str | None = None) -> Record:
        """View ``view`` of record ``key`` (``shard`` saves looking it up)."""
        shard = shard or self.find(key)
        keys = self.keys(shard)
        try:
            i = keys.index(key)
        except ValueError:
            raise KdcacheError(f"shard {shard!r} of cache {self.path} holds no record {key!r}") from None
        rec = self.reader.read_view(shard, view)
        if key in rec.bad:
            raise KdcacheError(f"record {key!r} of shard {shard!r} has no teacher output: its image could not be "
                               "decoded when the cache was made (the cache records it as bad)")
        return Record(
            shard=shard, key=key, index=i, view=view, size=(int(rec.size[i, 0]), int(rec.size[i, 1])),
            box=tuple(int(t) for t in rec.box[i]), flip=bool(rec.flip[i]), mix_with=int(rec.mix_with[i]),
            mix_lam=float(rec.mix_lam[i]), classes=np.asarray(rec.classes[i]), logprobs=np.asarray(rec.logprobs[i]),
            kind=self.kind, counts=None if rec.counts is None else np.asarray(rec.counts[i]))

    def __repr__(self) -> str:
        specs = [m.get("spec") for m in self.members]
        teacher = f"teacher {specs[0]}" if len(specs) == 1 else f"ensemble of {len(specs)} ({', '.join(specs)})"
        what = f"top-{self.topk}" if self.kind == "topk" else f"{self.samples} draws"
        return (f"Cache({self.path!r}: {teacher}, {self.num_classes} classes, {self.views} views, "
                f"{what}, {self.layout}, {self.resolution}px, seed {self.seed})")


def open_cache(path: str, storage_options: dict | None = None) -> Cache:
    """A read-only handle on the cache at ``path`` (a local directory or an fsspec URL such as
    ``s3://bucket/cache.zarr``; ``storage_options`` go to fsspec). The format is validated on open."""
    return Cache(CacheReader(str(path), storage_options))
