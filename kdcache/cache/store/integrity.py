"""Is a group's data really there? Missing chunks, cut files, damaged groups and values no teacher gives."""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
from zarr.codecs import BloscCodec

from ...errors import KdcacheError
from .manifest import ARRAYS, is_local


# ---- is a group's data really there? -----------------------------------------------------------
#
# Zarr reads a chunk whose file is missing as the array's fill value, without an error: a deleted
# `logprobs` file used to read back as log-probability 0.0 everywhere. So every complete group is
# checked once, against one listing of the group's files, before its arrays are read.

# Fill values of the arrays CacheWriter creates: values no real record holds where the dtype
# allows, so that a chunk read back as fill is recognisable (the listing check above is the guard;
# this is only a second line). 0xFF never occurs in UTF-8; NaN never in stored log-probs or λ.
FILL_VALUES = {
    "keys": 0xFF, "size": -2, "logprobs": float("nan"), "classes": -2, "flip": False, "mix_with": -2,
    "mix_lam": float("nan"),
    # format 3: counts <= 254, class codes <= 254 (uint8; uint16 above: its max), steps <= 254
    "counts": 255, "class_list": -2, "logprob_steps": 255, "topk_logmass": float("nan"),
}
# Group attribute: every chunk of every array was written, also one equal to the fill value
# (zarr skips those by default). Groups written before it existed may lack a chunk that was all
# fill value, so for them only the arrays that can never be all fill value must have files.
EVERY_CHUNK_ATTR = "every_chunk_stored"
_SHARD_INDEX_BYTES = 16  # per inner chunk (offset, length as uint64), plus a 4-byte crc32c


def box_fill(dtype) -> int:
    return int(np.iinfo(dtype).max) if np.dtype(dtype) == np.uint16 else -1


def _chunk_files(arr) -> list[tuple[str, int]]:
    """The data files an array's chunks live in (keys relative to the array) with the least size
    each may have; none for an array of size 0."""
    shape = tuple(arr.shape)
    if math.prod(shape) == 0:
        return []
    outer = tuple(arr.shards or arr.chunks)
    grid = [math.ceil(s / c) for s, c in zip(shape, outer)]
    inner = math.prod(math.ceil(o / c) for o, c in zip(outer, arr.chunks)) if arr.shards else 0
    least = inner * _SHARD_INDEX_BYTES + 4 if arr.shards else 1
    return [(arr.metadata.encode_chunk_key(c), least) for c in itertools.product(*(range(g) for g in grid))]


def _may_lack_data(aname: str, n: int, k: int, attrs: dict) -> bool:
    """For a group written before EVERY_CHUNK_ATTR: whether an array can legitimately have no chunk
    file because all its values equal zarr's default fill value (0 / false)."""
    if aname == "flip":
        return True  # all false: no flips drawn, or flip disabled
    if aname == "keys":
        return n <= 1  # an empty key (two would be a repeated key)
    if aname in ("logprobs", "classes"):
        return k == 1  # k >= 2 distinct classes cannot all be 0, nor all log-probs 0
    if aname == "box":
        return len(attrs.get("bad") or {}) >= n  # only bad records have zero boxes
    return False  # size >= 1 or -1; λ >= 0.5; a record never mixes with itself


def missing_data(arrays: dict, files: dict[str, int | None], n: int, k: int, attrs: dict,
                 names=ARRAYS) -> tuple[str, str] | None:
    """(array, what is wrong) for the first array of ``names`` whose data is not all in ``files``
    (keys relative to the group, with sizes when known), else None."""
    strict = bool(attrs.get(EVERY_CHUNK_ATTR))
    for aname in names:
        arr = arrays.get(aname)
        if arr is None:
            return aname, "the array is missing"
        if f"{aname}/zarr.json" not in files:
            return aname, "its metadata file is missing"
        for key, least in _chunk_files(arr):
            size = files.get(f"{aname}/{key}", -1)
            if size == -1:
                if not strict and _may_lack_data(aname, n, k, attrs):
                    continue
                return aname, f"its chunk file {key} is missing"
            if size is not None and size < least:
                return aname, f"its chunk file {key} is {'empty' if size == 0 else f'truncated ({size} bytes)'}"
    return None


def blosc_cut(arrays: dict, files: dict[str, int | None], read_head) -> tuple[str, str] | None:
    """For unsharded chunks compressed by Blosc without a checksum (groups written before chunks
    carried a CRC-32C): (array, what is wrong) when a chunk file is shorter or longer than the
    compressed size its Blosc header records. ``read_head(key)`` returns a file's first 16 bytes."""
    for aname in ("keys", "size"):
        arr = arrays.get(aname)
        if arr is None or arr.shards or not arr.compressors:
            continue
        if not isinstance(arr.compressors[-1], BloscCodec):
            continue  # a checksum (or another codec) ends the chain: zarr checks it on read
        for key, _ in _chunk_files(arr):
            size = files.get(f"{aname}/{key}")
            if size is None:
                continue
            head = read_head(f"{aname}/{key}")
            if len(head) < 16:
                return aname, f"its chunk file {key} is truncated ({size} bytes)"
            cbytes = int.from_bytes(head[12:16], "little")
            if cbytes != size:
                return aname, f"its chunk file {key} is {size} bytes, its Blosc header says {cbytes}"
    return None


def head_reader(path: str, name: str, fs=None):
    """read_head(key) for the files of one group: the first 16 bytes."""
    if is_local(path):
        base = os.path.join(path[len("file://") :] if path.startswith("file://") else path, name)

        def local(key):
            with open(os.path.join(base, *key.split("/")), "rb") as f:
                return f.read(16)

        return local
    if fs is not None:
        fs_obj, root = fs
        return lambda key: fs_obj.cat_file(f"{root.rstrip('/')}/{name}/{key}", start=0, end=16)
    return None


def missing_data_quick(files: dict[str, int | None], n: int, k: int, attrs: dict,
                       names=ARRAYS) -> tuple[str, str] | None:
    """The same question as ``missing_data`` from the listing alone, without reading the arrays'
    metadata: every array has its metadata file and, when N > 0, a non-empty data file (kdcache
    stores each array in a single chunk or shard file)."""
    strict = bool(attrs.get(EVERY_CHUNK_ATTR))
    for aname in names:
        if f"{aname}/zarr.json" not in files:
            return aname, "its metadata file is missing"
        if n <= 0:
            continue
        data = [size for key, size in files.items() if key.startswith(f"{aname}/c/")]
        if not data:
            if not strict and _may_lack_data(aname, n, k, attrs):
                continue
            return aname, "its chunk file is missing"
        if any(size == 0 for size in data):
            return aname, "its chunk file is empty"
    return None


def list_files(root, path: str, name: str, fs=None) -> dict[str, int | None]:
    """Every file under a group (keys relative to it, '/'-separated) with its size: one listing."""
    if is_local(path):
        base = os.path.join(path[len("file://") :] if path.startswith("file://") else path, name)
        out: dict[str, int | None] = {}
        stack = [("", base)]
        while stack:
            rel, d = stack.pop()
            try:
                entries = list(os.scandir(d))
            except FileNotFoundError:
                continue
            for e in entries:
                key = f"{rel}{e.name}"
                if e.is_dir():
                    stack.append((key + "/", e.path))
                else:
                    out[key] = e.stat().st_size
        return out
    if fs is not None:
        fs_obj, base = fs
        prefix = f"{base.rstrip('/')}/{name}/"
        found = fs_obj.find(prefix.rstrip("/"), detail=True)
        return {p[len(prefix) :] if p.startswith(prefix) else p.split(f"/{name}/", 1)[-1]: info.get("size")
                for p, info in found.items()}
    from zarr.core.sync import sync  # any other store: names only

    store = root.store_path.store
    base = f"{root.store_path.path}/{name}".strip("/")

    async def listing():
        return [key async for key in store.list_prefix(base + "/")]

    return {key[len(base) + 1 :]: None for key in sync(listing())}


def list_all_groups(fs, base: str) -> dict[str, dict[str, int | None]]:
    """Every file of a remote cache, by group (``{group: {key relative to it: size}}``), from one
    recursive listing: on object storage about one list request per 1000 files, where listing
    each group on its own costs one request per group."""
    prefix = f"{base.rstrip('/')}/"
    out: dict[str, dict[str, int | None]] = {}
    for p, info in fs.find(base.rstrip("/"), detail=True).items():
        rel = p[len(prefix):] if p.startswith(prefix) else p.split(prefix.lstrip("/"), 1)[-1]
        group, _, key = rel.partition("/")
        if key:
            out.setdefault(group, {})[key] = info.get("size")
    return out


def filesystem_of(path: str, storage_options: dict | None):
    """(filesystem, root path) of a remote cache, for listings with sizes; None when unavailable."""
    if is_local(path):
        return None
    try:
        import fsspec

        return fsspec.core.url_to_fs(path, **(storage_options or {}))
    except Exception:
        return None


def damaged_error(what: str, e: BaseException) -> KdcacheError:
    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, IsADirectoryError)):
        return KdcacheError(f"cannot read {what}: I/O error ({type(e).__name__}: {e}); check the storage, then re-run")
    detail = f"{type(e).__name__}: {e}"
    if len(detail) > 300:
        detail = detail[:300] + "..."
    return KdcacheError(
        f"cannot read {what}: the stored data is damaged ({detail}); re-run precompute on that shard after "
        "deleting the group, or restore it"
    )

def nonfinite_records(logprobs, valid) -> list[tuple[int, int]]:
    """(record, view column) of every good record (``valid``) whose top-k log-probs hold NaN or
    +inf: values no teacher output has (-inf is a probability of 0, or float16 underflow)."""
    lp = np.asarray(logprobs)
    with np.errstate(invalid="ignore"):
        hit = (np.isnan(lp) | np.isposinf(lp)).any(-1) & np.asarray(valid, dtype=bool)[:, None]
    return [(int(i), int(j)) for i, j in np.argwhere(hit)]
