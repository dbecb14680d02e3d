"""The demo's data set: scikit-learn's bundled handwritten digits as real JPEG shards.

The 1,797 scans are 8x8 grey levels. Each becomes an RGB picture of a few dozen pixels (varied
sizes, a tinted background and ink colour, slight offset) encoded as JPEG, and the lot is written
as train/val WebDataset shards with ``cls`` labels through the same code as ``kdcache pack``.
Nothing is downloaded: the scans ship inside scikit-learn.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.shards import Sample, write_dataset

CLASSES = [str(d) for d in range(10)]


def digit_picture(scan: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """An 8x8 scan (values 0..16) → an RGB picture 36–56 px wide, ink on a tinted background."""
    side = int(rng.integers(36, 57))
    pad = int(rng.integers(2, 7))
    ink = Image.fromarray((scan / 16.0 * 255).astype(np.uint8), "L").resize(
        (side - 2 * pad, side - 2 * pad), Image.Resampling.BICUBIC
    )
    alpha = np.zeros((side, side), dtype=np.float32)
    dx, dy = (int(v) for v in rng.integers(0, 2 * pad + 1, size=2))
    dx, dy = min(dx, 2 * pad), min(dy, 2 * pad)
    alpha[dy : dy + ink.height, dx : dx + ink.width] = np.asarray(ink, dtype=np.float32) / 255.0
    background = rng.uniform(150, 255, size=3)
    colour = rng.uniform(0, 90, size=3)
    noise = rng.normal(0, 6, size=(side, side, 3))
    pixels = background * (1 - alpha[..., None]) + colour * alpha[..., None] + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(im: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def build_digits_dataset(
    out: str | Path, shard_size: int = 250, val_fraction: float = 1 / 6, seed: int = 0, limit: int | None = None
) -> dict:
    """Write ``out/train/*.tar`` and ``out/val/*.tar`` (+ classes.json) from the digits scans."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    scans, labels = digits.images, digits.target
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(scans))
    if limit is not None:
        order = order[:limit]
    n_val = int(round(len(order) * val_fraction))
    splits = {"val": order[:n_val], "train": order[n_val:]}

    def samples(indices, split):
        for i in indices:
            pic = digit_picture(scans[i], np.random.default_rng([seed, int(i)]))
            yield Sample(f"digit_{int(i):04d}", jpeg_bytes(pic), "jpg", int(labels[i]), f"sklearn-digits/{split}")

    return write_dataset(out, samples(splits["train"], "train"), samples(splits["val"], "val"), CLASSES, shard_size)
