"""Seeded views: what crop, flip and mixup partner each (sample, view index) gets, and how to render it.

A *view* is pure geometry. It is drawn by a pure function of ``(seed, key, view index)`` so every
process, machine and worker count draws the same one, and it is also stored in the cache, so replay
never has to re-run a random generator.

- ``sample_shard_views`` is the one view sampler (crops, flips, mixup pairs, and the rule that a
  record whose partner has no image stays unmixed); ``ShardViews`` holds its arrays.
- ``render`` turns a decoded image plus a view into pixels; ``crop_batch`` renders many records
  (partners looked up in their shard) into a ``CropBatch`` of uint8 crops, and
  ``CropBatch.pixels``/``mix_pixels`` scale and mix them on the device. Precompute, train, verify
  and inspect all make pixels through these, with the backend (``render.py``: PIL or torch) that
  the cache records.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from ..errors import KdcacheError

# Bump when the sampling code changes in a way that changes the views drawn for the same inputs.
SAMPLER_VERSION = 1
# The resample filter used by render(); recorded in the manifest.
RESAMPLE = Image.Resampling.BILINEAR
RESAMPLE_NAME = "bilinear"


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


def crop_pixels(image: Image.Image, view: View, size: int) -> np.ndarray:
    """The crop of ``view`` resized to ``size``x``size`` (and flipped), as uint8 HWC RGB."""
    x, y, w, h = view.box
    out = image.resize((size, size), RESAMPLE, box=(x, y, x + w, y + h))
    if view.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(out, dtype=np.uint8)  # a writable copy, ready for torch.from_numpy


def crop_tensor(image: Image.Image, view: View, size: int) -> torch.Tensor:
    """``crop_pixels`` as a uint8 CHW tensor (what workers ship: 4x smaller than float)."""
    import torch

    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(crop_pixels(image, view, size)).permute(2, 0, 1)


def mix_pixels(own: torch.Tensor, other: torch.Tensor | None, lam) -> torch.Tensor:
    """uint8 crops → float32 pixels in [0, 1]: ``own/255·λ + other/255·(1 − λ)``.

    The one place where pixels are scaled and mixed, for a single image (CHW, float λ) or a batch
    (BCHW, λ of shape (B,)). Separate multiply and add kernels keep the result bit-identical
    between the two forms. ``other=None`` (or λ = 1 everywhere) leaves ``own`` unmixed.
    """
    import torch

    x = own.float().div_(255.0)
    if other is None:
        return x
    lam = torch.as_tensor(lam, dtype=torch.float32, device=x.device)
    if lam.dim() == 1:
        lam = lam.view(-1, 1, 1, 1)
    y = other.float().div_(255.0)
    return x.mul_(lam).add_(y.mul_(1.0 - lam))


def render_crops(
    image,
    view: View,
    size: int,
    partner=None,
    partner_view: View | None = None,
    renderer=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The uint8 crops a view needs: its own, and its partner's when mixed (else ``None``)."""
    from .render import PIL_RENDERER

    renderer = renderer or PIL_RENDERER
    own = renderer.crops([(image, view)], size)[0]
    if not view.mixed:
        return own, None
    if partner is None or partner_view is None:
        raise ValueError("a mixed view needs its partner's image and view to render")
    return own, renderer.crops([(partner, partner_view)], size)[0]


def render(
    image,
    view: View,
    size: int,
    partner=None,
    partner_view: View | None = None,
    renderer=None,
) -> torch.Tensor:
    """The pixels a model sees for ``view``: float32 CHW in [0, 1], not yet normalised.

    For a mixed view, pass the partner record's decoded image and *its* view of the same view
    index; the result is ``λ·own + (1 − λ)·partner`` with λ = ``view.mix_lam``. ``renderer``: the
    backend (default PIL; the images must be that backend's decoded images).
    """
    own, other = render_crops(image, view, size, partner, partner_view, renderer)
    return mix_pixels(own, other, view.mix_lam)


@dataclass
class CropBatch:
    """Rendered records as uint8 crops, the form workers ship (4x smaller than float pixels).

    ``other`` holds the partners' crops (zeros where a record is unmixed) and is ``None`` when no
    record of the batch is mixed; ``lam`` is each record's own weight (1.0 where unmixed).
    """

    own: torch.Tensor  # (b, 3, R, R) uint8
    other: torch.Tensor | None  # (b, 3, R, R) uint8
    lam: torch.Tensor  # (b,) float32

    def __len__(self) -> int:
        return len(self.own)

    def pixels(self, device) -> torch.Tensor:
        """Float32 pixels in [0, 1] on ``device``: ``mix_pixels`` there (the device does the mixing)."""
        own = self.own.to(device, non_blocking=True)
        if self.other is None:
            return mix_pixels(own, None, None)
        return mix_pixels(own, self.other.to(device, non_blocking=True), self.lam.to(device, non_blocking=True))

    def slice(self, lo: int, hi: int) -> "CropBatch":
        return CropBatch(self.own[lo:hi], None if self.other is None else self.other[lo:hi], self.lam[lo:hi])

    def pin_memory(self) -> "CropBatch":
        return CropBatch(self.own.pin_memory(), None if self.other is None else self.other.pin_memory(),
                         self.lam.pin_memory())

    @staticmethod
    def cat(parts: list["CropBatch"]) -> "CropBatch":
        import torch

        others = [p.other for p in parts]
        if all(o is None for o in others):
            other = None
        else:  # unmixed parts contribute zero partner crops
            other = torch.cat([o if o is not None else torch.zeros_like(p.own) for o, p in zip(others, parts)])
        return CropBatch(torch.cat([p.own for p in parts]), other, torch.cat([p.lam for p in parts]))


def crop_batch(records, size: int, renderer=None):
    """Render records into one ``CropBatch`` at ``size``: each record is ``(images, views, i, j)``,
    the decoded images of its shard (indexed by record), the shard's ``ShardViews``, the record's
    index and the view column. The partner of a mixed record is looked up in the same shard, with
    its view of the same column. Every path that makes pixels (precompute, the trainer, verify,
    inspect's render) comes through here or ``render``, so they all make the same pixels.

    ``renderer`` is the backend (default: PIL, ``PIL_RENDERER``). Images the renderer has not decoded
    yet (``Encoded``: a renderer that decodes on the GPU, in a DataLoader worker) give a
    ``DeferredCrops``, which decodes and crops on the device when its pixels are asked for."""
    import torch

    from .render import PIL_RENDERER, DeferredCrops, Encoded

    renderer = renderer or PIL_RENDERER
    b = len(records)
    own_items, other_items, other_rows = [], [], []
    lam = torch.ones(b, dtype=torch.float32)
    for n, (images, views, i, j) in enumerate(records):
        view = views.view(i, j)
        own_items.append((images[i], view))
        if view.mixed:
            partner = images[view.mix_with]
            if partner is None:
                raise ValueError("a mixed view needs its partner's image and view to render")
            other_items.append((partner, views.view(view.mix_with, j)))
            other_rows.append(n)
            lam[n] = float(view.mix_lam)
    if any(isinstance(im, Encoded) for im, _ in own_items + other_items):
        return DeferredCrops(renderer, size, own_items, other_items, other_rows, lam)
    return _assemble(renderer, size, own_items, other_items, other_rows, lam)


def _assemble(renderer, size, own_items, other_items, other_rows, lam) -> CropBatch:
    import torch

    own = renderer.crops(own_items, size)
    other = None
    if other_items:
        other = torch.zeros_like(own)
        other[torch.as_tensor(other_rows, device=own.device)] = renderer.crops(other_items, size)
    return CropBatch(own, other, lam)
