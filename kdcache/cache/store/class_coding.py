"""How a compact group codes its class ids, chosen per group: the cheaper of two codings.

- ``image_list``: each image's distinct classes over its V·k entries (``class_list``) and each
  record's classes as Lehmer codes against it (``class_code``; ``kdcache.cache.encoding``). Cheap
  when an image's views agree (about 20 distinct classes in 100 entries: 6.7 B per record).
- ``direct``: the ids as they are (``classes`` (N, V, k), int16 or int32, -1 for no class), as in
  the plain layout. Cheaper on a teacher whose lower ranks vary across views: with about 84
  distinct classes in 100 entries the list alone costs more than the ids' ~10 bits each.

The writer compresses both with the codecs they are stored with, chunk by chunk as they are stored
(one chunk per view of a per-view array, the list in one chunk), and keeps the smaller; a tie goes
to ``image_list``. The group records the choice in ``CODING_ATTR``. Its view digests cover the
decoded class ids, not the coding's name: a group grown to more views (growth.py) may change coding
and keeps the digests of its views. An edited attribute is still refused: the group then holds the
other coding's arrays (``foreign_arrays``).
Groups of caches whose manifest says ``"classes": "image_list"`` (earlier releases) have no
attribute and are all ``image_list``.
"""

from __future__ import annotations

import numpy as np
from numcodecs import Blosc, Zstd

CODING_ATTR = "class_coding"
CODINGS = ("image_list", "direct")
PER_GROUP = "per_group"  # the manifest's encoding.classes of caches whose groups choose
# numcodecs twins of the stored arrays' codecs (layouts.py): what each chunk costs on disk
_SIZE_CODECS = {
    "class_list": Blosc(cname="zstd", clevel=9, shuffle=Blosc.SHUFFLE),
    "class_code": Zstd(level=19),
    "classes": Blosc(cname="zstd", clevel=5, shuffle=Blosc.BITSHUFFLE),
}


def coding_of(attrs: dict) -> str:
    """A compact group's class coding (groups without the attribute: ``image_list``)."""
    return str(attrs.get(CODING_ATTR, "image_list"))


def foreign_arrays(attrs: dict, present) -> list[str]:
    """The class arrays of the coding a compact group does not say it uses, among ``present``."""
    theirs = {"image_list": ("classes",), "direct": ("class_list", "class_code")}.get(coding_of(attrs), ())
    return sorted(a for a in present if a in theirs)


def coded_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Compressed bytes of a coding's arrays, chunked as stored: a per-view array (three axes) one
    chunk per view, any other array one chunk."""
    total = 0
    for name, arr in arrays.items():
        codec = _SIZE_CODECS[name]
        chunks = [arr[:, v] for v in range(arr.shape[1])] if arr.ndim == 3 else [arr]
        total += sum(len(codec.encode(np.ascontiguousarray(c))) for c in chunks)
    return total


def adopted_encoding(old: dict, run: dict) -> dict:
    """The run's manifest for a compact cache an earlier release began (``"classes": "image_list"``):
    its encoding as the cache's, so the groups added to it are coded as its first ones were."""
    were, wants = (m.get("encoding") or {} for m in (old, run))
    if were.get("layout") == wants.get("layout") == "compact" and (were.get("classes"), wants.get("classes")) == (
            "image_list", PER_GROUP):
        return {**run, "encoding": {**wants, "classes": "image_list"}}
    return run


def cheaper_coding(codings: dict[str, dict[str, np.ndarray]]) -> str:
    """The name of the coding whose arrays take fewer bytes (``CODINGS`` order on a tie)."""
    sizes = {name: coded_bytes(arrays) for name, arrays in codings.items()}
    return min(sorted(sizes, key=CODINGS.index), key=lambda name: sizes[name])
