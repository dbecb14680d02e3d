"""The cache format (a package: one idea a module): a Zarr v3 group holding the teacher's targets and the views they were taken on.

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
top-1 with the top-k mass kept, class ids coded against a per-image class list or stored as they
are (per group, the cheaper: ``class_coding``), geometry not stored but re-derived from the seeded
sampler; ``kdcache.cache.encoding``). Whatever the layout,
``CacheReader`` returns the same decoded arrays (``ARRAYS``, plus ``counts`` for sampled targets).

Every per-view array is chunked one chunk per view and packed into one Zarr shard, so a shard
group is a handful of files and an epoch reads one small chunk per array. Each group records a
SHA-256 per view (``view_digests``) and the manifest's decode-relevant fields (``decode_record``,
which the digests cover) and its own view count (``views``; the record leaves V out, so a group
grown to more views keeps its digests: ``growth.py``): a value or manifest field edited later is
refused by name.
``docs/format.md`` describes the semantics in full.

Format version 2 is version 3's plain top-k layout without the manifest's ``targets`` and
``encoding``. Format version 1 also stored ``keys`` as a (N,) Zarr ``string`` (vlen-utf8) array,
which tensorstore cannot open. Both are still read; they are not written to any more.
"""

from __future__ import annotations

from ..claims import (
    CLAIM_GRACE_S, CLAIM_LEASE_S, CLAIM_REFRESH_S, CLAIMS_DIR, ClaimLostError, ShardClaim, ShardClaimedError,
)
from .manifest import (
    ARRAYS, arrays_of, box_dtype, class_dtype, encoding_record, FORMAT_VERSION, GEOMETRY, is_local, KEYS_ATTRS,
    layout_arrays, layout_of, LAYOUTS, make_manifest, manifest_differences, MATCHED_FIELDS, MAX_COUNT, members_of,
    open_manifest, open_root, READ_VERSIONS,
)
from .records import (
    DECODE_FIELDS, decode_record, decode_record_text, probe_record, RECORD_ATTR, RECORD_PROBES, record_problem,
    VIEWS_ATTR,
)
from .growth import GROWING, group_views, growing_from
from .layouts import (
    CLASS_LIST_CODEC, CODES_CODEC, CRC_CODEC, decode_group, decode_keys, derived_views, encode_group, encode_keys,
    FLOAT_CODEC, INT_CODEC,
    is_string_keys, LOGMASS_CODEC, read_keys,
)
from .digests import (
    DIGEST_ATTR, digest_of, targets_digest, view_digest,
)
from .integrity import (
    blosc_cut, box_fill, damaged_error, EVERY_CHUNK_ATTR, filesystem_of, FILL_VALUES, head_reader, list_all_groups,
    list_files, missing_data, missing_data_quick, nonfinite_records,
)
from .reader import (
    CacheReader, ViewRecords,
)
from .writer import (
    CacheWriter,
)

__all__ = [
    "CLAIM_GRACE_S", "CLAIM_LEASE_S", "CLAIM_REFRESH_S", "CLAIMS_DIR", "ClaimLostError", "ShardClaim",
    "ShardClaimedError", "ARRAYS", "arrays_of", "box_dtype", "class_dtype", "encoding_record", "FORMAT_VERSION",
    "GEOMETRY", "is_local", "KEYS_ATTRS", "layout_arrays", "layout_of", "LAYOUTS", "make_manifest",
    "manifest_differences", "MATCHED_FIELDS", "MAX_COUNT", "members_of", "open_manifest", "open_root", "READ_VERSIONS",
    "DECODE_FIELDS", "decode_record", "decode_record_text", "probe_record", "RECORD_ATTR", "RECORD_PROBES",
    "record_problem", "VIEWS_ATTR", "GROWING", "group_views", "growing_from", "CLASS_LIST_CODEC", "CODES_CODEC", "CRC_CODEC", "decode_group", "decode_keys", "derived_views", "encode_group", "encode_keys",
    "FLOAT_CODEC", "INT_CODEC", "is_string_keys", "LOGMASS_CODEC", "read_keys", "DIGEST_ATTR", "digest_of",
    "targets_digest", "view_digest", "blosc_cut", "box_fill", "damaged_error", "EVERY_CHUNK_ATTR", "filesystem_of",
    "FILL_VALUES", "head_reader", "list_all_groups", "list_files", "missing_data", "missing_data_quick",
    "nonfinite_records", "CacheReader", "ViewRecords", "CacheWriter",
]
