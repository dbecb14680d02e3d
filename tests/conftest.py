"""Shared fixtures: small real datasets (JPEG and PNG of varied sizes in WebDataset shards), a tiny
teacher with saved weights, and a precomputed cache. Everything is generated on disk per session."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

os.environ.setdefault("TRITON_INTERPRET", "1")

NUM_CLASSES = 5


def snapshot(root) -> dict:
    """Every file under ``root``: size, mtime and content hash."""
    out = {}
    for dp, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dp, f)
            st = os.stat(p)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(fh.read()).hexdigest())
    return out


def stored(path) -> dict:
    """Everything a cache stores, as stored: the manifest, and per group its attributes and each
    array's dtype, shape and raw bytes (read with plain zarr): two caches equal bit for bit compare equal."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    out = {"manifest": dict(root.attrs["kdcache"])}
    for name, g in sorted(root.groups()):
        arrays = {a: (str(arr.dtype), arr.shape, np.ascontiguousarray(arr[...]).tobytes()) for a, arr in g.arrays()}
        out[name] = {"attrs": dict(g.attrs), "arrays": arrays}
    return out


def cli_in_process(*args):
    """The command line in this process: (exit code, output). A traceback fails the test."""
    from click.testing import CliRunner

    from kdcache.cli import cli

    res = CliRunner().invoke(cli, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def error_lines(out: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("error: ")]


def make_image(rng: np.random.Generator, width: int, height: int, cls: int) -> Image.Image:
    """A real picture with class-dependent structure (so a teacher can learn something)."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([
        128 + 100 * np.sin(xx / (3 + cls) + cls),
        128 + 100 * np.cos(yy / (4 + cls)),
        (xx * (cls + 1) + yy) % 256,
    ], axis=-1)
    noise = rng.normal(0, 12, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def encode(im: Image.Image, ext: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format={"jpg": "JPEG", "png": "PNG"}[ext], **({"quality": 90} if ext == "jpg" else {}))
    return buf.getvalue()


def write_dataset(root: Path, shards: int = 3, per_shard: int = 7, seed: int = 0, prefix: str = "train") -> list[str]:
    """Shards of JPEG and PNG images of varied sizes with cls labels, plus classes.json."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        path = root / f"{prefix}-{s:06d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i in range(per_shard):
                cls = int(rng.integers(NUM_CLASSES))
                width, height = int(rng.integers(24, 64)), int(rng.integers(24, 64))
                ext = "png" if (s + i) % 3 == 0 else "jpg"
                im = make_image(rng, width, height, cls)
                w.write({"__key__": f"{prefix}{s}_{i:04d}", ext: encode(im, ext), "cls": str(cls).encode()})
        paths.append(str(path))
    with open(root / "classes.json", "w") as f:
        json.dump([f"class_{c}" for c in range(NUM_CLASSES)], f)
    return paths


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """3 train shards x 7 samples (varied sizes, JPEG+PNG, cls labels) + classes.json."""
    root = tmp_path_factory.mktemp("data") / "train"
    write_dataset(root)
    return root


@pytest.fixture(scope="session")
def teacher_weights(tmp_path_factory) -> Path:
    """A tiny teacher's weights file (a real state dict on disk)."""
    from kdcache.models.zoo import tiny_cnn

    torch.manual_seed(0)
    model = tiny_cnn(NUM_CLASSES)
    path = tmp_path_factory.mktemp("weights") / "teacher.pt"
    torch.save(model.state_dict(), path)
    return path


TEACHER = "py:kdcache.models.zoo:tiny_cnn"


def sharp_teacher(seed: int, scale: float = 40.0, num_classes: int = NUM_CLASSES):
    """A confident tiny teacher: tiny_cnn from ``seed`` with its head scaled by ``scale``, so its
    outputs spread over classes and its top-k reacts to small pixel changes."""
    from kdcache.models.zoo import tiny_cnn

    torch.manual_seed(seed)
    model = tiny_cnn(num_classes)
    with torch.no_grad():
        model.head.weight.mul_(scale)
    return model


def with_aug(kw: dict, **defaults) -> dict:
    """Config keywords with the augmentation flags (scale, ratio, flip, mixup) gathered into one AugSpec."""
    from kdcache.data.views import AugSpec

    parts = {k: kw.pop(k) for k in ("scale", "ratio", "flip", "mixup") if k in kw}
    if "aug" not in kw:
        kw["aug"] = AugSpec(**{**defaults, **parts})
    return kw


def precompute_config(data, out, weights, **kw):
    from kdcache.tools.precompute import PrecomputeConfig

    base = dict(
        data=str(data), teacher=TEACHER, teacher_weights=str(weights), num_classes=NUM_CLASSES, out=str(out), views=3, topk=3,
        seed=7, res=32, batch_size=8, workers=0, device="cpu", progress=False,
    )
    base.update(kw)
    return PrecomputeConfig(**with_aug(base, mixup=True))


@pytest.fixture(scope="session")
def cache(dataset, teacher_weights, tmp_path_factory) -> Path:
    """A precomputed cache of ``dataset`` (V=3, k=3, mixup on, res 32)."""
    from kdcache.tools.precompute import precompute

    out = tmp_path_factory.mktemp("cache") / "cache.zarr"
    precompute(precompute_config(dataset, out, teacher_weights))
    return out


# ---- helpers for the precompute-stage tests (views, shards, store, models, precompute) ----------


def write_tar(path: Path, members) -> str:
    """A tar holding ``members`` exactly as given: (name, bytes) pairs, in order (duplicates allowed)."""
    import tarfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return str(path)


def write_imagefolder(root: Path, per_class=(6, 5, 4), seed: int = 0) -> dict[str, bytes]:
    """An ImageFolder tree root/<class>/<image> of real JPEG and PNG files; returns {relative path: bytes}."""
    rng = np.random.default_rng(seed)
    files = {}
    for c, n in enumerate(per_class):
        d = Path(root) / f"cls_{chr(ord('a') + c)}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            ext = "png" if i % 2 else "jpg"
            data = encode(make_image(rng, int(rng.integers(20, 48)), int(rng.integers(20, 48)), c), ext)
            name = f"img.{i:03d}.{ext}" if i == 0 else f"img{i:03d}.{ext}"
            (d / name).write_bytes(data)
            files[f"{d.name}/{name}"] = data
    return files


def corrupt_jpeg(rng: np.random.Generator | None = None) -> bytes:
    """A truncated JPEG: its header opens (64x64) but decoding the pixels fails."""
    rng = rng or np.random.default_rng(1)
    good = encode(make_image(rng, 64, 64, 0), "jpg")
    return good[: len(good) // 2]


def plain_keys(keys_array) -> list[str]:
    """A shard group's keys read with plain zarr, decoded as docs/format.md says (format 2: rows of
    zero-padded UTF-8 bytes), without kdcache's reader."""
    return [bytes(row).rstrip(b"\0").decode("utf-8") for row in keys_array[:]]


def written_before_records(path) -> None:
    """Make a cache as kdcache wrote it before groups recorded the manifest's decode fields: no
    RECORD_ATTR, and view digests without it."""
    import zarr

    from kdcache.cache.store import DIGEST_ATTR, RECORD_ATTR, CacheReader

    names = CacheReader(str(path)).shard_names()
    for name in names:
        g = zarr.open_group(str(Path(path) / name), mode="r+")
        attrs = dict(g.attrs)
        del attrs[RECORD_ATTR]
        g.attrs.put(attrs)
    r = CacheReader(str(path), check_digests=False)
    for name in names:
        zarr.open_group(str(Path(path) / name), mode="r+").attrs[DIGEST_ATTR] = r.computed_digests(name)
