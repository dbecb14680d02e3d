"""Decode records: the manifest fields every group is written with, so an edited manifest is named as an edit."""

from __future__ import annotations

import json

from ...errors import KdcacheError


DECODE_FIELDS = ("format_version", "teacher", "augmentation", "seed", "views", "topk", "resolution", "compute",
                 "targets", "encoding")
RECORD_ATTR = "decode_record"
# A group's own view count. Its decode record leaves V out (the group attribute says it), so that
# nothing a group's view digests cover depends on V: a group grown to more views keeps the digests
# of the views it had (growth.py). Groups written before it record V in their decode record.
VIEWS_ATTR = "views"
# How many of the manifest's listed groups a reader looks at on open for a record to compare with.
RECORD_PROBES = 4


def decode_record(manifest: dict) -> dict:
    """The manifest's decode-relevant fields (``DECODE_FIELDS``, and ``render.backend``) in JSON types."""
    rec = {name: manifest.get(name) for name in DECODE_FIELDS}
    rec["render"] = {"backend": str((manifest.get("render") or {}).get("backend", "pil"))}
    return json.loads(json.dumps(rec))


def decode_record_text(manifest: dict) -> str:
    """``decode_record`` without ``views``, as canonical JSON text (sorted keys, no spaces, UTF-8 as is):
    what a group stores in ``RECORD_ATTR`` and what its view digests begin with. V is the group's own
    ``VIEWS_ATTR``, compared with the manifest by ``record_problem`` like the record's fields."""
    rec = {k: v for k, v in decode_record(manifest).items() if k != "views"}
    return json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def written_record(attrs: dict) -> dict:
    """What a group was written with, as ``decode_record`` gives it for a manifest: its stored record,
    with V from its ``VIEWS_ATTR`` when the record leaves it out. ValueError when the record does not parse."""
    stored = json.loads(attrs.get(RECORD_ATTR))
    if not isinstance(stored, dict):
        raise ValueError("not an object")
    if "views" not in stored and VIEWS_ATTR in attrs:
        stored["views"] = attrs[VIEWS_ATTR]
    return stored


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
        stored = written_record(attrs)
    except (TypeError, ValueError) as e:
        return (f"cache group {name!r} of {where}: its {RECORD_ATTR} attribute is damaged ({e}); the group's "
                "zarr.json was edited or damaged. Restore it, or delete the group and re-run precompute")
    current = decode_record(manifest)
    if manifest.get("growing"):  # groups hold V_old or V while a precompute run grows the cache (growth.py)
        stored.pop("views", None)
        current.pop("views")
    a, b = _leaves(stored), _leaves(current)
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
