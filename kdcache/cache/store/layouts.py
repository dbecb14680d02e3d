"""How a group's arrays are laid out: the codecs, the keys' byte rows, and the two layouts (plain,
compact) as a pair of functions: ``encode_group`` (what a writer stores) and ``decode_group`` (what
every reader gets back, whatever the layout)."""

from __future__ import annotations


import numpy as np
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec, ZstdCodec

from .. import encoding as enc
from ...errors import KdcacheError
from ..targets import kind_of, log_weights
from .class_coding import cheaper_coding, CODING_ATTR, PER_GROUP
from .integrity import damaged_error, nonfinite_records
from .manifest import MAX_COUNT, box_dtype, class_dtype, layout_of


FLOAT_CODEC = BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle)
INT_CODEC = BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.bitshuffle)
# The compact layout's codes: small integers in bytes, where zstd's own entropy coder does best.
CODES_CODEC = ZstdCodec(level=19)
CLASS_LIST_CODEC = BloscCodec(cname="zstd", clevel=9, shuffle=BloscShuffle.shuffle)
LOGMASS_CODEC = BloscCodec(cname="zstd", clevel=9, shuffle=BloscShuffle.bitshuffle)
# Every chunk also carries a CRC-32C of its compressed bytes: Blosc alone decodes a truncated or
# corrupted chunk into garbage without an error (seen for the unsharded `keys` and `size`).
CRC_CODEC = Crc32cCodec()

def is_string_keys(keys_array) -> bool:
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

def read_keys(keys_array) -> np.ndarray:
    """The keys as a plain numpy unicode array, from either format's keys array."""
    if is_string_keys(keys_array):  # format 1: zarr returns numpy's variable-width strings
        return np.array([str(k) for k in keys_array[:]], dtype=str)
    return decode_keys(np.asarray(keys_array[:]))

def derived_views(manifest: dict, where: str, name: str, keys, size, bad, views):
    """The views of a compact group, which does not store them: ``views.sample_shard_views`` on the
    manifest's seed and augmentation, as precompute drew them (a record listed in ``bad`` or without
    a size gets none). ``views`` is V or a list of view indices; ``where`` names the cache in errors."""
    from ...data.views import SAMPLER_VERSION, AugSpec, sample_shard_views

    aug = AugSpec.from_dict(manifest["augmentation"])
    if aug.version != SAMPLER_VERSION:
        raise KdcacheError(
            f"cache {where} does not store its views (precompute --compact): they were drawn by view sampler "
            f"version {aug.version} and this kdcache has version {SAMPLER_VERSION}, so it cannot re-derive them. "
            "Read the cache with the kdcache release that made it")
    size = np.asarray(size)
    valid = np.array([str(k) not in bad for k in keys], dtype=bool) & (size[:, 0] >= 0)
    return sample_shard_views(int(manifest["seed"]), name, [str(k) for k in keys], size, views, aug, valid=valid)


def encode_group(manifest: dict, where: str, name, keys, size, classes, values, box, flip, mix_with, mix_lam,
             bad) -> tuple[dict, dict, dict]:
    """A group's layout, written: (arrays to store but the keys, the decoded data a reader will get,
    for the digests, the group attributes the layout adds: a compact group's class coding).
    ``values`` are the top-k log-probs or the sampled counts."""
    kind, layout = kind_of(manifest), layout_of(manifest)
    n, V = len(keys), int(manifest["views"])
    num_classes = int(manifest["teacher"]["num_classes"])
    cdt = class_dtype(num_classes)
    geometry = {"box": np.asarray(box), "flip": np.asarray(flip, dtype=bool),
                "mix_with": np.asarray(mix_with, dtype=np.int32), "mix_lam": np.asarray(mix_lam, dtype=np.float16)}
    classes = np.asarray(classes, dtype=np.int64)
    decoded = {"keys": np.array([str(k) for k in keys], dtype=str), "size": np.asarray(size, dtype=np.int32),
               **geometry}
    if kind == "sample":
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
    if layout == "plain":
        return {"size": np.asarray(size), **targets, "classes": classes.astype(cdt), **geometry}, decoded, {}
    # compact: geometry must be the seeded sampler's, since it is re-derived on every read
    sv = derived_views(manifest, where, name, keys, size, bad, V)
    for a, want in (("box", sv.box), ("flip", sv.flip), ("mix_with", sv.mix_with), ("mix_lam", sv.mix_lam)):
        if not np.array_equal(np.asarray(geometry[a]).astype(np.float64), np.asarray(want).astype(np.float64)):
            raise KdcacheError(
                f"write_shard({name!r}): the given {a} differs from the views the seeded sampler draws for this "
                "cache's seed and augmentation; a compact cache does not store its views, it re-derives them, so "
                "it can only hold the sampler's views")
    stored = {"size": np.asarray(size)}
    if kind == "sample":
        stored["counts"] = targets["counts"]
    else:
        step = float(manifest["encoding"]["logprob_step"])
        steps, logmass = enc.quantise_logprobs(lp, step)
        if lp.shape[-1] > 1:
            stored["logprob_steps"] = steps
        stored["topk_logmass"] = logmass
        decoded.update(logprob_steps=steps, topk_logmass=logmass)
        # the lists are ordered by what a reader decodes, so a group re-encoded from its decoded
        # views (grown to more views, growth.py) gets the lists a one-go run would
        weights = np.exp(enc.dequantise_logprobs(steps, logmass, step).astype(np.float64))
    class_list = enc.pad_lists(enc.image_class_lists(classes, weights), cdt)
    codes = enc.encode_classes(classes, class_list)
    codings = {"image_list": {"class_list": class_list, "class_code": codes}}
    per_group = manifest["encoding"].get("classes") == PER_GROUP
    if per_group and n:
        codings["direct"] = {"classes": classes.astype(cdt)}
    coding = cheaper_coding(codings) if len(codings) > 1 else "image_list"
    stored.update(codings[coding])
    decoded["classes"] = enc.decode_classes(codes, class_list) if coding == "image_list" else classes
    if not np.array_equal(classes, decoded["classes"]):
        raise KdcacheError(f"write_shard({name!r}): the class codes do not decode to the classes (a bug)")
    return stored, decoded, ({CODING_ATTR: coding} if per_group else {})


def decode_group(manifest: dict, where: str, name: str, st: dict, view: int | None, bad, logprob_step: float,
                 samples: int | None) -> dict[str, np.ndarray]:
    """A group's layout, read: the decoded arrays (``ARRAYS``, plus ``counts`` for sampled targets)
    from the stored ones of view ``view`` (None: every view). A compact group's stored codes stay in
    the result too (the digest covers them)."""
    d = dict(st)
    if layout_of(manifest) == "compact":
        codes = st["class_code"] if "class_code" in st else st["classes"]  # the group's class coding
        try:
            d["classes"] = (enc.decode_classes(codes, st["class_list"]) if "class_code" in st else codes).astype(np.int64)
        except Exception as e:
            raise damaged_error(f"array 'class_code' of cache group {name!r} in {where}", e) from None
        if kind_of(manifest) == "topk":
            steps = st.get("logprob_steps")
            if steps is None:
                steps = np.zeros(codes.shape[:2] + (0,), np.uint8)
            d["logprobs"] = enc.dequantise_logprobs(steps, st["topk_logmass"], logprob_step).astype(np.float32)
        sv = derived_views(manifest, where, name, d["keys"], d["size"], bad,
                           list(range(codes.shape[1])) if view is None else [view])
        max_side = int(np.asarray(d["size"]).max()) if len(d["keys"]) else 0
        d.update(box=sv.box.astype(box_dtype(max_side)), flip=sv.flip, mix_with=sv.mix_with, mix_lam=sv.mix_lam)
    if kind_of(manifest) == "sample":
        d["classes"] = np.where(st["counts"] > 0, d["classes"], -1)
        d["logprobs"] = log_weights(st["counts"], samples)
    return d
