"""Seeded views: what crop, flip and mixup partner each (sample, view index) gets, and how to render it.

A *view* is pure geometry. It is drawn by a pure function of ``(seed, key, view index)`` so every
process, machine and worker count draws the same one, and it is also stored in the cache, so replay
never has to re-run a random generator. ``render`` is the single function that turns a decoded
image plus a view into pixels; precompute, train and verify all call it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image

# Bump when the sampling code changes in a way that changes the views drawn for the same inputs.
SAMPLER_VERSION = 1
# The resample filter used by render(); recorded in the manifest.
RESAMPLE = Image.Resampling.BILINEAR
RESAMPLE_NAME = "bilinear"


def render_backend() -> dict:
    """Which PIL renders views: flavour (Pillow or Pillow-SIMD), version and resample filter.

    Pillow and Pillow-SIMD resample slightly differently, so the manifest records this.
    """
    import importlib.metadata as md

    import PIL

    flavour = "Pillow"
    try:
        if md.version("Pillow-SIMD") == PIL.__version__:
            flavour = "Pillow-SIMD"
    except md.PackageNotFoundError:
        pass
    return {"pil": flavour, "pil_version": PIL.__version__, "resample": RESAMPLE_NAME}


@dataclass(frozen=True)
class AugSpec:
    """The augmentation recipe: Inception-style crop ranges, flip and mixup switches."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    mixup: bool = False
    name: str = field(default="inception_crop", compare=True)
    version: int = SAMPLER_VERSION

    def __post_init__(self):
        lo, hi = self.scale
        if not (0 < lo <= hi <= 1):
            raise ValueError(f"scale range must satisfy 0 < min <= max <= 1, got {self.scale}")
        lo, hi = self.ratio
        if not (0 < lo <= hi):
            raise ValueError(f"ratio range must satisfy 0 < min <= max, got {self.ratio}")

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
    """The views of every record of one shard, as the arrays the store keeps."""

    box: np.ndarray  # (N, V, 4) int64: x, y, w, h
    flip: np.ndarray  # (N, V) bool
    mix_with: np.ndarray  # (N, V) int32
    mix_lam: np.ndarray  # (N, V) float16

    def view(self, i: int, v: int) -> View:
        x, y, w, h = (int(t) for t in self.box[i, v])
        return View(x, y, w, h, bool(self.flip[i, v]), int(self.mix_with[i, v]), float(self.mix_lam[i, v]))


def sample_shard_views(seed: int, shard: str, keys, sizes, num_views: int, spec: AugSpec) -> ShardViews:
    """All views of a shard: ``keys`` in tar order, ``sizes`` as (height, width) per record."""
    n = len(keys)
    box = np.zeros((n, num_views, 4), dtype=np.int64)
    flip = np.zeros((n, num_views), dtype=bool)
    for i, (key, (height, width)) in enumerate(zip(keys, sizes)):
        for v in range(num_views):
            vw = sample_view(seed, key, v, int(width), int(height), spec)
            box[i, v] = vw.box
            flip[i, v] = vw.flip
    mix_with = np.full((n, num_views), -1, dtype=np.int32)
    mix_lam = np.ones((n, num_views), dtype=np.float16)
    if spec.mixup and n > 1:
        for v in range(num_views):
            mix_with[:, v], mix_lam[:, v] = mixup_pairs(seed, shard, v, n)
    return ShardViews(box, flip, mix_with, mix_lam)


def crop_pixels(image: Image.Image, view: View, size: int) -> np.ndarray:
    """The crop of ``view`` resized to ``size``x``size`` (and flipped), as uint8 HWC RGB."""
    x, y, w, h = view.box
    out = image.resize((size, size), RESAMPLE, box=(x, y, x + w, y + h))
    if view.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(out, dtype=np.uint8)  # a writable copy, ready for torch.from_numpy


def crop_tensor(image: Image.Image, view: View, size: int) -> torch.Tensor:
    """``crop_pixels`` as a uint8 CHW tensor (what workers ship: 4x smaller than float)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(crop_pixels(image, view, size)).permute(2, 0, 1)


def mix_pixels(own: torch.Tensor, other: torch.Tensor | None, lam) -> torch.Tensor:
    """uint8 crops → float32 pixels in [0, 1]: ``own/255·λ + other/255·(1 − λ)``.

    The one place where pixels are scaled and mixed, for a single image (CHW, float λ) or a batch
    (BCHW, λ of shape (B,)). Separate multiply and add kernels keep the result bit-identical
    between the two forms. ``other=None`` (or λ = 1 everywhere) leaves ``own`` unmixed.
    """
    x = own.float().div_(255.0)
    if other is None:
        return x
    lam = torch.as_tensor(lam, dtype=torch.float32, device=x.device)
    if lam.dim() == 1:
        lam = lam.view(-1, 1, 1, 1)
    y = other.float().div_(255.0)
    return x.mul_(lam).add_(y.mul_(1.0 - lam))


def render_crops(
    image: Image.Image,
    view: View,
    size: int,
    partner: Image.Image | None = None,
    partner_view: View | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The uint8 crops a view needs: its own, and its partner's when mixed (else ``None``)."""
    own = crop_tensor(image, view, size)
    if not view.mixed:
        return own, None
    if partner is None or partner_view is None:
        raise ValueError("a mixed view needs its partner's image and view to render")
    return own, crop_tensor(partner, partner_view, size)


def render(
    image: Image.Image,
    view: View,
    size: int,
    partner: Image.Image | None = None,
    partner_view: View | None = None,
) -> torch.Tensor:
    """The pixels a model sees for ``view``: float32 CHW in [0, 1], not yet normalised.

    For a mixed view, pass the partner record's decoded image and *its* view of the same view
    index; the result is ``λ·own + (1 − λ)·partner`` with λ = ``view.mix_lam``.
    """
    own, other = render_crops(image, view, size, partner, partner_view)
    return mix_pixels(own, other, view.mix_lam)
