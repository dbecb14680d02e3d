"""The manifest: what a cache is (format, teacher, views, targets, layout), made, compared and opened."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import zarr

from .. import encoding as enc
from .class_coding import PER_GROUP
from ...errors import KdcacheError
from ...version import __version__
from ..targets import kind_of, MAX_SAMPLES, TARGET_KINDS


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
    out = {"layout": "compact", "classes": PER_GROUP, "geometry": "derived"}
    if kind == "topk":
        out["logprob_step"] = enc.LOGPROB_STEP
    return out


def layout_of(manifest: dict) -> str:
    """A cache's layout: ``plain`` (every cache before format 3) or ``compact``."""
    return str((manifest.get("encoding") or {}).get("layout", "plain"))


def layout_arrays(manifest: dict, coding: str = "image_list") -> tuple[str, ...]:
    """The arrays a shard group of a cache holds, in the order they are written (``coding``: a compact
    group's class coding, ``class_coding.coding_of`` its attributes)."""
    kind, k = kind_of(manifest), int(manifest["topk"])
    if layout_of(manifest) == "plain":
        targets = ("logprobs", "classes") if kind == "topk" else ("classes", "counts")
        return ("keys", "size") + targets + GEOMETRY
    ids = ("classes",) if coding == "direct" else ("class_list", "class_code")
    if kind == "topk":
        return ("keys", "size") + ids + (("logprob_steps",) if k > 1 else ()) + ("topk_logmass",)
    return ("keys", "size") + ids + ("counts",)


def manifest_differences(old: dict, new: dict, fields: tuple[str, ...] = MATCHED_FIELDS) -> list[str]:
    """Human-readable lines for each of ``fields`` where two manifests disagree (and the render backend)."""
    out = []
    for name in fields:
        a, b = old.get(name), new.get(name)
        if name == "compute" and old.get("format_version") == 1:
            continue  # format 1 did not record it (and a format-1 cache is never written to again)
        if name in ("targets", "encoding") and old.get("format_version", FORMAT_VERSION) < 3:
            continue  # formats 1 and 2 did not record them (and are never written to again)
        if name == "shards":  # the same shards listed in another order are the same data
            a, b = sorted(a or []), sorted(b or [])
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            if name == "teacher" and isinstance(a, dict) and isinstance(b, dict) and ("members" in a or "members" in b):
                out += member_differences(a, b)
            elif isinstance(a, dict) and isinstance(b, dict):
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


def members_of(teacher_entry: dict, resolution: int) -> list[dict]:
    """A manifest ``teacher`` entry as its list of member entries, each with its ``resolution``
    (a single teacher's entry is one member at the cache's resolution)."""
    if "members" in teacher_entry:
        return [dict(m) for m in teacher_entry["members"]]
    return [{**teacher_entry, "resolution": int(resolution)}]


def member_differences(old: dict, new: dict) -> list[str]:
    """Where two ``teacher`` entries disagree when either is an ensemble: the member count, or each
    member's changed fields, named by position (``teacher.members[2].weights_sha256``, from 1)."""
    a, b = old.get("members"), new.get("members")
    if not isinstance(a, list) or not isinstance(b, list) or len(a) != len(b):
        count = lambda m: len(m) if isinstance(m, list) else 1  # noqa: E731 - a single teacher is one member
        return [f"teacher: the cache's ensemble has {count(a)} member(s) ({_member_specs(old)}), this run "
                f"{count(b)} ({_member_specs(new)})"]
    out = [f"teacher.{k}: cache has {old.get(k)!r}, this run has {new.get(k)!r}"
           for k in sorted(set(old) | set(new)) if k != "members" and old.get(k) != new.get(k)]
    for n, (x, y) in enumerate(zip(a, b), 1):
        for sub in sorted(set(x) | set(y)):
            if x.get(sub) != y.get(sub):
                out.append(f"teacher.members[{n}].{sub}: cache has {x.get(sub)!r}, this run has {y.get(sub)!r}")
    return out


def _member_specs(entry: dict) -> str:
    members = entry.get("members") if isinstance(entry.get("members"), list) else [entry]
    return ", ".join(str(m.get("spec")) for m in members)


# The manifest fields that decide what a group's stored bytes mean: its format, the teacher (its
# class count types and bounds the class ids; its identity and normalisation are what verify re-runs),
# the views' sampler (a compact group re-derives its geometry from the seed and augmentation), V,
# k, the resolution, how the teacher ran (the batches verify re-composes), the targets (kind,
# draws, temperature) and their encoding (layout, the log-probs' step), and the render backend
# (which pixels a box stands for). Every group records them at creation (RECORD_ATTR, canonical
# JSON text) and its view digests cover that text, so a manifest edited later is named on open.

def open_root(path: str, mode: str, storage_options: dict | None):
    kw = {"storage_options": storage_options} if storage_options else {}
    return zarr.open_group(str(path), mode=mode, zarr_format=3, **kw)


def arrays_of(group) -> dict:
    """A group's arrays by name. A folder without its zarr.json is no array: zarr warns about it, and
    kdcache names it as missing instead (one error line, no warning first)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Object at .* is not recognized as a component")
        return dict(group.arrays())


def is_local(path: str) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def open_manifest(path: str, storage_options: dict | None = None):
    """Open an existing cache read-only and return (root group, manifest). Validates the format."""
    path = str(path)
    if is_local(path):
        local = path[len("file://") :] if path.startswith("file://") else path
        if not os.path.exists(local):
            raise KdcacheError(f"no cache at {path}: the path does not exist (run `kdcache precompute` first)")
        if not os.path.isfile(os.path.join(local, "zarr.json")):
            raise KdcacheError(f"{path} is not a kdcache store: it has no zarr.json (not a Zarr v3 group)")
    try:
        root = open_root(path, "r", storage_options)
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
