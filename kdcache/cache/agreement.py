"""Whether a teacher's output now agrees with what a cache stored: the one comparison ``kdcache
verify`` (offline, on sampled records) and the trainer's spot check (``train --spot-check``, on the
batches being trained) both make.

Stored log-probs are float16; a re-run cast to float16 gives them back exactly, so the default
tolerance is one float16 step (``RTOL``·|value|) plus ``ATOL``, and a compact cache's quantisation
step on top. The tail mass outside the stored top-k is compared as well (see ``compare_record``).
"""

from __future__ import annotations

import math

import numpy as np

# Tolerance on a log-probability: |Δ| <= ATOL + RTOL·|stored|. RTOL·|x| is at least one float16
# step at x (the storage's rounding: a float32 difference in the last bits can flip it); ATOL is a
# float32 margin for values near 0, where float16 steps are finer than float32's summation noise.
ATOL = 1e-4
RTOL = 2.0**-10


def tolerance(value: float, atol: float, rtol: float) -> float:
    return atol + rtol * abs(value) if math.isfinite(value) else atol


def compare_record(stored_lp, stored_cls, vals, ids, atol: float = ATOL, rtol: float = RTOL, step: float = 0.0) -> dict:
    """Compare one stored top-k with the teacher's recomputed full sorted log-probs.

    ``step``: a compact cache's quantisation step; each log-prob may differ by that much more, the
    tail mass (which the compact layout keeps) may not.

    ``vals``/``ids``: all C log-probs of the re-run (float16, as precompute stores them) in
    descending order and their classes. Besides each log-prob, the tail mass ``1 − Σ exp(l_i)`` over
    the stored classes is compared: each entry may round either way within its tolerance, but the
    tail may only move by the root-sum-square of those steps, so a bias shared by every entry (which
    would move the mass outside the top-k) fails even when each entry alone is within tolerance.
    Returns the deltas, agreement flags and a list of reasons (empty when the record agrees).
    """
    k = len(stored_lp)
    C = len(vals)
    now = np.empty(C, dtype=np.float64)
    now[np.asarray(ids, dtype=np.int64)] = np.asarray(vals, dtype=np.float64)
    s = np.asarray(stored_lp, dtype=np.float64)
    c = np.asarray(stored_cls, dtype=np.int64)
    reasons = []
    if (c < 0).any() or (c >= C).any():
        return {"max_delta": None, "tail_delta": None, "top1_exact": False, "topk_exact": False,
                "reasons": [f"stored classes {c.tolist()} are outside 0..{C - 1}"]}
    r = now[c]
    with np.errstate(invalid="ignore"):
        d = np.where(s == r, 0.0, np.abs(s - r))
    d = np.where(np.isnan(d), np.inf, d)
    max_delta = float(d.max()) if k else 0.0
    tails = np.array([tolerance(x, atol, rtol) for x in s])
    tols = tails + step
    for j in range(k):
        if d[j] > tols[j]:
            reasons.append(
                f"log-prob of class {int(c[j])} (rank {j + 1}): stored {s[j]:.4f}, teacher now {r[j]:.4f} "
                f"(|Δ| {d[j]:.4f} > {tols[j]:.4f})"
            )
    p_s, p_r = np.exp(s), np.exp(r)
    tail_s, tail_r = max(0.0, 1.0 - p_s.sum()), max(0.0, 1.0 - p_r.sum())
    tail_delta = abs(tail_s - tail_r)
    tail_tol = float(np.sqrt(np.sum((np.maximum(p_s, p_r) * tails) ** 2))) + 1e-7
    if tail_delta > tail_tol:
        reasons.append(f"tail mass outside the top-{k}: stored {tail_s:.6f}, teacher now {tail_r:.6f} "
                       f"(|Δ| {tail_delta:.6f} > {tail_tol:.6f}: the stored log-probs are shifted together)")
    top = float(vals[0])
    top1_exact = int(ids[0]) == int(c[0])
    if not top1_exact and now[c[0]] < top - tolerance(top, atol, rtol):
        reasons.append(
            f"top-1: stored class {int(c[0])}, teacher now says {int(ids[0])} "
            f"({top:.4f} vs {now[c[0]]:.4f} for the stored class; not a tie within tolerance)"
        )
    fresh = set(int(t) for t in ids[:k])
    topk_exact = fresh == set(c.tolist())
    if not topk_exact:
        kth = float(vals[k - 1])
        tk = tolerance(kth, atol, rtol)
        far = [int(t) for t in c if int(t) not in fresh and now[t] < kth - tk]
        if far:
            below = ", ".join(f"class {t} by {kth - now[t]:.4f}" for t in far)
            reasons.append(
                f"top-{k} set: stored {sorted(c.tolist())}, teacher now {sorted(fresh)}; now below the k-th "
                f"log-prob {kth:.4f}: {below} (> {tk:.4f}, not a tie)"
            )
    return {"max_delta": max_delta, "tail_delta": tail_delta, "top1_exact": top1_exact,
            "topk_exact": topk_exact, "reasons": reasons}
