"""What a cache keeps of the teacher: its top-k, or classes sampled from its distribution.

``precompute --targets topk`` (the default) stores the k most likely classes with their
log-probabilities; the mass outside them is modelled by the loss's ``tail`` mode, which is a bias.
``precompute --targets sample`` stores an unbiased alternative (Random-Sampling KD, Anshumann et al.,
"Sparse Logit Sampling", ACL 2025): N classes drawn with replacement from the teacher's distribution
at a sampling temperature τ, kept as distinct classes with their counts. The target is
``w_c = count_c / N``; ``E[w] = p_τ`` (the teacher's softmax at τ) exactly, so the expected gradient of
the KD loss at T = τ, ``T·(softmax(z/T) − w)``, is full distillation's.

The draws of a record are a pure function of ``(seed, key, view)`` and the teacher's log-probs: N
uniforms from a PCG64 seeded by a BLAKE2b hash of ``("targets", seed, key, view)``, each mapped
through the cumulative distribution of ``softmax(log p / τ)`` over the classes in id order
(float64, from the float32 log-softmax the teacher gives). So a re-run draws the same classes, and
``kdcache verify`` re-draws them from a re-run teacher; ``check_draws`` says whether stored counts
agree with the re-run distribution within a tolerance.
"""

from __future__ import annotations

import numpy as np

from ..data.views import stable_seed

TARGET_KINDS = ("topk", "sample")
SAMPLER_VERSION = 1  # of the draw below; recorded in the manifest
# The most draws per record: counts are stored as uint8, and 255 is the counts array's fill value
# (store.MAX_COUNT is this constant).
MAX_SAMPLES = 254
_TWO_TO_MINUS_53 = 1.0 / 9007199254740992.0  # a double from the top 53 bits of a 64-bit output


def targets_record(kind: str = "topk", samples: int | None = None, temperature: float = 1.0) -> dict:
    """The manifest's ``targets`` entry."""
    if kind == "topk":
        return {"kind": "topk"}
    return {"kind": "sample", "samples": int(samples), "temperature": float(temperature),
            "version": SAMPLER_VERSION}


def kind_of(manifest: dict) -> str:
    """A cache's target kind (caches before format 3 hold top-k)."""
    return str((manifest.get("targets") or {}).get("kind", "topk"))


def slots(samples: int, num_classes: int) -> int:
    """Width of a sampled record: at most this many distinct classes."""
    return max(1, min(int(samples), int(num_classes)))


def draw_uniforms(seed: int, key: str, view: int, samples: int) -> np.ndarray:
    """The N uniforms in [0, 1) of record (key, view): the doubles that
    ``np.random.Generator(np.random.PCG64(s)).random(N)`` gives (the top 53 bits of each 64-bit output
    times 2^-53), taken from the bit generator directly: building a Generator per record costs more
    than the draws."""
    raw = np.random.PCG64(stable_seed("targets", seed, key, view)).random_raw(int(samples))
    return (raw >> np.uint64(11)) * _TWO_TO_MINUS_53


def check_samples(samples: int) -> int:
    """``samples`` as an int, refused (ValueError) outside 1..MAX_SAMPLES: a count above 254 would
    wrap in the uint8 counts (and 255 is their fill value)."""
    n = int(samples)
    if not 1 <= n <= MAX_SAMPLES:
        raise ValueError(f"samples must be in 1..{MAX_SAMPLES} (a record's counts are stored as bytes; 255 is the "
                         f"fill value), got {samples}")
    return n


def sampling_cdf(logp: np.ndarray, temperature: float) -> np.ndarray:
    """Cumulative distribution (float64, classes in id order, last entry exactly 1) of
    ``softmax(logp / temperature)`` over the last axis (one record, or a batch of rows).

    A log-prob of -inf is probability 0; NaN or +inf is not a distribution and is refused
    (ValueError): mapped to -inf it would turn a +inf logit into "probability 0" and a NaN teacher
    into a clean-looking one-hot target (``teacher.check_finite`` stops such a teacher earlier)."""
    a = np.asarray(logp, dtype=np.float64) / float(temperature)
    if (np.isnan(a) | np.isposinf(a)).any() or np.isneginf(a).all(axis=-1).any():
        raise ValueError("log-probs hold NaN or +inf, or a row is -inf throughout: not a distribution to draw from")
    q = np.exp(a - a.max(axis=-1, keepdims=True))
    cdf = np.cumsum(q, axis=-1)
    return cdf / cdf[..., -1:]


def draw_record(logp: np.ndarray, seed: int, key: str, view: int, samples: int, temperature: float = 1.0,
                width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(classes, counts) of one record: distinct drawn classes sorted by count (descending), ties
    by class id, padded to ``width`` (default ``min(samples, C)``) with class -1 and count 0."""
    C = len(logp)
    samples = check_samples(samples)
    width = slots(samples, C) if width is None else width
    u = draw_uniforms(seed, key, view, samples)
    drawn = np.minimum(np.searchsorted(sampling_cdf(logp, temperature), u, side="right"), C - 1)
    cls, cnt = np.unique(drawn, return_counts=True)
    order = np.lexsort((cls, -cnt))
    classes = np.full(width, -1, dtype=np.int64)
    counts = np.zeros(width, dtype=np.uint8)
    classes[: len(cls)] = cls[order]
    counts[: len(cls)] = cnt[order]
    return classes, counts


# Rows of the float64 distribution built at once in draw_batch: 512 KiB, which stays in the CPU cache
# through its passes (larger blocks measured slower at C = 32000 and 128000; benchmarks/targets_bench.py).
_CDF_ELEMENTS = 1 << 16


def draw_batch(logp: np.ndarray, keys, views, seed: int, samples: int, temperature: float = 1.0):
    """``draw_record`` for each row of ``logp`` (b, C) with its key and view: the same classes and
    counts (tested), with the distribution and the counting done for many rows at once."""
    logp = np.asarray(logp)
    B, C = logp.shape
    samples = check_samples(samples)
    width = slots(samples, C)
    keys, views = list(keys), list(views)
    if len(keys) != B or len(views) != B:
        raise ValueError(f"draw_batch: {B} rows of log-probs but {len(keys)} keys and {len(views)} views")
    drawn = np.empty((B, int(samples)), dtype=np.int64)
    step = max(1, _CDF_ELEMENTS // max(C, 1))
    for lo in range(0, B, step):
        cdf = sampling_cdf(logp[lo:lo + step], temperature)
        for r in range(lo, min(lo + step, B)):
            u = draw_uniforms(seed, str(keys[r]), int(views[r]), samples)
            drawn[r] = np.searchsorted(cdf[r - lo], u, side="right")
    return _counted(np.minimum(drawn, C - 1), C, width)


def _counted(drawn: np.ndarray, C: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct classes of each row of ``drawn`` (b, N) with their counts, sorted by count
    (descending) then class id, padded to ``width`` with class -1 and count 0."""
    B, N = drawn.shape
    d = np.sort(drawn, axis=1)
    first = np.ones((B, N), dtype=bool)
    first[:, 1:] = d[:, 1:] != d[:, :-1]
    group = np.cumsum(first, axis=1) - 1  # which distinct class of its row each draw is
    rows = np.repeat(np.arange(B), N)
    counts = np.zeros((B, N), dtype=np.int64)
    np.add.at(counts, (rows, group.ravel()), 1)
    classes = np.full((B, N), -1, dtype=np.int64)
    classes[rows, group.ravel()] = d.ravel()
    # one integer key per slot: more draws first, then the smaller class; unused slots last
    order_key = np.where(counts > 0, (N + 1 - counts) * (C + 1) + classes, (N + 2) * (C + 1))
    order = np.argsort(order_key, axis=1, kind="stable")[:, :width]
    out_c = np.take_along_axis(classes, order, axis=1)
    out_n = np.take_along_axis(counts, order, axis=1).astype(np.uint8)
    return out_c, out_n


def log_weights(counts: np.ndarray, samples: int) -> np.ndarray:
    """float32 ``log(counts / samples)``; -inf for an unused slot (count 0). What the loss takes
    (``tail="sampled"``) in place of top-k log-probs."""
    c = np.asarray(counts, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(c / float(samples)).astype(np.float32)


def check_draws(classes, counts, logp, seed: int, key: str, view: int, samples: int, temperature: float,
                atol: float, rtol: float) -> dict:
    """Compare one stored sampled record with a re-run teacher's log-probs ``logp`` (C,) float32.

    ``exact``: re-drawing gives the stored classes and counts. Otherwise each stored draw is paired
    with its uniform (both sorted: a draw's class grows with its uniform) and must fall inside its
    class's interval of the re-run cumulative distribution, widened by how far the log-prob
    tolerance ``atol + rtol·|l|`` can move a boundary; a draw near a boundary may then land in the
    neighbouring class. Returns ``{"exact", "max_cdf_gap", "reasons"}``."""
    C = len(logp)
    cls = np.asarray(classes, dtype=np.int64)
    cnt = np.asarray(counts, dtype=np.int64)
    want_c, want_n = draw_record(logp, seed, key, view, samples, temperature, len(cls))
    exact = bool(np.array_equal(want_c, cls) and np.array_equal(want_n, cnt))
    reasons = []
    used = cnt > 0
    if int(cnt.sum()) != samples:
        reasons.append(f"counts sum to {int(cnt.sum())}, the cache draws {samples} per record")
    if (cls[used] < 0).any() or (cls[used] >= C).any():
        reasons.append(f"stored classes {cls[used].tolist()} are outside 0..{C - 1}")
    if len(set(cls[used].tolist())) != int(used.sum()):
        reasons.append(f"a class is stored twice: {cls[used].tolist()}")
    if (cls[~used] != -1).any():
        reasons.append("an unused slot (count 0) holds a class id")
    gap = 0.0
    if not reasons and not exact:
        cdf = sampling_cdf(logp, temperature)
        lo = np.concatenate([[0.0], cdf[:-1]])
        q = np.diff(np.concatenate([[0.0], cdf]))
        l = np.asarray(logp, dtype=np.float64)
        tol = np.where(np.isfinite(l), atol + rtol * np.abs(np.where(np.isfinite(l), l, 0.0)), atol)
        slack = 2.0 / float(temperature) * float((q * tol).sum())  # first order: |Δcdf| <= Σ q_j |Δ log q_j|
        u = np.sort(draw_uniforms(seed, key, view, samples))
        drawn = np.sort(np.repeat(cls[used], cnt[used]))
        below = np.maximum(lo[drawn] - u, 0.0)
        above = np.maximum(u - cdf[drawn], 0.0)
        gap = float(np.maximum(below, above).max()) if len(u) else 0.0
        if gap > slack:
            i = int(np.argmax(np.maximum(below, above)))
            now = int(min(np.searchsorted(cdf, u[i], side="right"), C - 1))
            reasons.append(
                f"draw with uniform {u[i]:.6f} is stored as class {int(drawn[i])}, the re-run teacher's distribution "
                f"puts it in class {now} (outside class {int(drawn[i])}'s interval [{lo[drawn[i]]:.6f}, "
                f"{cdf[drawn[i]]:.6f}) by {gap:.2e} > {slack:.2e}): stored counts {dict(zip(cls[used].tolist(), cnt[used].tolist()))}")
    return {"exact": exact, "max_cdf_gap": gap, "reasons": reasons}
