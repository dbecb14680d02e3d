"""WebDataset shards: finding them, streaming their samples, decoding images, and writing them (pack).

A shard is a plain tar file whose members are grouped into samples by their key (the file name up
to the first dot), WebDataset's convention. kdcache reads shards strictly in order, one shard at a
time, and never assumes random access.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import braceexpand
import numpy as np
import webdataset as wds
from PIL import Image
from webdataset import tariterators

from ..errors import BadImageError, KdcacheError
from .tarcheck import CheckedStream, TarCheck, check_local_tar, compression

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # s3://, gs://, http://, pipe:, ...


@dataclass
class Sample:
    """One sample of a shard: its key, the encoded image and, when present, its class id."""

    key: str
    image: bytes
    ext: str
    cls: int | None
    url: str


def is_remote(url: str) -> bool:
    return bool(_REMOTE.match(url)) and not url.startswith("file:")


def expand_urls(pattern: str | Iterable[str]) -> list[str]:
    """Shard URLs from a brace pattern (``data/train-{000..009}.tar``), a glob, a directory, a
    comma-free list, or remote URLs. Local files must exist. Raises ``KdcacheError`` if nothing matches."""
    if isinstance(pattern, (str, os.PathLike)):
        patterns = [str(pattern)]
    else:
        patterns = [str(p) for p in pattern]
    urls: list[str] = []
    for pat in patterns:
        for item in braceexpand.braceexpand(pat):
            if item.startswith("file:"):
                item = item[len("file:") :]
            if is_remote(item):
                urls.append(item)
            elif os.path.isdir(item):
                found = sorted(glob.glob(os.path.join(item, "*.tar")))
                if not found:
                    raise KdcacheError(f"directory {item} holds no .tar shards")
                urls.extend(found)
            elif any(c in item for c in "*?["):
                urls.extend(sorted(glob.glob(item)))
            elif os.path.isfile(item):
                urls.append(item)
            else:
                raise KdcacheError(f"shard {item} does not exist (from pattern {pat!r})")
    if not urls:
        raise KdcacheError(f"the data pattern {patterns if len(patterns) > 1 else patterns[0]!r} matched no shards")
    names = [shard_name(u) for u in urls]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise KdcacheError(f"two shards share the name {dupes[0]!r}; shard file names must be unique")
    return urls


def check_shards_open(urls: list[str]) -> None:
    """Each local shard opens as a tar archive (its first header reads), so that a file that is not a
    shard (a text file given as --data, say) is named before a command creates anything. Cheap: one
    header per shard; what lies further in is checked as the shard is read. Remote shards are
    checked when they stream."""
    for url in urls:
        if is_remote(url):
            continue
        try:
            mode = {"gzip": "r:gz", "bz2": "r:bz2", "xz": "r:xz"}.get(compression(url), "r:")
            with tarfile.open(url, mode):
                pass
        except Exception as e:  # noqa: BLE001 - mapped to a message, or raised as it is
            mapped = _read_error(url, e)
            if mapped is e:
                raise
            raise KdcacheError(f"{mapped}; --data takes WebDataset .tar shards") from None


def shard_name(url: str) -> str:
    """The shard's stem: ``/data/train-000003.tar`` → ``train-000003``. Names the cache group."""
    base = url.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def _parse_cls(raw, url: str, key: str) -> int:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        return int(text.strip())
    except (ValueError, UnicodeDecodeError) as e:
        raise KdcacheError(f"sample {key!r} in shard {url} has a cls entry that is not an integer: {e}") from None


def _grouped(url: str, files, check: "TarCheck | None" = None) -> Iterator[tuple[str, dict, str]]:
    """Group tar members into samples (WebDataset's rule) and validate them.

    Yields (key, raw sample dict, image extension). Raises ``KdcacheError`` naming the shard and
    key for a repeated key, a sample without an image, or a tar that cannot be read. With a
    ``check`` (the tar's block structure, followed as its bytes were read), the end of the member
    stream is only accepted once the archive is known to end properly, *before* the last sample is
    yielded; a truncated or damaged tar raises the check's error instead of reading as a shorter
    shard.
    """
    seen: set[str] = set()
    try:
        for raw in tariterators.group_by_keys(_checked_end(files, check)):
            key = raw["__key__"]
            if key in seen:
                raise KdcacheError(
                    f"shard {url} holds key {key!r} twice; keys must be unique within a shard "
                    "(re-pack the data or drop the duplicate)"
                )
            seen.add(key)
            ext = next((e for e in IMAGE_EXTS if e in raw), None)
            if ext is None:
                have = sorted(k for k in raw if not k.startswith("__"))
                raise KdcacheError(
                    f"sample {key!r} in shard {url} has no image (looked for {', '.join(IMAGE_EXTS)}; found {have})"
                )
            yield key, raw, ext
    except KdcacheError:
        raise
    except Exception as e:
        # A structural problem the byte stream already showed (a cut, a damaged header) explains
        # whatever tarfile or webdataset made of it better than their own message does.
        if check is not None:
            check.raise_if_broken()
        mapped = _read_error(url, e)
        if mapped is e:
            raise
        raise mapped from None


def _read_error(url: str, e: Exception) -> Exception:
    """The KdcacheError for an exception raised while reading a shard's members (``e`` itself
    when it is none of the kinds a bad tar raises)."""
    if isinstance(e, ValueError):  # webdataset's duplicate-file error
        msg = str(e.args[0]) if e.args else str(e)
        if "duplicate file name" in msg:  # the same key twice in a row: "<key>.<ext>: duplicate ..."
            member = msg.split(":", 1)[0]
            return KdcacheError(
                f"shard {url} holds key {member.split('.', 1)[0]!r} twice (member {member!r} repeats); "
                "keys must be unique within a shard (re-pack the data or drop the duplicate)"
            )
        return KdcacheError(f"shard {url} is malformed: {msg}")
    if isinstance(e, tarfile.TarError):  # empty, truncated or not a tar at all
        return KdcacheError(f"cannot read shard {url}: it is not a readable tar file ({e.args[0] if e.args else e})")
    if isinstance(e, (OSError, EOFError)):
        return KdcacheError(f"cannot read shard {url}: {e}")
    return e


def _checked_end(files, check: "TarCheck | None"):
    """Pass the tar's members through; when tarfile says the archive is over (webdataset's
    end-of-shard marker ``{}``, or the end of the iterator), first make sure it really is."""
    finished = False
    for item in files:
        if item == {} and check is not None and not finished:
            finished = True
            check.finish()
        yield item
    if check is not None and not finished:
        check.finish()


def open_shard(url: str):
    """A binary stream of a shard: local files, ``pipe:`` and the schemes WebDataset handles
    (http(s), gs, hf, ...) through WebDataset; any other scheme (s3://, az://, memory://, ...)
    through fsspec."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")
    scheme = url.split(":", 1)[0].lower() if is_remote(url) else None
    try:
        if scheme is not None and scheme not in gopen.gopen_schemes:
            import fsspec

            return fsspec.open(url, "rb").open()
        return gopen.gopen(url)
    except (OSError, ValueError, ImportError) as e:
        raise KdcacheError(f"cannot open shard {url}: {e}") from None


def iter_samples(url: str) -> Iterator[Sample]:
    """Stream the samples of one shard in tar order. Each needs an image; ``cls`` is optional.

    Raises ``KdcacheError`` naming the shard and key for a sample without an image, a repeated
    key, or a tar that cannot be read, and naming the shard and the last good key for a tar that
    is truncated or damaged (tarfile alone would end early without an error): the end of the
    archive is checked before the last sample is yielded.
    """
    stream = CheckedStream(url, open_shard(url))
    try:
        files = tariterators.tar_file_expander([{"url": url, "stream": stream}])
        for key, raw, ext in _grouped(url, files, stream.check):
            cls = _parse_cls(raw["cls"], url, key) if "cls" in raw else None
            yield Sample(key, raw[ext], ext, cls, url)
    finally:
        stream.close()


_META = re.compile(r"__[^/]*__($|/)")  # WebDataset's per-shard metadata members


def scan_keys(url: str) -> tuple[list[str], list[bool]]:
    """Keys (tar order) and whether each sample has a ``cls`` entry, without reading image data.

    A local uncompressed tar is read header by header, seeking over member data; a compressed or
    remote one is streamed (headers only are kept). The same grouping rule and errors as
    ``iter_samples``, including the check that the tar is complete.
    """
    keys, labels = _scan(url, with_labels=False)
    return keys, labels


def scan_labels(url: str) -> tuple[list[str], list[int | None]]:
    """Keys (tar order) and each sample's ``cls`` label (None where it has none), reading only the
    tiny ``cls`` members besides the headers (no image data). Same checks as ``scan_keys``."""
    return _scan(url, with_labels=True)


def _scan(url: str, with_labels: bool) -> tuple[list[str], list]:
    def headers(tf):
        for m in tf:
            if m.isreg() and m.name and not _META.match(m.name):
                data = b""
                if with_labels and m.name.endswith(".cls"):
                    data = tf.extractfile(m).read()
                yield {"fname": m.name, "data": data, "__url__": url}

    def label(key, raw):
        if "cls" not in raw:
            return None
        return _parse_cls(raw["cls"], url, key) if with_labels else True

    keys, labels = [], []
    if is_remote(url) or compression(url) is not None:
        stream = CheckedStream(url, open_shard(url))
        try:
            try:
                tf = tarfile.open(fileobj=stream, mode="r|")
            except (OSError, EOFError, tarfile.TarError) as e:
                stream.check.raise_if_broken()
                raise KdcacheError(f"cannot read shard {url}: {e}") from None
            for key, raw, _ in _grouped(url, headers(tf), stream.check):
                keys.append(key)
                labels.append(label(key, raw))
        finally:
            stream.close()
        return keys, labels if with_labels else [x is not None for x in labels]
    check_local_tar(url)  # the whole block structure, headers only: a cut or damaged tar raises here
    try:
        with tarfile.open(url, "r:") as tf:
            for key, raw, _ in _grouped(url, headers(tf)):
                keys.append(key)
                labels.append(label(key, raw))
    except (OSError, EOFError, tarfile.TarError) as e:  # opening failed before _grouped could map it
        raise KdcacheError(f"cannot read shard {url}: {e}") from None
    return keys, labels if with_labels else [x is not None for x in labels]


@dataclass
class DecodedShard:
    """Every sample of one shard, decoded once."""

    keys: list[str]
    sizes: np.ndarray  # (N, 2) int32 height, width; (-1, -1) where the image is bad
    images: list  # PIL images, None where bad
    bad: dict[str, str]  # key -> cause, for images that failed to decode (with skip_bad)
    labels: list  # cls per sample, None where absent


def decode_shard(url: str, skip_bad: bool = False, renderer=None) -> DecodedShard:
    """Decode every image of a shard once. A bad image raises ``BadImageError`` unless
    ``skip_bad``, which records it and keeps its place (so arrays stay aligned with tar order).

    ``renderer`` (a ``views`` render backend; default PIL) decodes: ``images`` are its decoded
    images, or, for a renderer that decodes on the GPU, ``views.Encoded`` images with the size read
    from their headers (the worker only reads bytes)."""
    from .render import image_hw

    keys, sizes, images, bad, labels = [], [], [], {}, []
    for sample in iter_samples(url):
        keys.append(sample.key)
        labels.append(sample.cls)
        try:
            im = decode_image(sample, renderer, load=True)
        except BadImageError as e:
            if not skip_bad:
                raise
            bad[sample.key] = e.cause
            images.append(None)
            sizes.append((-1, -1))
            continue
        images.append(im)
        sizes.append(image_hw(im))
    return DecodedShard(keys, np.asarray(sizes, dtype=np.int32).reshape(-1, 2), images, bad, labels)


def decode_image(sample: Sample, renderer=None, load: bool = False):
    """Decode a sample's image fully, as RGB, with ``renderer`` (a ``views`` render backend; default
    PIL: a PIL image). Raises ``BadImageError`` naming shard and key. ``load``: the renderer's
    worker-side ``load`` instead (an ``Encoded`` image, header read only, when it decodes on the GPU)."""
    from .render import PIL_RENDERER, DecodeError, Encoded

    renderer = renderer or PIL_RENDERER
    try:
        im = (renderer.load if load else renderer.decode)(sample.image, sample.ext)
    except DecodeError as e:
        cause = str(e)
        if renderer.backend == "pil" and sample.ext == "webp" and not webp_supported():
            cause += (" (this PIL build has no WebP support: install libwebp-dev and rebuild Pillow-SIMD "
                      "with `bash tools/install_pillow_simd.sh`, or use plain Pillow)")
        raise BadImageError(sample.url, sample.key, cause) from None
    if isinstance(im, Encoded):
        im.key, im.url = sample.key, sample.url
    return im


def webp_supported() -> bool:
    """Whether the PIL in use can decode WebP (Pillow-SIMD built without libwebp cannot)."""
    from PIL import features

    return bool(features.check("webp"))


def find_classes_file(urls: list[str]) -> str | None:
    """``classes.json`` next to the first local shard, if there is one."""
    for url in urls[:1]:
        if not is_remote(url):
            cand = os.path.join(os.path.dirname(os.path.abspath(url)), "classes.json")
            if os.path.isfile(cand):
                return cand
    return None


def load_class_names(urls: list[str]) -> list[str] | None:
    path = find_classes_file(urls)
    if path is None:
        return None
    with open(path) as f:
        names = json.load(f)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise KdcacheError(f"{path} must hold a JSON list of class names")
    return names


# ---- writing ----------------------------------------------------------------------------------


def write_shards(samples: Iterable[Sample], out_dir: str | Path, prefix: str, shard_size: int) -> list[str]:
    """Write samples into ``out_dir/prefix-000000.tar``, ``...-000001.tar`` (``shard_size`` each)."""
    if shard_size < 1:
        raise KdcacheError("--shard-size must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    writer = None
    tmp = None
    count = 0
    try:
        for s in samples:
            if writer is None or count == shard_size:
                if writer is not None:
                    w, writer = writer, None
                    w.close()
                path = out_dir / f"{prefix}-{len(paths):06d}.tar"
                tmp = path.with_suffix(".tar.tmp")
                paths.append(str(path))
                writer = wds.TarWriter(str(tmp))
                count = 0
            record = {"__key__": s.key, s.ext: s.image}
            if s.cls is not None:
                record["cls"] = str(int(s.cls)).encode()
            writer.write(record)
            count += 1
        if writer is not None:
            w, writer = writer, None
            w.close()
    except BaseException as e:
        # Nothing of this run stays behind: its temporary shards are removed (the final names were
        # never written), so a re-run starts clean. A write error names the file it hit.
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass  # the same full disk again: the first error is the one to report
        for p in paths:
            Path(p).with_suffix(".tar.tmp").unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None and tmp is not None:
            e.filename = str(tmp)
        raise
    # Rename only once everything is written, so a crash never leaves a truncated .tar behind.
    for p in paths:
        tmp = Path(p).with_suffix(".tar.tmp")
        if tmp.exists():
            os.replace(tmp, p)
    return paths


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def _key_for(class_name: str, stem: str, taken: set[str]) -> str:
    # WebDataset splits a member name at its first dot, so keys must not contain dots.
    base = _KEY_UNSAFE.sub("_", f"{class_name}_{stem}")
    key, n = base, 1
    while key in taken:
        key, n = f"{base}_{n}", n + 1
    taken.add(key)
    return key


def pack_imagefolder(
    src: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    val_fraction: float = 0.0,
    seed: int = 0,
    skip_bad: bool = False,
    overwrite: bool = False,
) -> dict:
    """Convert an ImageFolder tree (``src/<class>/<image>``) into shuffled train/val shards.

    Writes ``out/train/train-*.tar``, ``out/val/val-*.tar`` (when ``val_fraction > 0``) and a
    ``classes.json`` (class names in index order) beside each split's shards. Images are copied byte for byte. The
    validation split takes ``val_fraction`` of every class, chosen with ``seed``. An ``out`` that
    already holds shards is refused unless ``overwrite``, which removes them first (shards left from
    an earlier, larger pack would otherwise mix into the new data set).
    """
    src = Path(src)
    if not src.is_dir():
        raise KdcacheError(f"{src} is not a directory; pack expects an ImageFolder tree src/<class>/<image>")
    if not 0.0 <= val_fraction < 1.0:
        raise KdcacheError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    classes = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise KdcacheError(f"{src} has no class sub-directories; expected src/<class>/<image>")
    clear_output(out, overwrite)
    rng = random.Random(seed)
    taken: set[str] = set()
    train, val, skipped = [], [], []
    for idx, name in enumerate(classes):
        files = sorted(
            p for p in (src / name).rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS
        )
        items = []
        for p in files:
            try:
                with Image.open(p) as im:
                    im.verify()
            except Exception as e:
                if skip_bad:
                    skipped.append(str(p))
                    continue
                raise KdcacheError(
                    f"{p} is not a readable image ({type(e).__name__}: {e}); remove it or pass --skip-bad"
                ) from None
            items.append((p, _key_for(name, p.stem, taken), idx))
        rng.shuffle(items)
        n_val = int(round(len(items) * val_fraction))
        val.extend(items[:n_val])
        train.extend(items[n_val:])
    if not train:
        raise KdcacheError(f"{src} holds no images with extensions {', '.join(IMAGE_EXTS)}")
    rng.shuffle(train)
    rng.shuffle(val)

    def samples(items):
        for p, key, idx in items:
            yield Sample(key, p.read_bytes(), p.suffix.lower().lstrip("."), idx, str(p))

    return write_dataset(out, samples(train), samples(val) if val else None, classes, shard_size, skipped)


def clear_output(out: str | Path, overwrite: bool) -> None:
    """Refuse an output folder that holds shards already (or, with ``overwrite``, remove them)."""
    out = Path(out)
    old = [p for split in ("train", "val") for p in sorted((out / split).glob(f"{split}-*.tar"))
           + [out / split / "classes.json"] if p.exists()]
    if old and not overwrite:
        raise KdcacheError(
            f"{out} already holds shards ({old[0]}{' and more' if len(old) > 1 else ''}); choose an empty output "
            "folder, or pass --overwrite to replace them")
    for p in old:
        p.unlink()


def write_dataset(
    out: str | Path,
    train: Iterable[Sample],
    val: Iterable[Sample] | None,
    classes: list[str],
    shard_size: int,
    skipped: list[str] | None = None,
) -> dict:
    """Write ``out/train/train-*.tar`` (and ``out/val/val-*.tar``), each folder with a
    ``classes.json`` beside its shards. Returns a summary dict."""
    out = Path(out)
    splits = {"train": train} if val is None else {"train": train, "val": val}
    summary: dict = {"classes": len(classes), "skipped": list(skipped or [])}
    for split, samples in splits.items():
        counted = _Counter(samples)
        paths = write_shards(counted, out / split, split, shard_size)
        with open(out / split / "classes.json", "w") as f:
            json.dump(list(classes), f, indent=0)
        summary[f"{split}_shards"] = paths
        summary[f"{split}_samples"] = counted.n
    summary.setdefault("val_shards", [])
    summary.setdefault("val_samples", 0)
    return summary


class _Counter:
    """Wraps an iterable and counts what passes through."""

    def __init__(self, it):
        self.it, self.n = it, 0

    def __iter__(self):
        for x in self.it:
            self.n += 1
            yield x
