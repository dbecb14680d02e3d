"""Per-view digests of what a cache stores, and the digest of a run's targets."""

from __future__ import annotations

import hashlib

import numpy as np



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
    have none). A compact group's class coding is not hashed (a group grown to more views may change
    coding and keeps its digests): the decoded class ids are, whichever coding held them. Plain top-k
    groups without a record keep format 2's digest."""
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

def targets_digest(groups: dict[str, list[str]]) -> str:
    """One sha256 for a whole cache's targets: over its groups' view digests, in group order."""
    h = hashlib.sha256()
    for name in sorted(groups):
        h.update(f"{name}:{','.join(groups[name])};".encode())
    return h.hexdigest()
