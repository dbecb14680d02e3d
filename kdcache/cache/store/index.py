"""The index of complete groups: what a reader of remote storage needs about every complete group,
in a few JSON files instead of several requests per group.

``<cache>/.index/<writer token>-<n>.json`` (a segment) holds, for each group its writer completed::

    {"kdcache_index": 1, "groups": {"<group>": {
        "attrs":  the group's attributes as written with ``complete: true``,
        "arrays": {"<array>": the array's zarr.json (shape, dtype, codecs, ...)},
        "files":  {"<key relative to the group>": size in bytes}   # every array file at completion
    }}}

A writer rewrites its current segment with one put after each group it completes (after the
group's ``complete: true`` is stored, so an entry never names a group that was not complete) and
starts a new segment every ``SEGMENT_GROUPS`` groups, so a segment stays small and a reader reads
one listing of ``.index/`` plus one segment per ``SEGMENT_GROUPS`` groups.

Two segments may hold the same group (it was grown to more views, or deleted and redone): the
entry with more views wins (``preferred_entry``), and it is still only believed under the rule below.

Staleness rule: an entry is believed only as far as the files it records are still there, each
with the recorded size. A reader compares them with the file listing it takes anyway before
reading a group's data (one recursive listing of the cache on remote storage) and drops the entry
when any differs or is missing: the group is then read the way a cache without an index is (its
own zarr.json, its arrays' metadata), which names whatever is damaged. Groups without an entry
(written by a kdcache before the index, or whose writer was killed before its segment was put)
are read that way too. The index is an accelerator: deleting ``.index/`` loses nothing.
"""

from __future__ import annotations

import json

INDEX_DIR = ".index"
INDEX_VERSION = 1
SEGMENT_GROUPS = 64  # groups per segment


def group_entry(attrs: dict, arrays: dict, files: dict[str, int | None]) -> dict:
    """The index entry of one complete group: its attributes, its arrays' metadata (as zarr.json
    documents, built from the array handles without a read) and its arrays' files with sizes."""
    from zarr.core.buffer import default_buffer_prototype

    meta = {a: json.loads(arr.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())
            for a, arr in arrays.items()}
    return {"attrs": dict(attrs), "arrays": meta,
            "files": {k: v for k, v in files.items() if k != "zarr.json" and v is not None}}


def segment_bytes(groups: dict) -> bytes:
    return json.dumps({"kdcache_index": INDEX_VERSION, "groups": groups}, sort_keys=True).encode()


def read_index(fs, base: str) -> dict[str, dict]:
    """Every entry of every readable segment of a remote cache ({group: entry}): one listing of
    ``.index/`` and one read per segment. A segment that does not parse (cut by a killed writer on
    a store without atomic puts) is skipped: its groups are read without the index."""
    d = f"{base.rstrip('/')}/{INDEX_DIR}"
    try:
        names = sorted(fs.ls(d, detail=False))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    out: dict[str, dict] = {}
    for p in names:
        if not str(p).endswith(".json"):
            continue
        try:
            doc = json.loads(fs.cat_file(p))
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or doc.get("kdcache_index") != INDEX_VERSION:
            continue
        for name, entry in (doc.get("groups") or {}).items():
            if isinstance(entry, dict) and (entry.get("attrs") or {}).get("complete") is True:
                out[name] = entry if name not in out else preferred_entry(out[name], entry)
    return out


def entry_views(entry: dict) -> int:
    """The view count an entry's group had when it completed (0 for groups that did not record one)."""
    try:
        return int((entry.get("attrs") or {}).get("views", 0))
    except (TypeError, ValueError):
        return 0


def preferred_entry(a: dict, b: dict) -> dict:
    """Of two entries for one group (segments of two writers: the group was grown to more views, or
    redone), the one with more views; ``a`` (the earlier segment read) on a tie. Either is still
    checked against the file listing before it is believed."""
    return b if entry_views(b) > entry_views(a) else a


def entry_matches(entry: dict, files: dict[str, int | None]) -> bool:
    """Whether a group's listing (``files``: key relative to the group -> size) still holds every
    file the entry recorded, each with its recorded size (the staleness rule)."""
    recorded = entry.get("files") or {}
    return bool(recorded) and all(files.get(k, -1) == size for k, size in recorded.items())


def open_arrays(root, name: str, entry: dict) -> dict:
    """The group's arrays as zarr Array handles built from the entry's metadata (no read)."""
    from zarr import Array
    from zarr.core.array import AsyncArray
    from zarr.core.metadata.v3 import ArrayV3Metadata

    return {a: Array(AsyncArray(metadata=ArrayV3Metadata.from_dict(dict(m)), store_path=root.store_path / f"{name}/{a}"))
            for a, m in entry["arrays"].items()}
