"""Seeded views: what crop, flip and mixup partner each (sample, view index) gets. Pure geometry (numpy).

A *view* is pure geometry. It is drawn by a pure function of ``(seed, key, view index)`` so every
process, machine and worker count draws the same one, and it is also stored in the cache, so replay
never has to re-run a random generator.

- ``sample_shard_views`` is the one view sampler (crops, flips, mixup pairs, and the rule that a
  record whose partner has no image stays unmixed); ``ShardViews`` holds its arrays.

Pixels are ``render.py``'s: it turns a decoded image plus a ``View`` into the crops every stage uses.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import KdcacheError

# Bump when the sampling code changes in a way that changes the views drawn for the same inputs.
SAMPLER_VERSION = 1


class AugSpecError(KdcacheError, ValueError):
    """An augmentation range that cannot be sampled."""


AUG_NAMES = ("inception_crop", "center_crop")


@dataclass(frozen=True)
class AugSpec:
    """The augmentation recipe: Inception-style crop ranges, flip and mixup switches.

    ``name="center_crop"`` is the evaluation view instead: the centre square of side
    0.875·min(h, w) (``center_view``), never flipped; a cache of it (``precompute --center-crop``)
    holds one fixed teacher output per image, the fixed-teacher baseline."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    mixup: bool = False
    name: str = field(default="inception_crop", compare=True)
    version: int = SAMPLER_VERSION

    def __post_init__(self):
        if self.name not in AUG_NAMES:
            raise AugSpecError(f"unknown augmentation {self.name!r}; kdcache draws {', '.join(AUG_NAMES)}")
        if self.name == "center_crop" and (self.flip or self.mixup):
            raise AugSpecError("the centre crop is the evaluation view: it takes neither --flip nor --mixup")
        lo, hi = self.scale
        if not (0 < lo <= hi <= 1):
            raise AugSpecError(f"invalid --scale/--ratio: scale range must satisfy 0 < min <= max <= 1, got {self.scale}")
        lo, hi = self.ratio
        if not (0 < lo <= hi):
            raise AugSpecError(f"invalid --scale/--ratio: ratio range must satisfy 0 < min <= max, got {self.ratio}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AugSpec":
        return cls(
            scale=tuple(d["scale"]),
            ratio=tuple(d["ratio"]),
            flip=bool(d["flip"]),
            mixup=bool(d["mixup"]),
            name=d.get("name", "inception_crop"),
            version=int(d.get("version", SAMPLER_VERSION)),
        )


@dataclass(frozen=True)
class View:
    """One view of one image: crop box in source pixels, flip, and optional mixup partner."""

    x: int
    y: int
    w: int
    h: int
    flip: bool = False
    mix_with: int = -1  # partner's index in the same shard; -1 = not mixed
    mix_lam: float = 1.0  # weight of this record's own image

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x, self.y, self.w, self.h)

    @property
    def mixed(self) -> bool:
        return self.mix_with >= 0


def stable_seed(*parts) -> int:
    """A 64-bit integer from a stable hash of ``parts`` (same on every machine and process)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(str(p).encode("utf-8"))
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "little")


def view_rng(seed: int, key: str, view: int) -> np.random.Generator:
    """The generator that draws view ``view`` of sample ``key``."""
    return np.random.Generator(np.random.PCG64(stable_seed("view", seed, key, view)))


def sample_crop(rng: np.random.Generator, width: int, height: int, spec: AugSpec):
    """An Inception-style crop (x, y, w, h): 10 random tries, then a center crop (torchvision's rule)."""
    area = width * height
    log_ratio = (math.log(spec.ratio[0]), math.log(spec.ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(spec.scale[0], spec.scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            return x, y, w, h
    # Fallback: the largest center crop whose aspect ratio is inside the range.
    in_ratio = width / height
    if in_ratio < spec.ratio[0]:
        w, h = width, int(round(width / spec.ratio[0]))
    elif in_ratio > spec.ratio[1]:
        h, w = height, int(round(height * spec.ratio[1]))
    else:
        w, h = width, height
    w, h = max(1, min(w, width)), max(1, min(h, height))
    return (width - w) // 2, (height - h) // 2, w, h


def sample_view(seed: int, key: str, view: int, width: int, height: int, spec: AugSpec) -> View:
    """Draw the crop and flip of one (sample, view). Mixup is decided per shard: see ``mixup_pairs``."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image {key!r} has an empty size {width}x{height}")
    if spec.name == "center_crop":
        return center_view(width, height)
    rng = view_rng(seed, key, view)
    x, y, w, h = sample_crop(rng, width, height, spec)
    flip = bool(rng.random() < 0.5) if spec.flip else False
    return View(x, y, w, h, flip)


def mixup_pairs(seed: int, shard: str, view: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pair the ``n`` records of one shard for one view.

    A seeded permutation is cut into consecutive pairs; with an odd ``n`` the last record of the
    permutation stays unmixed. Both records of a pair share u ~ U(0, 1) and each keeps its own image
    dominant: λ = max(u, 1 − u). λ is rounded to float16 here, because that is what the store keeps,
    so precompute and replay mix with the very same number.

    Returns ``mix_with`` (int32, partner index or -1) and ``mix_lam`` (float16).
    """
    rng = np.random.Generator(np.random.PCG64(stable_seed("mixup", seed, shard, view)))
    perm = rng.permutation(n)
    mix_with = np.full(n, -1, dtype=np.int32)
    mix_lam = np.ones(n, dtype=np.float16)
    n_pairs = n // 2
    u = rng.random(n_pairs)
    lam = np.maximum(u, 1.0 - u).astype(np.float16)
    a, b = perm[0 : 2 * n_pairs : 2], perm[1 : 2 * n_pairs : 2]
    mix_with[a], mix_with[b] = b, a
    mix_lam[a], mix_lam[b] = lam, lam
    return mix_with, mix_lam


@dataclass
class ShardViews:
    """Views of every record of one shard, as the arrays the store keeps: one column per view.

    ``view(i, j)`` is the one place arrays turn back into a ``View``.
    """

    box: np.ndarray  # (N, V, 4) int: x, y, w, h
    flip: np.ndarray  # (N, V) bool
    mix_with: np.ndarray  # (N, V) int32
    mix_lam: np.ndarray  # (N, V) float16

    def view(self, i: int, j: int) -> View:
        x, y, w, h = (int(t) for t in self.box[i, j])
        return View(x, y, w, h, bool(self.flip[i, j]), int(self.mix_with[i, j]), float(self.mix_lam[i, j]))

    @classmethod
    def single(cls, box, flip, mix_with, mix_lam) -> "ShardViews":
        """One view of every record ((N, 4), (N,), (N,), (N,) arrays) as a one-column ShardViews."""
        return cls(np.asarray(box)[:, None], np.asarray(flip)[:, None], np.asarray(mix_with)[:, None],
                   np.asarray(mix_lam)[:, None])


def sample_shard_views(seed: int, shard: str, keys, sizes, views, spec: AugSpec, valid=None) -> ShardViews:
    """The views of a shard's records: ``keys`` in tar order, ``sizes`` as (height, width) per record.

    ``views`` is V (view indices 0..V-1) or a sequence of view indices, one column each (the
    trainer without a cache draws only the epoch's). ``valid`` marks the records that have an image
    (default: all). A record without one gets no view (a zero box, no flip, unmixed), and the
    record it would have been mixed with stays unmixed (λ = 1): its partner has no pixels. This is
    the one view sampler: precompute, the trainer (without a cache) and verify all call it.
    """
    n = len(keys)
    index = list(range(views)) if isinstance(views, (int, np.integer)) else [int(v) for v in views]
    valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    box = np.zeros((n, len(index), 4), dtype=np.int64)
    flip = np.zeros((n, len(index)), dtype=bool)
    for i in np.flatnonzero(valid):
        height, width = (int(t) for t in sizes[i])
        for j, v in enumerate(index):
            vw = sample_view(seed, keys[i], v, width, height, spec)
            box[i, j] = vw.box
            flip[i, j] = vw.flip
    mix_with = np.full((n, len(index)), -1, dtype=np.int32)
    mix_lam = np.ones((n, len(index)), dtype=np.float16)
    if spec.mixup and n > 1:
        for j, v in enumerate(index):
            mix_with[:, j], mix_lam[:, j] = mixup_pairs(seed, shard, v, n)
    sv = ShardViews(box, flip, mix_with, mix_lam)
    drop_records(sv, np.flatnonzero(~valid))
    return sv


def drop_records(sv: ShardViews, rows) -> None:
    """Take records ``rows`` out of ``sv`` in place: no view (a zero box, no flip), unmixed, and the
    records they were mixed with unmixed too (their partner has no pixels). Drawing with a record
    invalid and dropping it after drawing give the same views (a record's own draw depends on
    nothing else), so a renderer that finds an undecodable image only on the device can drop it then."""
    for i in (int(r) for r in rows):
        sv.box[i], sv.flip[i] = 0, False
        partners = sv.mix_with[i][sv.mix_with[i] >= 0]
        cols = np.flatnonzero(sv.mix_with[i] >= 0)
        sv.mix_with[partners, cols], sv.mix_lam[partners, cols] = -1, 1.0
        sv.mix_with[i], sv.mix_lam[i] = -1, 1.0


def center_view(width: int, height: int, crop_fraction: float = 0.875) -> View:
    """The centre square of side ``crop_fraction·min(h, w)``: resized to R it is the classic
    'resize the shorter side to R/0.875, centre-crop R' (to the nearest source pixel)."""
    side = max(1, min(int(round(min(width, height) * crop_fraction)), width, height))
    return View((width - side) // 2, (height - side) // 2, side, side)
