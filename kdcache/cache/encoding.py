"""The compact encodings of cache format 3 (``precompute --compact``), as pure numpy functions.

Two codes, each with its inverse; ``docs/format.md`` (*Compact layout*) shows how a plain-zarr user
applies the inverses.

**Log-probabilities against the top-1.** A record's top-k log-probs ``l_1 ≥ … ≥ l_k`` (T = 1) become

- ``topk_logmass = log Σ_i exp(l_i)`` (float16): the top-k mass, so the tail ``1 − exp(topk_logmass)``
  keeps float16 precision whatever the quantisation does, and
- ``logprob_steps`` (k − 1 uint8 per record): the distances ``x_i = l_1 − l_i`` rounded to multiples of
  ``step`` (1/16 nat), stored as the differences of consecutive codes (small numbers: they compress
  well). A difference is at most 254 (an entry more than 254 steps, ~15.9 nats, below the one before
  is stored 254 steps below it).

Decoding rebuilds ``x̂`` and renormalises so that the top-k mass is the stored one:
``l̂_i = topk_logmass − x̂_i − log Σ_j exp(−x̂_j)``. Each ``x̂_i`` is within step/2 of ``x_i`` and the
normaliser moves by at most step/2, so ``|l̂_i − l_i| ≤ step`` plus the float16 rounding of
``topk_logmass`` (≤ 2⁻¹¹·|log mass|) and of the float32 result, for every entry whose code was not
capped (a cap needs a gap of 15.9 nats: the entry holds less than 1.3e-7 of the mass of the one
before). The top-k mass of the decoded log-probs is ``exp(topk_logmass)``, so the tail mass
``1 − Σ exp(l̂_i)`` is the teacher's to float16 precision of ``log Σ exp(l_i)``.

**Class ids against a per-image class list.** The top-k classes of the V views of one image overlap
strongly, so each image keeps ``class_list``: the distinct classes of its V·k entries, ordered by
their summed probability over the views (descending; ties by class id), padded with -1. A record's
k classes are then positions in that list, written as a Lehmer code (``class_code``): entry j is
the position of its class among the list entries that entries 1..j−1 did not take (an entry
without a class, -1, codes as the dtype's largest value minus 1: 254, 65,534 or 4,294,967,294 for
uint8, uint16 or uint32 codes, past any list). A record whose classes follow the image's order
codes as all zeros, so the codes are small and compress well; the code is exact for any input.
"""

from __future__ import annotations

import numpy as np

LOGPROB_STEP = 1.0 / 16.0  # nats per quantisation step of the compact log-probs
MAX_STEP_CODE = 254  # the largest difference of consecutive codes (uint8; 255 is the array's fill value)


# ---- log-probabilities ---------------------------------------------------------------------------


def topk_logmass(logprobs: np.ndarray) -> np.ndarray:
    """log Σ exp(l_i) over the last axis in float64 (-inf where every entry is -inf)."""
    l = np.asarray(logprobs, dtype=np.float64)
    mx = l.max(axis=-1, keepdims=True) if l.shape[-1] else np.zeros(l.shape[:-1] + (1,))
    safe = np.where(np.isfinite(mx), mx, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.exp(l - safe).sum(-1)) + safe[..., 0]
    return np.where(np.isneginf(mx[..., 0]), -np.inf, out)


def quantise_logprobs(logprobs: np.ndarray, step: float = LOGPROB_STEP) -> tuple[np.ndarray, np.ndarray]:
    """(steps (..., k−1) uint8, logmass (...) float16) of top-k log-probs sorted descending.

    Entries that are -inf (no mass) take the largest code difference. A record whose entries are all
    -inf (a bad record's placeholder) gives zero steps and a logmass of -inf."""
    l = np.asarray(logprobs, dtype=np.float64)
    k = l.shape[-1]
    logmass = topk_logmass(l).astype(np.float16)
    steps = np.zeros(l.shape[:-1] + (max(k - 1, 0),), dtype=np.uint8)
    if k > 1:
        with np.errstate(invalid="ignore"):
            x = l[..., :1] - l  # >= 0 for sorted input; inf for a -inf entry; nan for an all -inf record
        x = np.where(np.isnan(x), 0.0, x)
        want = np.minimum(np.round(x / step), 1e9)  # integer code of each entry (inf capped)
        q = np.zeros(l.shape[:-1], dtype=np.int64)
        for j in range(1, k):
            d = np.clip(want[..., j] - q, 0, MAX_STEP_CODE).astype(np.int64)
            steps[..., j - 1] = d
            q = q + d
    return steps, logmass


def dequantise_logprobs(steps: np.ndarray, logmass: np.ndarray, step: float = LOGPROB_STEP) -> np.ndarray:
    """The float32 log-probs (..., k) that ``quantise_logprobs`` encoded (k = steps' width + 1). Their
    top-k mass is ``exp(logmass)`` to float32 precision."""
    s = np.asarray(steps, dtype=np.float64)
    x = np.concatenate([np.zeros(s.shape[:-1] + (1,)), np.cumsum(s, axis=-1)], axis=-1) * step
    norm = np.log(np.exp(-x).sum(-1, keepdims=True))  # x_1 = 0, so the sum is >= 1: no overflow
    lm = np.asarray(logmass, dtype=np.float64)[..., None]
    return (lm - x - norm).astype(np.float32)


# ---- class ids -----------------------------------------------------------------------------------


def image_class_lists(classes: np.ndarray, weights: np.ndarray) -> list[np.ndarray]:
    """Per image (first axis), its distinct class ids (>= 0) over all views and entries, ordered by
    summed ``weights`` (descending), ties by class id."""
    cls = np.asarray(classes, dtype=np.int64)
    w = np.asarray(weights, dtype=np.float64)
    out = []
    for i in range(cls.shape[0]):
        c, ww = cls[i].ravel(), w[i].ravel()
        keep = c >= 0
        u, inv = np.unique(c[keep], return_inverse=True)
        total = np.bincount(inv, weights=ww[keep], minlength=len(u)) if len(u) else np.zeros(0)
        out.append(u[np.lexsort((u, -total))])
    return out


def pad_lists(lists: list[np.ndarray], dtype) -> np.ndarray:
    """(N, U) array of the lists, padded with -1; U = the longest list, at least 1."""
    width = max([1] + [len(x) for x in lists])
    arr = np.full((len(lists), width), -1, dtype=dtype)
    for i, x in enumerate(lists):
        arr[i, : len(x)] = x
    return arr


def code_dtype(width: int) -> np.dtype:
    """The narrowest unsigned dtype whose codes (< width) all stay below ``missing_code`` (the dtype's
    largest value minus 1; the largest is the array's fill value): uint8 up to 254 list entries,
    uint16 up to 65,534, uint32 beyond (a teacher with more classes and V·k entries that many)."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if width <= int(np.iinfo(dt).max) - 1:
            return np.dtype(dt)
    raise ValueError(f"a class list of {width} entries is longer than any class code can address")


def missing_code(dtype) -> int:
    """The code of an entry without a class (-1): one below the dtype's largest value, past any list."""
    return int(np.iinfo(dtype).max) - 1


def encode_classes(classes: np.ndarray, class_list: np.ndarray) -> np.ndarray:
    """Lehmer codes (N, V, k) of ``classes`` (N, V, k) against each image's ``class_list`` (N, U).

    An entry whose class is -1 (a bad record, an unused slot of sampled targets) gets
    ``missing_code``; every other id must be in its image's list (ValueError otherwise)."""
    cls = np.asarray(classes, dtype=np.int64)
    lst = np.asarray(class_list, dtype=np.int64)
    n, V, k = cls.shape
    pos = np.zeros((n, V, k), dtype=np.int64)
    for i in range(n):
        where = {int(c): j for j, c in enumerate(lst[i]) if c >= 0}
        try:
            pos[i] = np.vectorize(lambda c: where[int(c)] if c >= 0 else -1, otypes=[np.int64])(cls[i])
        except KeyError as e:
            raise ValueError(f"class {e.args[0]} of record {i} is not in its image's class list") from None
    real = pos >= 0
    # code_j = position_j minus the earlier entries that sit before it in the list
    before = (pos[..., None, :] < pos[..., :, None]) & real[..., None, :]
    earlier = np.tril(np.ones((k, k), dtype=bool), -1)
    codes = pos - (before & earlier).sum(-1)
    dt = code_dtype(lst.shape[1])
    return np.where(real, codes, missing_code(dt)).astype(dt)


def decode_classes(codes: np.ndarray, class_list: np.ndarray) -> np.ndarray:
    """Class ids (N, V', k) from Lehmer ``codes`` (N, V', k) and the images' ``class_list`` (N, U).

    Entry j of a record is the ``codes[j]``-th list entry that entries 1..j−1 did not take; a code
    past the entries left (``missing_code``) gives -1."""
    c = np.asarray(codes, dtype=np.int64)
    lst = np.asarray(class_list, dtype=np.int64)
    n, V, k = c.shape
    U = lst.shape[1]
    out = np.full((n, V, k), -1, dtype=np.int64)
    if n == 0 or U == 0:
        return out
    avail = np.ones((n, V, U), dtype=bool)
    rows = np.broadcast_to(np.arange(n)[:, None], (n, V))
    vs = np.broadcast_to(np.arange(V)[None, :], (n, V))
    for j in range(k):
        rank = np.cumsum(avail, axis=-1) - 1  # each list entry's position among the available ones
        hit = avail & (rank == c[..., j : j + 1])
        found = hit.any(-1)
        at = hit.argmax(-1)
        out[..., j] = np.where(found, lst[rows, at], -1)
        avail[rows[found], vs[found], at[found]] = False
    return out
