"""The cache: a Zarr v3 group holding the teacher's top-k outputs and the views they were taken on.

Layout (format version 2)::

    cache.zarr/                 attrs["kdcache"] = manifest
      <shard stem>/             attrs: source, num_samples, complete, bad, render
        keys      (N, L)        uint8    sample keys, tar order: UTF-8 bytes zero-padded to L
        size      (N, 2)        int32    source image (height, width); (-1, -1) for a bad image
        logprobs  (N, V, k)     float16  top-k log-probs at T=1, descending
        classes   (N, V, k)     int16|int32  class ids; -1 for a bad image
        box       (N, V, 4)     uint16|int32 x, y, w, h in source pixels
        flip      (N, V)        bool
        mix_with  (N, V)        int32    partner's index in the shard, -1 = not mixed
        mix_lam   (N, V)        float16  weight of the record's own image

Every per-view array is chunked one chunk per view and packed into one Zarr shard, so a shard
group is a handful of files and an epoch reads one small chunk per array. ``docs/format.md``
describes the semantics in full.

Format version 1 stored ``keys`` as a (N,) Zarr ``string`` (vlen-utf8) array, which tensorstore
cannot open. Version 1 caches are still read (keys come back as the same str arrays); they are
not written to any more.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from . import __version__
from .errors import KdcacheError

FORMAT_VERSION = 2
# Cache formats this release reads. Version 1 differs only in the keys array (Zarr string dtype).
READ_VERSIONS = (1, 2)
# Array attributes of the keys array (version 2): how a plain-zarr user decodes its rows.
KEYS_ATTRS = {"encoding": "utf-8, zero-padded"}
ARRAYS = ("keys", "size", "logprobs", "classes", "box", "flip", "mix_with", "mix_lam")
# Manifest fields that must agree before more shards are written into an existing cache.
MATCHED_FIELDS = ("teacher", "augmentation", "seed", "views", "topk", "resolution", "shards", "compute")

_FLOAT = BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle)
_INT = BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.bitshuffle)


def class_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16) if num_classes <= np.iinfo(np.int16).max else np.dtype(np.int32)


def box_dtype(max_side: int) -> np.dtype:
    return np.dtype(np.uint16) if max_side <= np.iinfo(np.uint16).max else np.dtype(np.int32)


def make_manifest(
    *,
    teacher: dict,
    augmentation: dict,
    seed: int,
    views: int,
    topk: int,
    resolution: int,
    render: dict,
    shards: list[str],
    sources: list[str],
    class_names: list[str] | None = None,
    compute: dict | None = None,
) -> dict:
    """The cache's manifest (stored as ``attrs["kdcache"]`` of the root group).

    ``compute`` records how the teacher ran: ``{"batch_size": int, "device": "cpu"|"cuda",
    "precision": "fp32"|"bf16"}`` (None when the caller does not say).
    """
    return {
        "format_version": FORMAT_VERSION,
        "kdcache_version": __version__,
        "teacher": teacher,
        "augmentation": augmentation,
        "seed": int(seed),
        "views": int(views),
        "topk": int(topk),
        "resolution": int(resolution),
        "render": render,
        "shards": list(shards),
        "sources": list(sources),
        "class_names": list(class_names) if class_names is not None else None,
        "compute": dict(compute) if compute is not None else None,
    }


def manifest_differences(old: dict, new: dict) -> list[str]:
    """Human-readable lines for each matched field where two manifests disagree."""
    out = []
    for name in MATCHED_FIELDS:
        a, b = old.get(name), new.get(name)
        if name == "compute" and old.get("format_version") == 1:
            continue  # format 1 did not record it (and a format-1 cache is never written to again)
        if name == "shards":  # the same shards listed in another order are the same data
            a, b = sorted(a or []), sorted(b or [])
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            if isinstance(a, dict) and isinstance(b, dict):
                for sub in sorted(set(a) | set(b)):
                    if a.get(sub) != b.get(sub):
                        out.append(f"{name}.{sub}: cache has {a.get(sub)!r}, this run has {b.get(sub)!r}")
            elif name == "shards":
                gone, new_ = sorted(set(a or []) - set(b or [])), sorted(set(b or []) - set(a or []))
                out.append(f"shards: cache covers {len(a or [])} shards, this run {len(b or [])} "
                           f"(only in cache: {gone[:3]}, only in this run: {new_[:3]})")
            else:
                out.append(f"{name}: cache has {a!r}, this run has {b!r}")
    return out


def _open_root(path: str, mode: str, storage_options: dict | None):
    kw = {"storage_options": storage_options} if storage_options else {}
    return zarr.open_group(str(path), mode=mode, zarr_format=3, **kw)


def _is_local(path: str) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def open_manifest(path: str, storage_options: dict | None = None):
    """Open an existing cache read-only and return (root group, manifest). Validates the format."""
    path = str(path)
    if _is_local(path):
        local = path[len("file://") :] if path.startswith("file://") else path
        if not os.path.exists(local):
            raise KdcacheError(f"no cache at {path}: the path does not exist (run `kdcache precompute` first)")
        if not os.path.isfile(os.path.join(local, "zarr.json")):
            raise KdcacheError(f"{path} is not a kdcache store: it has no zarr.json (not a Zarr v3 group)")
    try:
        root = _open_root(path, "r", storage_options)
    except Exception as e:
        raise KdcacheError(f"{path} is not a kdcache store: cannot open it as a Zarr v3 group ({e})") from None
    manifest = root.attrs.get("kdcache")
    if not isinstance(manifest, dict):
        raise KdcacheError(f"{path} is a Zarr group but not a kdcache store: it has no 'kdcache' manifest attribute")
    version = manifest.get("format_version")
    if type(version) is not int or version not in READ_VERSIONS:
        readable = " and ".join(str(v) for v in READ_VERSIONS)
        raise KdcacheError(
            f"{path} uses cache format version {version!r}; this kdcache ({__version__}) reads versions "
            f"{readable}. Use a matching kdcache release or re-run precompute into a new cache."
        )
    for name in ("teacher", "views", "topk", "seed", "augmentation", "resolution"):
        if name not in manifest:
            raise KdcacheError(f"{path}: the manifest lacks {name!r}; the store is damaged or not written by kdcache")
    return root, manifest


@dataclass
class ViewRecords:
    """One view of every record in one shard group: the arrays an epoch needs."""

    shard: str
    view: int
    keys: np.ndarray  # (N,) str
    size: np.ndarray  # (N, 2) int32 height, width
    logprobs: np.ndarray  # (N, k) float16
    classes: np.ndarray  # (N, k) int
    box: np.ndarray  # (N, 4) int
    flip: np.ndarray  # (N,) bool
    mix_with: np.ndarray  # (N,) int32
    mix_lam: np.ndarray  # (N,) float16
    bad: frozenset

    def __len__(self) -> int:
        return len(self.keys)


def _is_string_keys(keys_array) -> bool:
    """Whether a keys array is format 1's (N,) Zarr string array rather than format 2's (N, L) uint8."""
    return np.dtype(keys_array.dtype).kind in ("T", "U", "O")


def encode_keys(keys) -> np.ndarray:
    """Sample keys as format 2 stores them: (N, L) uint8, each row the key's UTF-8 bytes zero-padded
    to L = the longest key in bytes (at least 1). A key holding a NUL character cannot round-trip
    (its padding would be indistinguishable) and is refused."""
    encoded = []
    for k in keys:
        k = str(k)
        if "\x00" in k:
            raise KdcacheError(
                f"sample key {k!r} contains a NUL character; kdcache stores keys as zero-padded UTF-8 "
                "bytes and cannot store it without changing it. Rename the sample in the shard."
            )
        encoded.append(k.encode("utf-8"))
    width = max([1] + [len(e) for e in encoded])
    # numpy's fixed-width bytes pad with NULs: exactly the stored layout.
    return np.array(encoded, dtype=f"S{width}").view(np.uint8).reshape(len(encoded), width)


def decode_keys(rows: np.ndarray) -> np.ndarray:
    """(N, L) uint8 rows of zero-padded UTF-8 back to a numpy str array of N keys."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    if rows.ndim != 2 or rows.shape[1] < 1:
        raise KdcacheError(f"keys array has shape {rows.shape}, expected (N, L) with L >= 1; the store is damaged")
    # Fixed-width bytes drop trailing NULs when read back: the padding goes, the key stays.
    raw = rows.view(f"S{rows.shape[1]}").reshape(rows.shape[0]).tolist()
    try:
        return np.array([b.decode("utf-8") for b in raw], dtype=str)
    except UnicodeDecodeError as e:
        raise KdcacheError(f"a stored key is not valid UTF-8 ({e}); the store is damaged") from None


def _keys(keys_array) -> np.ndarray:
    """The keys as a plain numpy unicode array, from either format's keys array."""
    if _is_string_keys(keys_array):  # format 1: zarr returns numpy's variable-width strings
        return np.array([str(k) for k in keys_array[:]], dtype=str)
    return decode_keys(np.asarray(keys_array[:]))


class CacheReader:
    """Read access to a cache (local path or fsspec URL). Opening validates the format."""

    def __init__(self, path: str, storage_options: dict | None = None):
        self.path = str(path)
        self.root, self.manifest = open_manifest(self.path, storage_options)
        self.format_version = int(self.manifest["format_version"])
        self._groups: set[str] = set()  # shard groups seen so far (groups are never removed)
        self._valid: dict[str, tuple[int, dict, dict]] = {}  # complete shard -> (N, arrays, attrs)

    @property
    def views(self) -> int:
        return int(self.manifest["views"])

    @property
    def topk(self) -> int:
        return int(self.manifest["topk"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["teacher"]["num_classes"])

    @property
    def class_names(self) -> list[str] | None:
        return self.manifest.get("class_names")

    def shard_names(self) -> list[str]:
        """Shard groups present in the store (complete or not), sorted."""
        self._groups = set(self.root.group_keys())
        return sorted(self._groups)

    def has_shard(self, name: str) -> bool:
        # Listing a large store is slow; list again only when the name is not known yet.
        return name in self._groups or name in set(self.shard_names())

    def shard_attrs(self, name: str) -> dict:
        if name in self._valid:
            return dict(self._valid[name][2])
        if not self.has_shard(name):
            raise KdcacheError(f"cache {self.path} has no shard group {name!r} (run precompute on that shard)")
        return dict(self.root[name].attrs)

    def is_complete(self, name: str) -> bool:
        return name in self._valid or (self.has_shard(name) and bool(self.root[name].attrs.get("complete", False)))

    def check_shard(self, name: str) -> int:
        """Validate one complete shard group's arrays (presence, shapes, dtypes). Returns N.

        A complete group never changes, so it is validated once per reader and its array
        handles are kept for the reads that follow.
        """
        return self._open_shard(name)[0]

    def _open_shard(self, name: str) -> tuple[int, dict, dict]:
        if name in self._valid:
            return self._valid[name]
        attrs = self.shard_attrs(name)
        if not attrs.get("complete", False):
            raise KdcacheError(
                f"shard {name!r} in cache {self.path} is incomplete (precompute was interrupted); "
                "re-run the same `kdcache precompute` command to finish it"
            )
        g = self.root[name]
        present = dict(g.arrays())
        missing = [a for a in ARRAYS if a not in present]
        if missing:
            raise KdcacheError(f"shard {name!r} in cache {self.path} lacks arrays {missing}; re-run precompute on it")
        n, V, k = int(attrs.get("num_samples", -1)), self.views, self.topk
        keys = present["keys"]
        if self.format_version == 1:
            keys_shape = (n,)
            if not _is_string_keys(keys):
                raise KdcacheError(
                    f"shard {name!r} array 'keys' is {keys.dtype}, expected strings (cache format 1); the store is damaged"
                )
        else:  # (N, L) zero-padded UTF-8 rows, L >= 1
            width = int(keys.shape[1]) if len(keys.shape) == 2 and keys.shape[1] >= 1 else 1
            keys_shape = (n, width)
            if np.dtype(keys.dtype) != np.uint8:
                raise KdcacheError(
                    f"shard {name!r} array 'keys' is {keys.dtype}, expected uint8 (cache format 2); the store is damaged"
                )
        expect = {
            "keys": keys_shape, "size": (n, 2), "logprobs": (n, V, k), "classes": (n, V, k),
            "box": (n, V, 4), "flip": (n, V), "mix_with": (n, V), "mix_lam": (n, V),
        }
        for a, shape in expect.items():
            if tuple(present[a].shape) != shape:
                raise KdcacheError(
                    f"shard {name!r} array {a!r} has shape {tuple(present[a].shape)}, expected {shape} "
                    f"(num_samples={n}, views={V}, topk={k}); the store is damaged"
                )
        if present["logprobs"].dtype != np.float16:
            raise KdcacheError(f"shard {name!r} array 'logprobs' is {present['logprobs'].dtype}, expected float16")
        self._valid[name] = (n, {a: present[a] for a in ARRAYS}, attrs)
        return self._valid[name]

    def keys(self, name: str) -> np.ndarray:
        """The sample keys of a complete shard group, in tar order."""
        return _keys(self._open_shard(name)[1]["keys"])

    def sizes(self, name: str) -> np.ndarray:
        """(N, 2) source image (height, width) of a complete shard group; (-1, -1) for bad images."""
        return np.asarray(self._open_shard(name)[1]["size"][:])

    def read_view(self, name: str, view: int) -> ViewRecords:
        """View ``view`` of every record in shard ``name``: one chunk read per array."""
        _, arr, attrs = self._open_shard(name)
        if not 0 <= view < self.views:
            raise KdcacheError(f"view {view} is out of range; cache {self.path} holds views 0..{self.views - 1}")
        return ViewRecords(
            shard=name,
            view=view,
            keys=_keys(arr["keys"]),
            size=np.asarray(arr["size"][:]),
            logprobs=np.asarray(arr["logprobs"][:, view]),
            classes=np.asarray(arr["classes"][:, view]),
            box=np.asarray(arr["box"][:, view]),
            flip=np.asarray(arr["flip"][:, view]),
            mix_with=np.asarray(arr["mix_with"][:, view]),
            mix_lam=np.asarray(arr["mix_lam"][:, view]),
            bad=frozenset(attrs.get("bad", {})),
        )

    def read_shard(self, name: str) -> dict[str, np.ndarray]:
        """Every array of one shard group, all views."""
        _, arr, _ = self._open_shard(name)
        out = {a: np.asarray(arr[a][:]) for a in ARRAYS if a != "keys"}
        out["keys"] = _keys(arr["keys"])
        return out

    def nbytes_stored(self, name: str) -> int:
        g = self.root[name]
        return int(sum(g[a].nbytes_stored() for a in g.array_keys()))

    def nbytes_raw(self, name: str) -> int:
        """Uncompressed bytes of a shard group's arrays (format 1 string keys: their UTF-8 bytes)."""
        g = self.root[name]
        total = 0
        for a in g.array_keys():
            arr = g[a]
            if a == "keys" and _is_string_keys(arr):
                total += int(sum(len(str(k).encode()) for k in arr[:]))
            else:
                total += int(np.prod(arr.shape)) * np.dtype(arr.dtype.to_native_dtype() if hasattr(arr.dtype, "to_native_dtype") else arr.dtype).itemsize
        return total


class CacheWriter:
    """Creates a cache or opens one for more shards. Refuses a cache made with other settings.

    A shard group is written by one writer only and marked ``complete`` after all its arrays are
    written; an incomplete group found later is deleted and rewritten.
    """

    def __init__(self, path: str, manifest: dict, storage_options: dict | None = None):
        self.path = str(path)
        self.storage_options = storage_options
        if manifest.get("format_version") != FORMAT_VERSION:
            raise KdcacheError(
                f"CacheWriter writes cache format {FORMAT_VERSION} only, the manifest says "
                f"{manifest.get('format_version')!r}; build it with make_manifest()"
            )
        self.manifest = manifest
        self.root = self._create_or_open()

    def _create_or_open(self):
        path = self.path
        local = path[len("file://") :] if path.startswith("file://") else path
        exists = os.path.exists(local) if _is_local(path) else self._remote_exists()
        if exists and _is_local(path) and os.path.isdir(local) and not os.listdir(local):
            exists = False  # an empty directory is fine to create into
        if not exists:
            try:
                # The manifest goes into the group's first write, so a process that opens the
                # store a moment later (another --shard-index group) never sees it without one.
                kw = {"storage_options": self.storage_options} if self.storage_options else {}
                zarr.open_group(path, mode="w-", zarr_format=3, attributes={"kdcache": self.manifest}, **kw)
                return _open_root(path, "r+", self.storage_options)
            except FileExistsError:
                pass  # another process created it first: open and compare below
        if _is_local(path) and os.path.exists(local) and not os.path.isdir(local):
            raise KdcacheError(f"output path {path} is a file, not a kdcache store; choose another --out")
        try:
            _, old = open_manifest(path, self.storage_options)
        except KdcacheError as e:
            raise KdcacheError(f"refusing to write into {path}: {e}. Choose an empty or new --out path.") from None
        if old.get("format_version") != FORMAT_VERSION:
            made_by = old.get("kdcache_version")
            raise KdcacheError(
                f"refusing to write into {path}: the cache was made by an older kdcache "
                f"({made_by or 'unknown release'}, cache format {old.get('format_version')}) and this kdcache "
                f"({__version__}) writes format {FORMAT_VERSION} only, so it cannot add shards to it. Finish it "
                f"with the kdcache release that started it{f' ({made_by})' if made_by else ''}, or precompute "
                "into a new --out path. The cache stays readable for train, inspect and verify."
            )
        diffs = manifest_differences(old, self.manifest)
        if diffs:
            raise KdcacheError(
                f"the cache at {path} was made with other settings; refusing to mix them:\n  "
                + "\n  ".join(diffs)
                + "\nUse a new --out path, or re-run with the cache's settings to resume it."
            )
        return _open_root(path, "r+", self.storage_options)

    def _remote_exists(self) -> bool:
        try:
            open_manifest(self.path, self.storage_options)
            return True
        except KdcacheError:
            return False

    def is_complete(self, name: str) -> bool:
        return name in set(self.root.group_keys()) and bool(self.root[name].attrs.get("complete", False))

    def write_shard(
        self,
        name: str,
        *,
        source: str,
        keys,
        size: np.ndarray,
        logprobs: np.ndarray,
        classes: np.ndarray,
        box: np.ndarray,
        flip: np.ndarray,
        mix_with: np.ndarray,
        mix_lam: np.ndarray,
        bad: dict[str, str] | None = None,
        render: dict | None = None,
    ) -> None:
        """Write one whole shard group, then mark it complete. Replaces an incomplete group."""
        keys = list(keys)
        n = len(keys)
        V, k = int(self.manifest["views"]), int(self.manifest["topk"])
        shapes = {
            "size": (size, (n, 2)), "logprobs": (logprobs, (n, V, k)), "classes": (classes, (n, V, k)),
            "box": (box, (n, V, 4)), "flip": (flip, (n, V)), "mix_with": (mix_with, (n, V)),
            "mix_lam": (mix_lam, (n, V)),
        }
        for a, (arr, shape) in shapes.items():
            if tuple(arr.shape) != shape:
                raise ValueError(f"write_shard({name!r}): {a} has shape {arr.shape}, expected {shape}")
        key_rows = encode_keys(keys)  # refuses a key that cannot round-trip, before touching the store
        g = self.root.create_group(name, overwrite=True)
        g.attrs.update({"source": source, "num_samples": n, "complete": False})
        rows = max(n, 1)
        max_side = int(size.max()) if n else 0

        def put(aname, data, dtype, codec, attributes=None):
            shape = data.shape
            per_view = len(shape) >= 2 and aname not in ("keys", "size")
            chunks = (rows, 1) + shape[2:] if per_view else (rows,) + shape[1:]
            shards = (rows,) + shape[1:] if per_view else None
            arr = g.create_array(aname, shape=shape, chunks=chunks, shards=shards, dtype=dtype, compressors=codec,
                                 attributes=attributes)
            if n:
                arr[...] = data.astype(dtype, copy=False)

        put("keys", key_rows, np.uint8, _INT, attributes=dict(KEYS_ATTRS))
        put("size", np.asarray(size), np.int32, _INT)
        put("logprobs", np.asarray(logprobs), np.float16, _FLOAT)
        put("classes", np.asarray(classes), class_dtype(int(self.manifest["teacher"]["num_classes"])), _INT)
        put("box", np.asarray(box), box_dtype(max_side), _INT)
        put("flip", np.asarray(flip), np.bool_, _INT)
        put("mix_with", np.asarray(mix_with), np.int32, _INT)
        put("mix_lam", np.asarray(mix_lam), np.float16, _FLOAT)
        # Only now, with every array on disk, does the group count as done.
        g.attrs.update({"bad": dict(bad or {}), "render": render or self.manifest.get("render"), "complete": True})
