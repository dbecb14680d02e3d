"""Growing a cache's views in place: ``precompute --views`` larger than the cache's.

View v of an image is a pure function of (seed, key, v) and the teacher, never of V, so a cache
of V_old views grows to V by computing views V_old … V−1 of every group and rewriting the group
with all V. What makes that safe:

- every group records its own V (``VIEWS_ATTR``) and its decode record leaves V out, so nothing its
  view digests cover depends on V: a group at V_old stays valid and readable, and its views keep
  their digests when it grows;
- the manifest says V (the target) and carries ``growing: {"from": V_old}`` from the moment the
  first growing run opens the cache until every listed group holds V; readers (train, verify,
  inspect) refuse the cache in between, naming the run to finish;
- a group is grown by the ordinary write path (``complete: false``, all arrays, then ``complete:
  true``): a kill leaves at worst an incomplete group, which the next run redoes at V from scratch.
"""

from __future__ import annotations

from ...errors import KdcacheError
from .records import VIEWS_ATTR

GROWING = "growing"  # manifest field, present only while a precompute run grows the cache's views


def group_views(attrs: dict, manifest: dict) -> int:
    """V of one group: its own attribute, else the manifest's (groups written before it existed)."""
    return int(attrs.get(VIEWS_ATTR, manifest["views"]))


def growing_from(manifest: dict) -> int | None:
    """V_old of a cache whose views are being grown, None otherwise."""
    g = manifest.get(GROWING)
    return int(g["from"]) if isinstance(g, dict) and "from" in g else None


def growing_error(manifest: dict, where: str) -> KdcacheError:
    """What a reader says about a cache a precompute run is growing and has not finished."""
    return KdcacheError(
        f"cache {where} is being grown from {growing_from(manifest)} to {int(manifest['views'])} views and the "
        f"precompute run doing it has not finished; re-run the same `kdcache precompute ... --views "
        f"{int(manifest['views'])}` command to finish it, then read the cache")


def shrink_error(where: str, have: int, want: int) -> KdcacheError:
    """A run that asks a cache for fewer views than it holds (or is growing to)."""
    return KdcacheError(
        f"cache {where} holds {have} views per image and this run asks for {want} (--views): a cache never "
        f"shrinks. Re-run with --views {have} to resume it (train uses fewer views with --epochs), or "
        "precompute into a new --out")


def grown_manifest(old: dict, run: dict) -> dict:
    """The manifest a growing run stores: the run's V, and ``growing.from`` the V of the cache's first
    groups (kept from an unfinished growth, so a second growth started on top of it still says so)."""
    start = growing_from(old)
    return {**old, "views": int(run["views"]), GROWING: {"from": int(old["views"]) if start is None else start}}


def finished_manifest(manifest: dict) -> dict:
    """The manifest once every group holds the manifest's V: ``growing`` removed."""
    return {k: v for k, v in manifest.items() if k != GROWING}


def older_groups(attrs_of: dict[str, dict]) -> list[str]:
    """Groups (name -> attributes) written before groups recorded their own V: their decode record
    and view digests cover V, so they cannot grow without new digests."""
    return sorted(n for n, a in attrs_of.items() if a.get("complete") and VIEWS_ATTR not in a)


def older_groups_error(where: str, names: list[str]) -> KdcacheError:
    return KdcacheError(
        f"cache {where} cannot grow its views: {len(names)} of its groups ({', '.join(names[:3])}"
        f"{' ...' if len(names) > 3 else ''}) were written by a kdcache before groups recorded their own view "
        "count, and their view digests cover the old count. Precompute into a new --out with the larger --views")
