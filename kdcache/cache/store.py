"""The cache: a Zarr v3 group holding the teacher's targets and the views they were taken on.

Layout (format version 3, the default "plain" layout of top-k targets)::

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

The manifest's ``targets`` says what the targets are (``topk``, or ``sample``: classes drawn from
the teacher with their ``counts`` in place of ``logprobs``) and its ``encoding`` how they are laid
out: ``plain`` (above) or ``compact`` (``precompute --compact``: log-probs quantised against the
top-1 with the top-k mass kept, class ids coded against a per-image class list, geometry not
stored but re-derived from the seeded sampler; ``kdcache.cache.encoding``). Whatever the layout,
``CacheReader`` returns the same decoded arrays (``ARRAYS``, plus ``counts`` for sampled targets).

Every per-view array is chunked one chunk per view and packed into one Zarr shard, so a shard
group is a handful of files and an epoch reads one small chunk per array. Each group records a
SHA-256 per view (``view_digests``) and the manifest's decode-relevant fields (``decode_record``,
which the digests cover): a value or manifest field edited later is refused by name.
``docs/format.md`` describes the semantics in full.

Format version 2 is version 3's plain top-k layout without the manifest's ``targets`` and
``encoding``. Format version 1 also stored ``keys`` as a (N,) Zarr ``string`` (vlen-utf8) array,
which tensorstore cannot open. Both are still read; they are not written to any more.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import socket
import time
import uuid
import warnings
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from ..version import __version__
from .claims import (  # noqa: F401  (CLAIM_* and the errors are part of the store's API)
    CLAIM_GRACE_S, CLAIM_LEASE_S, CLAIM_REFRESH_S, CLAIMS_DIR, ClaimLostError, ShardClaim, ShardClaimedError,
    describe_holder, read_claim, take_claim,
)
from . import encoding as enc
from ..errors import KdcacheError
from .targets import MAX_SAMPLES, TARGET_KINDS, kind_of, log_weights

FORMAT_VERSION = 3
MAX_COUNT = MAX_SAMPLES  # sampled targets: draws per record (stored counts are uint8, 255 is the fill value)
# Cache formats this release reads. Version 2 is version 3's plain top-k layout without the
# manifest's targets and encoding; version 1 differs from 2 only in the keys array (Zarr string).
READ_VERSIONS = (1, 2, 3)
# Array attributes of the keys array (version 2): how a plain-zarr user decodes its rows.
KEYS_ATTRS = {"encoding": "utf-8, zero-padded"}
# What the reader returns for every cache (decoded, whatever the layout); sampled targets add "counts".
ARRAYS = ("keys", "size", "logprobs", "classes", "box", "flip", "mix_with", "mix_lam")
GEOMETRY = ("box", "flip", "mix_with", "mix_lam")
LAYOUTS = ("plain", "compact")
# Manifest fields that must agree before more shards are written into an existing cache.
MATCHED_FIELDS = ("teacher", "augmentation", "seed", "views", "topk", "resolution", "shards", "compute", "targets",
                  "encoding")

_FLOAT = BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle)
_INT = BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.bitshuffle)
# The compact layout's codes: small integers in bytes, where zstd's own entropy coder does best.
_CODES = ZstdCodec(level=19)
_CLASS_LIST = BloscCodec(cname="zstd", clevel=9, shuffle=BloscShuffle.shuffle)
_LOGMASS = BloscCodec(cname="zstd", clevel=9, shuffle=BloscShuffle.bitshuffle)
# Every chunk also carries a CRC-32C of its compressed bytes: Blosc alone decodes a truncated or
# corrupted chunk into garbage without an error (seen for the unsharded `keys` and `size`).
_CRC = Crc32cCodec()


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
    targets: dict | None = None,
    encoding: dict | None = None,
) -> dict:
    """The cache's manifest (stored as ``attrs["kdcache"]`` of the root group).

    ``compute`` records how the teacher ran: ``{"batch_size": int, "device": "cpu"|"cuda",
    "precision": "fp32"|"bf16"}`` (None when the caller does not say). ``targets`` is
    ``targets.targets_record(...)`` (default top-k; for sampled targets ``topk`` is the width of a
    record, ``targets.slots``), ``encoding`` is ``encoding_record(...)`` (default plain).
    """
    targets = dict(targets) if targets is not None else {"kind": "topk"}
    encoding = dict(encoding) if encoding is not None else encoding_record("plain", targets["kind"])
    if targets.get("kind") not in TARGET_KINDS:
        raise ValueError(f"targets kind must be one of {TARGET_KINDS}, got {targets.get('kind')!r}")
    if encoding.get("layout") not in LAYOUTS:
        raise ValueError(f"encoding layout must be one of {LAYOUTS}, got {encoding.get('layout')!r}")
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
        "targets": targets,
        "encoding": encoding,
    }


def encoding_record(layout: str = "plain", kind: str = "topk") -> dict:
    """The manifest's ``encoding`` entry: the plain layout, or the compact one with its parameters."""
    if layout == "plain":
        return {"layout": "plain"}
    out = {"layout": "compact", "classes": "image_list", "geometry": "derived"}
    if kind == "topk":
        out["logprob_step"] = enc.LOGPROB_STEP
    return out


def layout_of(manifest: dict) -> str:
    """A cache's layout: ``plain`` (every cache before format 3) or ``compact``."""
    return str((manifest.get("encoding") or {}).get("layout", "plain"))


def layout_arrays(manifest: dict) -> tuple[str, ...]:
    """The arrays every shard group of a cache holds, in the order they are written."""
    kind, k = kind_of(manifest), int(manifest["topk"])
    if layout_of(manifest) == "plain":
        targets = ("logprobs", "classes") if kind == "topk" else ("classes", "counts")
        return ("keys", "size") + targets + GEOMETRY
    if kind == "topk":
        return ("keys", "size", "class_list", "class_code") + (("logprob_steps",) if k > 1 else ()) + ("topk_logmass",)
    return ("keys", "size", "class_list", "class_code", "counts")


def manifest_differences(old: dict, new: dict) -> list[str]:
    """Human-readable lines for each matched field where two manifests disagree."""
    out = []
    for name in MATCHED_FIELDS:
        a, b = old.get(name), new.get(name)
        if name == "compute" and old.get("format_version") == 1:
            continue  # format 1 did not record it (and a format-1 cache is never written to again)
        if name in ("targets", "encoding") and old.get("format_version", FORMAT_VERSION) < 3:
            continue  # formats 1 and 2 did not record them (and are never written to again)
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
    # The render backend (not its version or device type: those may differ per group, as PIL's
    # flavour may) is matched: a cache is replayed with the one backend that made it.
    a, b = (str((m.get("render") or {}).get("backend", "pil")) for m in (old, new))
    if a != b:
        out.append(f"render.backend: cache has {a!r}, this run has {b!r} (--render)")
    return out


# The manifest fields that decide what a group's stored bytes mean: its format, the teacher (its
# class count types and bounds the class ids; its identity and normalisation are what verify re-runs),
# the views' sampler (a compact group re-derives its geometry from the seed and augmentation), V,
# k, the resolution, how the teacher ran (the batches verify re-composes), the targets (kind,
# draws, temperature) and their encoding (layout, the log-probs' step), and the render backend
# (which pixels a box stands for). Every group records them at creation (RECORD_ATTR, canonical
# JSON text) and its view digests cover that text, so a manifest edited later is named on open.
DECODE_FIELDS = ("format_version", "teacher", "augmentation", "seed", "views", "topk", "resolution", "compute",
                 "targets", "encoding")
RECORD_ATTR = "decode_record"
# How many of the manifest's listed groups a reader looks at on open for a record to compare with.
RECORD_PROBES = 4


def decode_record(manifest: dict) -> dict:
    """The manifest's decode-relevant fields (``DECODE_FIELDS``, and ``render.backend``) in JSON types."""
    rec = {name: manifest.get(name) for name in DECODE_FIELDS}
    rec["render"] = {"backend": str((manifest.get("render") or {}).get("backend", "pil"))}
    return json.loads(json.dumps(rec))


def decode_record_text(manifest: dict) -> str:
    """``decode_record`` as canonical JSON text (sorted keys, no spaces, UTF-8 as is): what a group stores
    in ``RECORD_ATTR`` and what its view digests begin with."""
    return json.dumps(decode_record(manifest), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


_ABSENT = object()


def _leaves(x, prefix: str = "") -> dict:
    """A JSON value as {dotted path: leaf}; lists and scalars are leaves."""
    if isinstance(x, dict) and x:
        out = {}
        for k, v in x.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: x}


def record_problem(manifest: dict, attrs: dict, name: str, where: str) -> str | None:
    """One line when group ``name`` (attributes ``attrs``) was written with other decode-relevant
    manifest fields than ``manifest`` holds now (an edited manifest), naming the fields; None when
    they agree or the group records none (written before records existed: not covered)."""
    text = attrs.get(RECORD_ATTR)
    if text is None:
        return None
    try:
        stored = json.loads(text)
        if not isinstance(stored, dict):
            raise ValueError("not an object")
    except (TypeError, ValueError) as e:
        return (f"cache group {name!r} of {where}: its {RECORD_ATTR} attribute is damaged ({e}); the group's "
                "zarr.json was edited or damaged. Restore it, or delete the group and re-run precompute")
    a, b = _leaves(stored), _leaves(decode_record(manifest))
    diffs = [p for p in sorted(set(a) | set(b)) if a.get(p, _ABSENT) != b.get(p, _ABSENT)]
    # a field removed (or emptied) on one side shows as its leaves on the other: name those
    diffs = [p for p in diffs if not any(q.startswith(p + ".") for q in diffs)]
    if not diffs:
        return None

    def show(v):
        return "absent" if v is _ABSENT else json.dumps(v)

    first = diffs[0]
    more = f" (and {len(diffs) - 1} more fields differ: {', '.join(diffs[1:4])}{' ...' if len(diffs) > 4 else ''})"
    return (f"cache {where}: manifest field {first} was edited after precompute: the manifest says "
            f"{show(b.get(first, _ABSENT))}, shard group {name!r} was written with {show(a.get(first, _ABSENT))}"
            f"{more if len(diffs) > 1 else ''}. The stored values would be read with other parameters than they were "
            f"written with; restore {first} to {show(a.get(first, _ABSENT))} in the cache's root zarr.json, or "
            "re-run precompute into a new cache")


def probe_record(root, manifest: dict, where: str) -> None:
    """Compare the manifest with the decode record of the first of its listed groups that exists
    (at most RECORD_PROBES looked at: one attribute read on a healthy cache); KdcacheError on an edit."""
    for name in list(manifest.get("shards") or [])[:RECORD_PROBES]:
        try:
            attrs = dict(root[str(name)].attrs)
        except Exception:  # missing, or a damaged group that its own reader will name
            continue
        problem = record_problem(manifest, attrs, str(name), where)
        if problem:
            raise KdcacheError(problem)
        return


def _open_root(path: str, mode: str, storage_options: dict | None):
    kw = {"storage_options": storage_options} if storage_options else {}
    return zarr.open_group(str(path), mode=mode, zarr_format=3, **kw)


def _arrays_of(group) -> dict:
    """A group's arrays by name. A folder without its zarr.json is no array: zarr warns about it, and
    kdcache names it as missing instead (one error line, no warning first)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Object at .* is not recognized as a component")
        return dict(group.arrays())


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
    logprobs: np.ndarray  # (N, k) float16 (float32 from a compact or sampled cache)
    classes: np.ndarray  # (N, k) int (-1 in the unused slots of sampled targets)
    box: np.ndarray  # (N, 4) int
    flip: np.ndarray  # (N,) bool
    mix_with: np.ndarray  # (N,) int32
    mix_lam: np.ndarray  # (N,) float16
    bad: frozenset
    counts: np.ndarray | None = None  # (N, k) uint8 for sampled targets (logprobs then holds log(counts / N))

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


DIGEST_ATTR = "view_digests"  # group attribute: one sha256 per view of the records' targets and geometry


def view_digest(keys, size, logprobs, classes, box, flip, mix_with, mix_lam) -> str:
    """sha256 of one view of a shard group: the keys and image sizes of every record, and that
    view's top-k log-probs and classes, box, flip and mixup partner and weight, each in a fixed
    dtype. Precompute records it; every read checks it, so a value edited after precompute (by
    hand, a tool, a bit flip) is found by the first reader of that view. (The digest of plain top-k
    groups; ``digest_of`` covers every layout.)"""
    return _digest(keys, size, [(logprobs, "<f2"), (classes, "<i8")], box, flip, mix_with, mix_lam)


def _digest(keys, size, targets, box, flip, mix_with, mix_lam, record: str | None = None) -> str:
    h = hashlib.sha256()
    if record is not None:  # the group's decode record (RECORD_ATTR), then a newline
        h.update(record.encode("utf-8") + b"\n")
    h.update("\n".join(str(k) for k in keys).encode("utf-8"))
    for arr, dtype in [(size, "<i4")] + list(targets) + [(box, "<i8"), (flip, "u1"), (mix_with, "<i4"),
                                                           (mix_lam, "<f2")]:
        a = np.ascontiguousarray(np.asarray(arr).astype(dtype, copy=False))
        h.update(f"|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def digest_of(kind: str, layout: str, d: dict, j: int, record: str | None = None) -> str:
    """The digest of view column ``j`` of decoded group data ``d`` (``CacheReader`` output, which
    for a compact group also holds the stored codes). It covers what the student is given: the
    targets as stored (the log-probs of a compact group through their codes and top-k mass, from
    which decoding is a fixed function; sampled targets through their counts), the decoded class
    ids and the geometry (re-derived for a compact group), so an edit of any stored value, or a
    sampler that no longer draws the stored geometry, changes it. ``record``: the group's decode
    record (``RECORD_ATTR``), which the digest then covers too (groups written before it existed
    have none). Plain top-k groups without a record keep format 2's digest."""
    if kind == "sample":
        targets = [(d["counts"][:, j], "u1"), (d["classes"][:, j], "<i8")]
    elif layout == "compact":
        steps = d.get("logprob_steps")
        steps = steps[:, j] if steps is not None else np.zeros((len(d["keys"]), 0), np.uint8)
        targets = [(steps, "u1"), (d["topk_logmass"][:, j], "<f2"), (d["classes"][:, j], "<i8")]
    else:
        targets = [(d["logprobs"][:, j], "<f2"), (d["classes"][:, j], "<i8")]
    return _digest(d["keys"], d["size"], targets, d["box"][:, j], d["flip"][:, j], d["mix_with"][:, j],
                   d["mix_lam"][:, j], record)


def derived_views(manifest: dict, where: str, name: str, keys, size, bad, views):
    """The views of a compact group, which does not store them: ``views.sample_shard_views`` on the
    manifest's seed and augmentation, as precompute drew them (a record listed in ``bad`` or without
    a size gets none). ``views`` is V or a list of view indices; ``where`` names the cache in errors."""
    from ..data.views import SAMPLER_VERSION, AugSpec, sample_shard_views

    aug = AugSpec.from_dict(manifest["augmentation"])
    if aug.version != SAMPLER_VERSION:
        raise KdcacheError(
            f"cache {where} does not store its views (precompute --compact): they were drawn by view sampler "
            f"version {aug.version} and this kdcache has version {SAMPLER_VERSION}, so it cannot re-derive them. "
            "Read the cache with the kdcache release that made it")
    size = np.asarray(size)
    valid = np.array([str(k) not in bad for k in keys], dtype=bool) & (size[:, 0] >= 0)
    return sample_shard_views(int(manifest["seed"]), name, [str(k) for k in keys], size, views, aug, valid=valid)


def targets_digest(groups: dict[str, list[str]]) -> str:
    """One sha256 for a whole cache's targets: over its groups' view digests, in group order."""
    h = hashlib.sha256()
    for name in sorted(groups):
        h.update(f"{name}:{','.join(groups[name])};".encode())
    return h.hexdigest()


def nonfinite_records(logprobs, valid) -> list[tuple[int, int]]:
    """(record, view column) of every good record (``valid``) whose top-k log-probs hold NaN or
    +inf: values no teacher output has (-inf is a probability of 0, or float16 underflow)."""
    lp = np.asarray(logprobs)
    with np.errstate(invalid="ignore"):
        hit = (np.isnan(lp) | np.isposinf(lp)).any(-1) & np.asarray(valid, dtype=bool)[:, None]
    return [(int(i), int(j)) for i, j in np.argwhere(hit)]


def _keys(keys_array) -> np.ndarray:
    """The keys as a plain numpy unicode array, from either format's keys array."""
    if _is_string_keys(keys_array):  # format 1: zarr returns numpy's variable-width strings
        return np.array([str(k) for k in keys_array[:]], dtype=str)
    return decode_keys(np.asarray(keys_array[:]))


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


def _box_fill(dtype) -> int:
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


def _blosc_cut(arrays: dict, files: dict[str, int | None], read_head) -> tuple[str, str] | None:
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


def _head_reader(path: str, name: str, fs=None):
    """read_head(key) for the files of one group: the first 16 bytes."""
    if _is_local(path):
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


def _list_files(root, path: str, name: str, fs=None) -> dict[str, int | None]:
    """Every file under a group (keys relative to it, '/'-separated) with its size: one listing."""
    if _is_local(path):
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


def _list_all_groups(fs, base: str) -> dict[str, dict[str, int | None]]:
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


def _fsspec(path: str, storage_options: dict | None):
    """(filesystem, root path) of a remote cache, for listings with sizes; None when unavailable."""
    if _is_local(path):
        return None
    try:
        import fsspec

        return fsspec.core.url_to_fs(path, **(storage_options or {}))
    except Exception:
        return None


def _damaged(what: str, e: BaseException) -> KdcacheError:
    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, IsADirectoryError)):
        return KdcacheError(f"cannot read {what}: I/O error ({type(e).__name__}: {e}); check the storage, then re-run")
    detail = f"{type(e).__name__}: {e}"
    if len(detail) > 300:
        detail = detail[:300] + "..."
    return KdcacheError(
        f"cannot read {what}: the stored data is damaged ({detail}); re-run precompute on that shard after "
        "deleting the group, or restore it"
    )


class CacheReader:
    """Read access to a cache (local path or fsspec URL). Opening validates the format.

    A complete shard group is validated once, when first read: its arrays, their shapes, and that
    every array's data files are really there (one listing of the group). Any array read that
    fails to decode raises a KdcacheError naming the cache, the group and the array. Every view read
    is checked against the digest precompute recorded (``view_digest``), so an edited value is an
    error naming the group and view (``check_digests=False`` reads it anyway; ``digest_problems``
    lists mismatches without raising).
    """

    def __init__(self, path: str, storage_options: dict | None = None, check_digests: bool = True,
                 check_values: bool = True):
        self.path = str(path)
        self.check_digests = check_digests  # False: read views whose content no longer matches its digest
        self.check_values = check_values  # False: also read top-k log-probs that are NaN or +inf (inspect)
        self.root, self.manifest = open_manifest(self.path, storage_options)
        self.format_version = int(self.manifest["format_version"])
        self.kind = kind_of(self.manifest)  # "topk" or "sample"
        self.layout = layout_of(self.manifest)  # "plain" or "compact"
        self.arrays = layout_arrays(self.manifest)
        self._fs = _fsspec(self.path, storage_options)
        probe_record(self.root, self.manifest, self.path)  # an edited manifest is named before anything is read
        self._groups: set[str] = set()  # shard groups seen so far (groups are never removed)
        self._valid: dict[str, tuple[int, dict, dict]] = {}  # complete shard -> (N, arrays, attrs)
        # Complete groups as the shard listing read them (their metadata is read there anyway, and a
        # complete group never changes): shard_attrs, is_complete and the first read reuse them.
        self._complete_nodes: dict = {}
        self._listed_groups = 0  # groups whose files were listed (remote: the second lists them all)
        self._all_files: dict[str, dict[str, int | None]] | None = None

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
    def logprob_step(self) -> float:
        """The quantisation step of a compact top-k cache's log-probs (nats); 0.0 where they are stored
        as they are (plain layout) or there are none (sampled targets)."""
        if self.layout != "compact" or self.kind != "topk":
            return 0.0
        return float(self.manifest["encoding"].get("logprob_step", enc.LOGPROB_STEP))

    @property
    def samples(self) -> int | None:
        """N, the draws per record of a sampled cache (None for top-k)."""
        return int(self.manifest["targets"]["samples"]) if self.kind == "sample" else None

    @property
    def class_names(self) -> list[str] | None:
        return self.manifest.get("class_names")

    def shard_names(self) -> list[str]:
        """Shard groups present in the store (complete or not), sorted."""
        with warnings.catch_warnings():
            # zarr warns about anything in the root that is not a node: `.claims/` is kdcache's own
            warnings.filterwarnings("ignore", message=r"Object at \..* is not recognized as a component")
            try:
                nodes = dict(self.root.groups())
                self._groups = set(nodes)
                self._complete_nodes.update({n: g for n, g in nodes.items() if g.attrs.get("complete", False)})
            except Exception:  # a group whose zarr.json does not parse: list without reading them,
                self._groups = set(self._child_nodes())  # and let shard_attrs name the damaged one
        return sorted(self._groups)

    def _child_nodes(self) -> list[str]:
        from zarr.core.sync import sync

        store, base = self.root.store_path.store, self.root.store_path.path

        async def listing():
            names = [n async for n in store.list_dir(base)]
            keep = []
            for n in names:
                if not n.startswith(".") and await store.exists(f"{base}/{n}/zarr.json".lstrip("/")):
                    keep.append(n)
            return keep

        return sync(listing())

    def has_shard(self, name: str) -> bool:
        # A name not seen yet: open that group alone (one metadata read) rather than list every group
        # (a read per group), so a reader that needs a few groups (a data worker) reads only those.
        if name in self._groups:
            return True
        try:
            node = self.root[name]
        except KeyError:
            return False
        except Exception:  # its zarr.json does not parse: the listing copes, and shard_attrs names it
            return name in set(self.shard_names())
        if not isinstance(node, zarr.Group):
            return False
        self._groups.add(name)
        if node.attrs.get("complete", False):
            self._complete_nodes[name] = node
        return True

    def shard_attrs(self, name: str) -> dict:
        if name in self._valid:
            return dict(self._valid[name][2])
        if name not in self._complete_nodes and not self.has_shard(name):
            raise KdcacheError(f"cache {self.path} has no shard group {name!r} (run precompute on that shard)")
        if name in self._complete_nodes:  # (has_shard keeps a complete group it opened)
            return dict(self._complete_nodes[name].attrs)
        try:
            return dict(self.root[name].attrs)
        except Exception as e:
            raise _damaged(f"the metadata of cache group {name!r} in {self.path}", e) from None

    def is_complete(self, name: str) -> bool:
        if name in self._valid or name in self._complete_nodes:
            return True
        if not self.has_shard(name):
            return False
        if name in self._complete_nodes:  # has_shard just opened it
            return True
        try:
            return bool(dict(self.root[name].attrs).get("complete", False))
        except ValueError:  # its zarr.json does not parse: it cannot say complete (precompute redoes it)
            return False

    def check_shard(self, name: str) -> int:
        """Validate one complete shard group's arrays (presence, shapes, dtypes, data files).
        Returns N.

        A complete group never changes, so it is validated once per reader and its array
        handles are kept for the reads that follow.
        """
        return self._open_shard(name)[0]

    def _open_shard(self, name: str) -> tuple[int, dict, dict]:
        if name in self._valid:
            return self._valid[name]
        attrs = self.shard_attrs(name)
        problem = record_problem(self.manifest, attrs, name, self.path)
        if problem:
            raise KdcacheError(problem)
        if not attrs.get("complete", False):
            raise KdcacheError(
                f"shard {name!r} in cache {self.path} is incomplete (precompute was interrupted); "
                "re-run the same `kdcache precompute` command to finish it"
            )
        try:
            present = _arrays_of(self._complete_nodes[name] if name in self._complete_nodes else self.root[name])
        except Exception as e:
            raise _damaged(f"the arrays' metadata of cache group {name!r} in {self.path}", e) from None
        names = self.arrays
        missing = [a for a in names if a not in present]
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
                    f"shard {name!r} array 'keys' is {keys.dtype}, expected uint8 (cache format {self.format_version}); "
                    "the store is damaged"
                )
        cl = present.get("class_list")
        u = int(cl.shape[1]) if cl is not None and len(cl.shape) == 2 and cl.shape[1] >= 1 else 1
        expect = {
            "keys": keys_shape, "size": (n, 2), "logprobs": (n, V, k), "classes": (n, V, k), "counts": (n, V, k),
            "box": (n, V, 4), "flip": (n, V), "mix_with": (n, V), "mix_lam": (n, V), "class_list": (n, u),
            "class_code": (n, V, k), "logprob_steps": (n, V, k - 1), "topk_logmass": (n, V),
        }
        for a in names:
            if tuple(present[a].shape) != expect[a]:
                raise KdcacheError(
                    f"shard {name!r} array {a!r} has shape {tuple(present[a].shape)}, expected {expect[a]} "
                    f"(num_samples={n}, views={V}, topk={k}); the store is damaged"
                )
        want_dtype = {"logprobs": np.float16, "counts": np.uint8, "logprob_steps": np.uint8,
                      "topk_logmass": np.float16, "class_code": enc.code_dtype(u)}
        for a, dt in want_dtype.items():
            if a in present and a in names and np.dtype(present[a].dtype) != np.dtype(dt):
                raise KdcacheError(f"shard {name!r} array {a!r} is {present[a].dtype}, expected {np.dtype(dt)}")
        try:
            files, shared = self._group_files(name)
            lost = missing_data(present, files, n, k, attrs, names)
            if lost is not None and shared:  # the cache's listing may predate the group: list it alone
                files = _list_files(self.root, self.path, name, self._fs)
                lost = missing_data(present, files, n, k, attrs, names)
        except Exception as e:
            raise _damaged(f"the file listing of cache group {name!r} in {self.path}", e) from None
        if lost is None and not attrs.get(EVERY_CHUNK_ATTR):  # an older group: no checksums
            read_head = _head_reader(self.path, name, self._fs)
            if read_head is not None:
                try:
                    cut = _blosc_cut(present, files, read_head)
                except Exception as e:
                    raise _damaged(f"the chunk files of cache group {name!r} in {self.path}", e) from None
                if cut is not None:
                    raise KdcacheError(
                        f"cannot read array {cut[0]!r} of cache group {name!r} in {self.path}: the stored data is "
                        f"damaged ({cut[1]}); re-run precompute on that shard after deleting the group, or restore it"
                    )
        if lost is not None:
            a, why = lost
            raise KdcacheError(
                f"cache group {name!r} in {self.path} has no data for array {a!r} ({why}): the cache is damaged; "
                "re-run precompute on that shard after deleting the group, or restore it"
            )
        self._valid[name] = (n, {a: present[a] for a in names}, attrs)
        if self._all_files is not None:
            self._all_files.pop(name, None)  # checked: its part of the listing is not needed again
        return self._valid[name]

    def _group_files(self, name: str) -> tuple[dict[str, int | None], bool]:
        """(every file of group ``name`` with its size, whether it comes from the listing of the whole
        cache). A remote cache lists its first group on its own and, from the second on, takes one
        listing of every group (``_list_all_groups``): checking all groups of a cache then costs
        about one list request per 1000 files instead of one per group. A group missing from that
        listing (written since) is listed on its own."""
        self._listed_groups += 1
        if self._fs is not None and self._listed_groups >= 2:
            if self._all_files is None:
                self._all_files = _list_all_groups(*self._fs)
            if name in self._all_files:
                return self._all_files[name], True
        return _list_files(self.root, self.path, name, self._fs), False

    def group_nbytes(self, name: str) -> int | None:
        """Bytes stored under one group (every chunk and metadata file), from the same listing the
        completeness check uses; None where the store lists names without sizes."""
        files, _ = self._group_files(name)
        if any(size is None for size in files.values()):
            return None
        return int(sum(files.values()))

    def _read(self, name: str, aname: str, fn):
        """Run one array read; a decode or I/O error becomes a KdcacheError naming the array."""
        try:
            return fn()
        except KdcacheError as e:  # decoded, but not valid (a key that is not UTF-8)
            raise KdcacheError(f"cannot read array {aname!r} of cache group {name!r} in {self.path}: {e}") from None
        except Exception as e:
            raise _damaged(f"array {aname!r} of cache group {name!r} in {self.path}", e) from None

    def keys(self, name: str) -> np.ndarray:
        """The sample keys of a complete shard group, in tar order."""
        arr = self._open_shard(name)[1]["keys"]
        return self._read(name, "keys", lambda: _keys(arr))

    def sizes(self, name: str) -> np.ndarray:
        """(N, 2) source image (height, width) of a complete shard group; (-1, -1) for bad images."""
        arr = self._open_shard(name)[1]["size"]
        return self._read(name, "size", lambda: np.asarray(arr[:]))

    # -- reading and decoding --

    def _stored(self, name: str, view: int | None) -> dict[str, np.ndarray]:
        """The group's arrays as stored; per-view arrays cut to view ``view`` (kept as a column of
        one) or all views (None)."""
        _, arr, _ = self._open_shard(name)
        out = {}
        for a in self.arrays:
            if a == "keys":
                out[a] = self._read(name, a, lambda: _keys(arr["keys"]))
            elif a in ("size", "class_list") or view is None:
                out[a] = self._read(name, a, lambda a=a: np.asarray(arr[a][:]))
            else:
                out[a] = self._read(name, a, lambda a=a: np.asarray(arr[a][:, view : view + 1]))
        return out

    def _decode(self, name: str, st: dict, view: int | None) -> dict[str, np.ndarray]:
        """Decoded arrays (``ARRAYS``, plus ``counts`` for sampled targets) from stored ones. A compact
        group's stored codes stay in the result too (the digest covers them)."""
        d = dict(st)
        if self.layout == "compact":
            codes = st["class_code"]
            try:
                d["classes"] = enc.decode_classes(codes, st["class_list"]).astype(np.int64)
            except Exception as e:
                raise _damaged(f"array 'class_code' of cache group {name!r} in {self.path}", e) from None
            if self.kind == "topk":
                steps = st.get("logprob_steps")
                if steps is None:
                    steps = np.zeros(codes.shape[:2] + (0,), np.uint8)
                d["logprobs"] = enc.dequantise_logprobs(steps, st["topk_logmass"], self.logprob_step).astype(np.float32)
            d.update(self._geometry(name, d["keys"], d["size"], view))
        if self.kind == "sample":
            d["classes"] = np.where(st["counts"] > 0, d["classes"], -1)
            d["logprobs"] = log_weights(st["counts"], self.samples)
        return d

    def _geometry(self, name: str, keys, size, view: int | None) -> dict[str, np.ndarray]:
        """The views of a compact group, re-derived (``derived_views``)."""
        bad = self._open_shard(name)[2].get("bad") or {}
        sv = derived_views(self.manifest, self.path, name, keys, size, bad,
                           list(range(self.views)) if view is None else [view])
        max_side = int(np.asarray(size).max()) if len(keys) else 0
        return {"box": sv.box.astype(box_dtype(max_side)), "flip": sv.flip, "mix_with": sv.mix_with,
                "mix_lam": sv.mix_lam}

    def read_view(self, name: str, view: int) -> ViewRecords:
        """View ``view`` of every record in shard ``name``: one chunk read per array."""
        _, _, attrs = self._open_shard(name)
        if not 0 <= view < self.views:
            raise KdcacheError(f"view {view} is out of range; cache {self.path} holds views 0..{self.views - 1}")
        d = self._decode(name, self._stored(name, view), view)
        if self.check_digests:
            self._check_digest(name, view, attrs, d, 0)
        if self.check_values:
            self.check_finite(name, d, [view])
        rec = ViewRecords(
            shard=name, view=view, keys=d["keys"], size=d["size"], logprobs=d["logprobs"][:, 0],
            classes=d["classes"][:, 0], box=d["box"][:, 0], flip=d["flip"][:, 0], mix_with=d["mix_with"][:, 0],
            mix_lam=d["mix_lam"][:, 0], bad=frozenset(attrs.get("bad", {})),
            counts=d["counts"][:, 0] if "counts" in d else None,
        )
        good = np.array([k not in rec.bad for k in rec.keys], dtype=bool)
        if good.any():
            ids = rec.classes[good]
            if rec.counts is not None:
                ids = ids[rec.counts[good] > 0]
            if len(ids) and (ids.min() < 0 or ids.max() >= self.num_classes):
                raise KdcacheError(
                    f"cache group {name!r} of {self.path}: array 'classes' holds class id {int(ids.max()) if ids.max() >= self.num_classes else int(ids.min())} "
                    f"in view {view}, outside the manifest's {self.num_classes} classes: the cache is damaged or its "
                    "manifest was edited; re-run precompute")
        return rec

    def view_digests(self, name: str) -> list[str] | None:
        """The digests precompute recorded for a group's views (None for caches made before them)."""
        d = self._open_shard(name)[2].get(DIGEST_ATTR)
        return list(d) if d is not None else None

    def digest_problems(self, name: str, data: dict | None = None) -> list[int]:
        """The views of a group whose content no longer matches its recorded digest (all read)."""
        want = self.view_digests(name)
        if want is None:
            return []
        got = self.computed_digests(name, data)
        return [v for v in range(self.views) if got[v] != want[v]]

    def computed_digests(self, name: str, data: dict | None = None) -> list[str]:
        """The digest of every view of a group as its data (``data``: all views decoded, default read
        here) is now; ``view_digests`` are the ones precompute recorded."""
        d = data if data is not None else CacheReader._read_all(self, name)
        record = self._open_shard(name)[2].get(RECORD_ATTR)
        return [digest_of(self.kind, self.layout, d, v, record) for v in range(self.views)]

    def _check_digest(self, name: str, view: int, attrs: dict, d: dict, j: int) -> None:
        want = attrs.get(DIGEST_ATTR)
        if want is None or digest_of(self.kind, self.layout, d, j, attrs.get(RECORD_ATTR)) == want[view]:
            return
        raise KdcacheError(
            f"cache group {name!r} of {self.path}: view {view} does not match the digest precompute recorded for it: "
            "its targets or geometry were changed after precompute (edited by hand or by a tool, or damaged). "
            "Re-run precompute on that shard (delete the group first), or pass --allow-edited-cache to use the "
            "changed values knowingly")

    def read_shard(self, name: str) -> dict[str, np.ndarray]:
        """Every array of one shard group, all views, decoded (each view checked against its digest)."""
        out = self._read_all(name)
        if self.check_digests:
            bad = self.digest_problems(name, out)
            if bad:
                self._check_digest(name, bad[0], self._open_shard(name)[2], out, bad[0])
        if self.check_values:
            self.check_finite(name, out)
        return out

    def check_finite(self, name: str, d: dict | None = None, views: list[int] | None = None) -> None:
        """Refuse (KdcacheError) top-k log-probs that are NaN or +inf in a good record of group
        ``name`` (decoded data ``d`` of view columns ``views``; default: all read here): a cache
        written by a kdcache that did not check its teacher's outputs. ``read_view`` and
        ``read_shard`` call it unless ``check_values`` is off. (Sampled counts cannot show a
        non-finite teacher: ``verify`` finds it by re-running the teacher.)"""
        if self.kind != "topk":
            return
        d = d if d is not None else self._read_all(name)
        views = views if views is not None else list(range(self.views))
        bad = frozenset(self._open_shard(name)[2].get("bad") or {})
        valid = np.array([str(k) not in bad for k in d["keys"]], dtype=bool)
        hits = nonfinite_records(d["logprobs"], valid)
        if not hits:
            return
        i, j = hits[0]
        more = f" (and {len(hits) - 1} more records)" if len(hits) > 1 else ""
        raise KdcacheError(
            f"cache group {name!r} of {self.path}: the stored log-probs of key {str(d['keys'][i])!r} view {views[j]} "
            f"are not finite (NaN or +inf){more}: no teacher output is. The cache was written by a kdcache that did "
            "not check its teacher's outputs (a damaged checkpoint, float16 overflow); fix the teacher and re-run "
            "precompute on that shard (delete the group first)")

    def _read_all(self, name: str) -> dict[str, np.ndarray]:
        """Every array of one shard group, all views, decoded, not checked against the digests."""
        return self._decode(name, self._stored(name, None), None)

    def nbytes_stored(self, name: str) -> int:
        g = self.root[name]
        return int(sum(g[a].nbytes_stored() for a in g.array_keys()))

    def nbytes_raw(self, name: str) -> int:
        """Uncompressed bytes of a shard group's arrays (format 1 string keys: their UTF-8 bytes).
        A group already read uses the array handles its check opened (no metadata read again)."""
        if name in self._valid:
            arrays = self._valid[name][1]
        else:
            g = self.root[name]
            arrays = {a: g[a] for a in g.array_keys()}
        total = 0
        for a, arr in arrays.items():
            if a == "keys" and _is_string_keys(arr):
                total += int(sum(len(str(k).encode()) for k in arr[:]))
            else:
                total += int(np.prod(arr.shape)) * np.dtype(arr.dtype.to_native_dtype() if hasattr(arr.dtype, "to_native_dtype") else arr.dtype).itemsize
        return total


# ---- root creation -----------------------------------------------------------------------------

# zarr-python's LocalStore writes a key to "<stem>.<uuid4 hex>.partial" and renames it into place
# (zarr/storage/_local.py, _atomic_write): a kill in between leaves one of these.
_ZARR_PARTIAL = re.compile(r"zarr\.[0-9a-f]{32}\.partial")
_OWN_TMP = re.compile(r"\.kdcache-root\.[0-9a-f]{32}\.(tmp|damaged)")


def _root_json_state(path: str) -> str:
    """'missing', 'damaged' (empty or not JSON: its writer died mid-write) or 'ok' (parses)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return "missing"
    try:
        json.loads(raw)
    except ValueError:
        return "damaged"
    return "ok" if raw.strip() else "damaged"


def _group_json(attributes: dict) -> bytes:
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.group import GroupMetadata

    meta = GroupMetadata(attributes=attributes, zarr_format=3)
    return meta.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CacheWriter:
    """Creates a cache or opens one for more shards. Refuses a cache made with other settings.

    A shard group is written by one writer only (``claim``) and marked ``complete`` after all its
    arrays are written and found on disk; an incomplete group found later is rewritten, a
    complete one never is.

    How a writer uses claims (precompute)::

        writer = CacheWriter(out, manifest)
        try:
            for name in my_shards:
                claim = writer.claim(name)      # before any work on the shard
                if claim is None:               # complete, or another live writer has it
                    continue
                ...                             # teacher batches; every <= CLAIM_REFRESH_S seconds:
                writer.refresh_claims()         #   (or claim.refresh()); ClaimLostError: stop that shard
                writer.write_shard(name, ..., claim=claim)   # checks, writes, verifies, completes, releases
        finally:
            writer.release_claims()             # claims of shards not written (an error, Ctrl-C)

    A process killed while holding claims leaves their files; the next run takes them over (same
    host: the pid is gone; other host: after CLAIM_LEASE_S without a refresh).
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
        self.local = _is_local(self.path)
        local_dir = self.path[len("file://") :] if self.path.startswith("file://") else self.path
        self._dir = local_dir if self.local else None
        self._fs = _fsspec(self.path, storage_options)
        self._claims: dict[str, ShardClaim] = {}
        self.kind, self.layout = kind_of(manifest), layout_of(manifest)
        self.arrays = layout_arrays(manifest)
        self.record = decode_record_text(manifest)  # every group records it (RECORD_ATTR)
        self.root = self._create_or_open()

    # -- creating or opening the root --

    def _create_or_open(self):
        path = self.path
        if self.local:
            self._create_local()
        else:
            exists = self._remote_exists()
            if not exists:
                try:
                    # The manifest goes into the group's first write, so a process that opens the
                    # store a moment later (another --shard-index group) never sees it without one.
                    kw = {"storage_options": self.storage_options} if self.storage_options else {}
                    zarr.open_group(path, mode="w-", zarr_format=3, attributes={"kdcache": self.manifest}, **kw)
                    return _open_root(path, "r+", self.storage_options)
                except FileExistsError:
                    self._repair_remote_root()
        try:
            root, old = open_manifest(path, self.storage_options)
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
            with warnings.catch_warnings():  # `.claims/` is kdcache's own, not a zarr node
                warnings.filterwarnings("ignore", message=r"Object at \..* is not recognized as a component")
                try:
                    started = any(True for _ in root.group_keys())
                except Exception:  # noqa: BLE001 - a damaged group is still a started cache
                    started = True
            advice = ("Use a new --out path, or re-run with the cache's settings to resume it." if started else
                      f"It holds no shard group yet (an earlier run stopped before its first): delete {path} and "
                      "re-run, or use a new --out path.")
            raise KdcacheError(
                f"the cache at {path} was made with other settings; refusing to mix them:\n  "
                + "\n  ".join(diffs) + "\n" + advice
            )
        root = _open_root(path, "r+", self.storage_options)
        probe_record(root, old, path)  # an edited manifest: never add groups written with the edit
        return root

    def _create_local(self) -> None:
        """Create the root group of a local cache atomically, unless it exists.

        Creation counts as not done yet when the directory holds nothing but what a creator that
        died leaves: zarr's temporary ``zarr.<hex>.partial`` files, kdcache's own temporary files,
        or a root zarr.json that is empty or not JSON (with no shard group beside it). Anything
        else is left for open_manifest to accept or refuse; nothing of the user's is removed.
        The new zarr.json is written to a temporary file, synced, and hard-linked into place:
        the link fails if another process created it first, and nobody ever sees it half written.
        """
        d = self._dir
        if os.path.exists(d) and not os.path.isdir(d):
            raise KdcacheError(f"output path {self.path} is a file, not a kdcache store; choose another --out")
        for _ in range(100):
            try:
                entries = os.listdir(d)
            except FileNotFoundError:
                os.makedirs(d, exist_ok=True)
                continue
            leftovers = [e for e in entries if _ZARR_PARTIAL.fullmatch(e) or _OWN_TMP.fullmatch(e)]
            rest = [e for e in entries if e not in leftovers]
            root_json = os.path.join(d, "zarr.json")
            if rest == ["zarr.json"] and _root_json_state(root_json) == "damaged":
                # Written in place by a writer that died: set it aside under a unique name (one
                # process's rename wins), and drop it unless it turned valid meanwhile.
                aside = os.path.join(d, f".kdcache-root.{uuid.uuid4().hex}.damaged")
                try:
                    os.rename(root_json, aside)
                except FileNotFoundError:
                    continue
                if _root_json_state(aside) == "ok":  # another process created it just now
                    try:
                        os.link(aside, root_json)
                    except FileExistsError:
                        pass
                os.unlink(aside)
                continue
            if rest:
                return  # an existing store, or something else: open_manifest decides
            tmp = os.path.join(d, f".kdcache-root.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(_group_json({"kdcache": self.manifest}))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, root_json)
                created = True
            except FileExistsError:
                created = False  # another process created it first: open and compare
            except FileNotFoundError:
                continue  # a creator that won cleaned up our temporary file as a leftover: look again
            finally:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
            if created:
                _fsync_dir(d)
                for e in leftovers:  # what earlier, killed creators left
                    try:
                        os.unlink(os.path.join(d, e))
                    except (FileNotFoundError, IsADirectoryError, PermissionError):
                        pass
            return
        raise KdcacheError(f"could not create the cache at {self.path}: its directory keeps changing; re-run")

    def _repair_remote_root(self) -> None:
        """A remote path that exists: when all it holds is an empty or unparseable zarr.json (a
        writer died writing it), write it again; anything else is left for open_manifest."""
        if self._fs is None:
            return
        fs, base = self._fs
        try:
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)]
            if names != ["zarr.json"]:
                return
            raw = fs.cat_file(f"{base.rstrip('/')}/zarr.json")
        except Exception:
            return
        try:
            json.loads(raw)
            if raw.strip():
                return
        except ValueError:
            pass
        fs.pipe_file(f"{base.rstrip('/')}/zarr.json", _group_json({"kdcache": self.manifest}))

    def _remote_exists(self) -> bool:
        try:
            open_manifest(self.path, self.storage_options)
            return True
        except KdcacheError:
            return False

    # -- groups: state, claims --

    def _group_state(self, name: str) -> tuple[bool, tuple[str, str] | None]:
        """(marked complete, (array, what is missing) or None). Not marked: (False, None)."""
        try:
            attrs = dict(self.root[name].attrs)
        except KeyError:
            return False, None
        except ValueError:  # its zarr.json is empty or cut (written in place by a writer that died):
            return False, None  # it cannot say complete, so it is redone
        except OSError as e:
            raise _damaged(f"the metadata of cache group {name!r} in {self.path}", e) from None
        if not attrs.get("complete", False):
            return False, None
        try:
            files = _list_files(self.root, self.path, name, self._fs)
        except Exception as e:
            return True, ("?", f"its files cannot be listed: {type(e).__name__}: {e}")
        return True, missing_data_quick(files, int(attrs.get("num_samples", -1)), int(self.manifest["topk"]), attrs,
                                        self.arrays)

    def is_complete(self, name: str) -> bool:
        """Marked complete *and* every array's data files are there: one read of the group's
        attributes and one listing of its files (the arrays' metadata is not read; CacheReader
        checks every chunk key exactly when it first reads the group)."""
        done, lost = self._group_state(name)
        return done and lost is None

    def _damaged_complete(self, name: str, lost: tuple[str, str]) -> KdcacheError:
        a, why = lost
        return KdcacheError(
            f"cache group {name!r} in {self.path} is marked complete but has no data for array {a!r} ({why}): "
            "the cache is damaged. kdcache never overwrites a complete group: delete the group's directory "
            f"({name}/) and re-run to redo it, or restore it"
        )

    def claim(self, name: str) -> ShardClaim | None:
        """Claim shard group ``name`` for writing, atomically across processes and machines
        sharing the filesystem. Returns None when the group is complete or a live writer holds
        it. A claim whose holder is dead (same host: its pid is gone; other host: not refreshed
        for CLAIM_LEASE_S) is taken over. Raises KdcacheError for a group marked complete whose
        data is missing (damaged: it is never overwritten).

        On a remote (fsspec) cache there is no atomic create: the claim returned is not
        exclusive (``exclusive`` False) and one writer per group is up to the caller.
        """
        done, lost = self._group_state(name)
        if done:
            if lost is not None:
                raise self._damaged_complete(name, lost)
            return None
        if not self.local:
            return ShardClaim(name=name, token=uuid.uuid4().hex, path=None, host=socket.gethostname(),
                              pid=os.getpid(), started=time.time())
        claim, _ = take_claim(os.path.join(self._dir, CLAIMS_DIR), name)
        if claim is None:
            return None
        done, lost = self._group_state(name)  # finished by another writer between our look and our claim
        if done:
            claim.release()
            if lost is not None:
                raise self._damaged_complete(name, lost)
            return None
        self._claims[name] = claim
        return claim

    def holder(self, name: str) -> dict | None:
        """Who holds the claim on a group (the claim file's JSON), or None."""
        if not self.local:
            return None
        got = read_claim(os.path.join(self._dir, CLAIMS_DIR, name))
        return got[0] if got else None

    def clear_stale_claims(self) -> list[str]:
        """Remove claims that outlived their holder on groups that are complete (a writer killed
        between completing a group and releasing its claim). Returns those groups."""
        if not self.local:
            return []
        from .claims import clear_stale

        return clear_stale(os.path.join(self._dir, CLAIMS_DIR), lambda name: self._group_state(name)[0])

    def refresh_claims(self) -> None:
        """Refresh every claim this writer holds (call at least every CLAIM_REFRESH_S seconds)."""
        for name, c in list(self._claims.items()):
            if c.released:
                del self._claims[name]
            else:
                c.refresh()

    def release_claims(self) -> None:
        """Release every claim this writer still holds (at exit, after an error)."""
        for c in self._claims.values():
            c.release()
        self._claims.clear()

    # -- writing --

    def write_shard(
        self,
        name: str,
        *,
        source: str,
        keys,
        size: np.ndarray,
        classes: np.ndarray,
        box: np.ndarray,
        flip: np.ndarray,
        mix_with: np.ndarray,
        mix_lam: np.ndarray,
        logprobs: np.ndarray | None = None,
        counts: np.ndarray | None = None,
        bad: dict[str, str] | None = None,
        render: dict | None = None,
        claim: ShardClaim | None = None,
    ) -> None:
        """Write one whole shard group, check that every array's data is on disk, then mark it
        complete and release the claim. Replaces an incomplete group; raises KdcacheError for a
        complete one (never overwritten).

        Targets: top-k ``logprobs`` (float32 or float16, descending) and ``classes``, or for a sampled
        cache ``classes`` and ``counts`` (-1 / 0 in unused slots). The geometry is always given; a
        compact cache does not store it, and refuses geometry the seeded sampler would not draw.

        ``claim`` is the group's claim from ``claim(name)``; it is checked before the group is
        touched and again before it is marked complete, and released at the end (also when the
        write fails). Without one, the group is claimed here for the duration of the write, and
        ShardClaimedError says that another live writer holds it.
        """
        keys = list(keys)
        n = len(keys)
        V, k = int(self.manifest["views"]), int(self.manifest["topk"])
        given = {"logprobs": logprobs, "counts": counts}
        need = "logprobs" if self.kind == "topk" else "counts"
        if given[need] is None:
            raise ValueError(f"write_shard({name!r}): a {self.kind} cache needs {need}")
        shapes = {
            "size": (size, (n, 2)), need: (given[need], (n, V, k)), "classes": (classes, (n, V, k)),
            "box": (box, (n, V, 4)), "flip": (flip, (n, V)), "mix_with": (mix_with, (n, V)),
            "mix_lam": (mix_lam, (n, V)),
        }
        for a, (arr, shape) in shapes.items():
            if tuple(np.shape(arr)) != shape:
                raise ValueError(f"write_shard({name!r}): {a} has shape {np.shape(arr)}, expected {shape}")
        key_rows = encode_keys(keys)  # refuses a key that cannot round-trip, before touching the store
        stored, decoded = self._encode(name, keys, np.asarray(size), np.asarray(classes), given[need], box, flip,
                                       mix_with, mix_lam, bad or {})
        if claim is None:
            claim = self.claim(name)
            if claim is None:
                done, _ = self._group_state(name)
                if done:  # a ShardClaimedError too: another writer finished it, nothing to do
                    raise ShardClaimedError(
                        f"shard group {name!r} in cache {self.path} is already complete; kdcache never "
                        "overwrites a complete group"
                    )
                raise ShardClaimedError(
                    f"shard group {name!r} in cache {self.path} is claimed by another writer "
                    f"({describe_holder(self.holder(name))}); it is left to that writer"
                )
        elif claim.name != name:
            raise KdcacheError(f"write_shard({name!r}): the claim is for group {claim.name!r}, not {name!r}")
        elif claim.exclusive != self.local or (
            claim.exclusive
            and os.path.abspath(claim.path) != os.path.abspath(os.path.join(self._dir, CLAIMS_DIR, name))
        ):
            raise KdcacheError(f"write_shard({name!r}): the claim is not one of this cache ({self.path})")
        try:
            claim.check()
            done, _ = self._group_state(name)
            if done:
                raise KdcacheError(
                    f"shard group {name!r} in cache {self.path} is already complete; kdcache never overwrites "
                    "a complete group"
                )
            try:
                self._write_arrays(name, source, n, {"keys": key_rows, **stored})
            except OSError as e:  # a full disk, a quota: the CLI names the place it happened
                if e.filename is None:
                    e.filename = f"{self.path.rstrip('/')}/{name}"
                raise
            g = self.root[name]
            # Only with every array's data on disk, and the claim still ours, does the group count as done.
            arrays = _arrays_of(g)
            files = _list_files(self.root, self.path, name, self._fs)
            extra = sorted(set(arrays) - set(self.arrays))
            lost = missing_data(arrays, files, n, k, {EVERY_CHUNK_ATTR: True}, self.arrays)
            if lost is not None or extra:
                what = (f"array {lost[0]!r} is missing after it was written ({lost[1]})" if lost
                        else f"it holds other arrays {extra}")
                raise KdcacheError(
                    f"cache group {name!r} in {self.path}: {what}; the group is left incomplete. Is another process "
                    "writing into this cache without claims? Re-run to redo the group"
                )
            claim.check()
            digests = [digest_of(self.kind, self.layout, decoded, v, self.record) for v in range(V)]
            g.attrs.update({"bad": dict(bad or {}), "render": render or self.manifest.get("render"),
                            DIGEST_ATTR: digests, "complete": True})
        finally:
            claim.release()
            self._claims.pop(name, None)

    def _encode(self, name, keys, size, classes, values, box, flip, mix_with, mix_lam, bad) -> tuple[dict, dict]:
        """(arrays to store but the keys, the decoded data a reader will get, for the digests).
        ``values`` are the top-k log-probs or the sampled counts."""
        n, V = len(keys), int(self.manifest["views"])
        num_classes = int(self.manifest["teacher"]["num_classes"])
        cdt = class_dtype(num_classes)
        geometry = {"box": np.asarray(box), "flip": np.asarray(flip, dtype=bool),
                    "mix_with": np.asarray(mix_with, dtype=np.int32), "mix_lam": np.asarray(mix_lam, dtype=np.float16)}
        classes = np.asarray(classes, dtype=np.int64)
        decoded = {"keys": np.array([str(k) for k in keys], dtype=str), "size": np.asarray(size, dtype=np.int32),
                   **geometry}
        if self.kind == "sample":
            counts = np.asarray(values)
            if counts.size and (counts.min() < 0 or counts.max() > MAX_COUNT):
                raise ValueError(f"write_shard({name!r}): counts must lie in 0..{MAX_COUNT}")
            counts = counts.astype(np.uint8)
            classes = np.where(counts > 0, classes, -1)  # an unused slot holds no class
            targets = {"counts": counts}
            decoded.update(counts=counts, classes=classes)
            weights = counts.astype(np.float64)
        else:
            lp = np.asarray(values)
            valid = np.array([str(k) not in bad for k in keys], dtype=bool)
            hits = nonfinite_records(lp, valid)
            if hits:
                i, j = hits[0]
                raise KdcacheError(
                    f"write_shard({name!r}): the log-probs of key {str(keys[i])!r} view {j} hold NaN or +inf"
                    f"{f' (and {len(hits) - 1} more records)' if len(hits) > 1 else ''}: not a teacher's output, "
                    "nothing of the group was written")
            targets = {"logprobs": lp.astype(np.float16)}
            decoded.update(logprobs=targets["logprobs"], classes=classes)
            weights = np.exp(lp.astype(np.float64))
        if self.layout == "plain":
            return {"size": np.asarray(size), **targets, "classes": classes.astype(cdt), **geometry}, decoded
        # compact: geometry must be the seeded sampler's, since it is re-derived on every read
        sv = derived_views(self.manifest, self.path, name, keys, size, bad, V)
        for a, want in (("box", sv.box), ("flip", sv.flip), ("mix_with", sv.mix_with), ("mix_lam", sv.mix_lam)):
            if not np.array_equal(np.asarray(geometry[a]).astype(np.float64), np.asarray(want).astype(np.float64)):
                raise KdcacheError(
                    f"write_shard({name!r}): the given {a} differs from the views the seeded sampler draws for this "
                    "cache's seed and augmentation; a compact cache does not store its views, it re-derives them, so "
                    "it can only hold the sampler's views")
        lists = enc.image_class_lists(classes, weights)
        class_list = enc.pad_lists(lists, cdt)
        codes = enc.encode_classes(classes, class_list)
        stored = {"size": np.asarray(size), "class_list": class_list, "class_code": codes}
        if self.kind == "sample":
            stored["counts"] = targets["counts"]
        else:
            steps, logmass = enc.quantise_logprobs(lp, float(self.manifest["encoding"]["logprob_step"]))
            if lp.shape[-1] > 1:
                stored["logprob_steps"] = steps
            stored["topk_logmass"] = logmass
            decoded.update(logprob_steps=steps, topk_logmass=logmass)
        decoded["classes"] = enc.decode_classes(codes, class_list)
        if not np.array_equal(classes, decoded["classes"]):
            raise KdcacheError(f"write_shard({name!r}): the class codes do not decode to the classes (a bug)")
        return stored, decoded

    def _write_arrays(self, name, source, n, data: dict) -> None:
        g = self.root.create_group(name, overwrite=True)
        g.attrs.update({"source": source, "num_samples": n, "complete": False, EVERY_CHUNK_ATTR: True,
                        RECORD_ATTR: self.record})
        rows = max(n, 1)
        size = data["size"]
        max_side = int(size.max()) if n else 0
        num_classes = int(self.manifest["teacher"]["num_classes"])

        def put(aname, arr, dtype, codec, attributes=None):
            shape = arr.shape
            per_view = len(shape) >= 2 and aname not in ("keys", "size", "class_list")
            chunks = (rows, 1) + shape[2:] if per_view else (rows,) + shape[1:]
            shards = (rows,) + shape[1:] if per_view else None
            if aname == "box":
                fill = _box_fill(dtype)
            elif aname == "class_code":  # above every code and the missing code (encoding.code_dtype)
                fill = int(np.iinfo(dtype).max)
            else:
                fill = FILL_VALUES[aname]
            out = g.create_array(aname, shape=shape, chunks=chunks, shards=shards, dtype=dtype,
                                 compressors=(codec, _CRC), attributes=attributes, fill_value=fill,
                                 config={"write_empty_chunks": True})
            if n:
                out[...] = arr.astype(dtype, copy=False)

        specs = {
            "keys": (np.uint8, _INT), "size": (np.int32, _INT), "logprobs": (np.float16, _FLOAT),
            "classes": (class_dtype(num_classes), _INT), "counts": (np.uint8, _INT),
            "box": (box_dtype(max_side), _INT), "flip": (np.bool_, _INT), "mix_with": (np.int32, _INT),
            "mix_lam": (np.float16, _FLOAT), "class_list": (class_dtype(num_classes), _CLASS_LIST),
            "class_code": (None, _CODES), "logprob_steps": (np.uint8, _CODES), "topk_logmass": (np.float16, _LOGMASS),
        }
        for aname in self.arrays:
            dtype, codec = specs[aname]
            arr = np.asarray(data[aname])
            if aname == "class_code":
                dtype = enc.code_dtype(data["class_list"].shape[1])
            put(aname, arr, dtype, codec, attributes=dict(KEYS_ATTRS) if aname == "keys" else None)
