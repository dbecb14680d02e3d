"""What a teacher's targets teach, taken apart: training signals derived from a cache (``train --kd-signal``).

Tang et al. (2020, "Understanding and Improving Knowledge Distillation") explain distillation's gain
by three kinds of teacher knowledge: a *universal* one that acts like label smoothing, *domain*
knowledge of how the classes relate, and *instance-specific* knowledge by which the teacher's
confidence on the true class re-weights each example. A cache holds every target the teacher
produced, so each part can be isolated from it without running the teacher again:

- ``full``                the stored targets (plain cached KD);
- ``smoothing``           the label smoothed by ε, the mean teacher probability off the true class;
- ``relations``           the mean teacher distribution of the record's class (a C × C table);
- ``reweight``            the hard label, each record weighted by the teacher's probability of its
                          true class on the record's view, normalised to mean 1 over the cache;
- ``relations+reweight``  and ``smoothing+reweight``: the weights on those targets.

docs/losses.md ("Signals derived from the cache") states every definition. One pass over the cache's
arrays of the run's shards (``cache_stats``) gives ε, the relation table and the normaliser of the
weights; the labels come from the shards' ``cls`` members (``shards.scan_labels``: no image is
read). A derived target is a sparse target like the cached one, (log-probs, class ids), trained
with the same loss (``tasks.KDLoss``) and the ``uniform`` tail: the smoothed label is its true class
plus a uniform tail of mass ε, a relation row is all C classes (k = C, no tail), the hard label is
one class with no tail.

Adding a signal is one line in ``SIGNALS`` (a target kind and whether it is re-weighted); a new
target kind is one function in ``TARGETS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..cache.store import CacheReader
from ..data.shards import scan_labels, shard_name
from ..errors import KdcacheError
from .losses import teacher_at_temperature

DERIVED_TAIL = "uniform"  # the loss's tail for every derived target (the smoothed label's ε is such a tail)
RELATIONS_FILE = "relations.npy"
RELATIONS_JSON = "relations.json"


@dataclass(frozen=True)
class Signal:
    """A training signal: which target each record gets, and whether its loss is re-weighted."""

    target: str  # "teacher" (the stored targets) or a key of TARGETS
    reweight: bool = False


SIGNALS: dict[str, Signal] = {
    "full": Signal("teacher"),  # the stored targets
    "smoothing": Signal("smoothed"),  # universal: label smoothing matched to the teacher's mean confidence
    "relations": Signal("relations"),  # domain: the class's mean teacher distribution
    "reweight": Signal("label", reweight=True),  # instance: the hard label, weighted by p(true class | view)
    "relations+reweight": Signal("relations", reweight=True),
    "smoothing+reweight": Signal("smoothed", reweight=True),
}


def check_signal(cfg, mode: str) -> None:
    """The ``--kd-signal`` a run's flags allow: a derived signal needs cached mode (``mode``: the
    run's, ``modes.pick``)."""
    name = cfg.kd_signal
    if name not in SIGNALS:
        raise KdcacheError(f"--kd-signal must be one of {', '.join(SIGNALS)}, got {name!r}")
    if name == "full" or mode == "cached":
        return
    why = {"labels": "without --cache there are no teacher outputs to derive it from: pass --cache CACHE"
                     if not cfg.cache else "--mode labels trains on the labels alone: drop --mode labels",
           "live": "with --teacher the targets come from a live teacher: drop --teacher and pass --cache CACHE"}[mode]
    raise KdcacheError(f"--kd-signal {name} derives its targets from a cache's teacher outputs (cached mode); {why}")


# ---- the teacher's distribution of one record --------------------------------------------------------


def record_distribution(logprobs: torch.Tensor, classes: torch.Tensor, num_classes: int, tail: str):
    """The teacher's dense distribution of each record at T = 1, described sparsely, as the loss sees
    it: ``(p, q)`` with ``p`` (M, k) the probabilities of the stored classes and ``q`` (M,) that of
    each other class (``teacher_at_temperature`` at T = 1, float64): the tail mass spread evenly
    over the C − k other classes (``uniform``, ``bucket``), none (``renorm``: the top-k
    renormalised; ``sampled``: the drawn weights)."""
    _, p, _, q, _ = teacher_at_temperature(logprobs, num_classes, 1.0, tail, torch.float64)
    return p, q


def true_class_prob(p: torch.Tensor, q: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(M,) the teacher's probability of each record's true class: its stored one, or the tail's share."""
    hit = classes == labels[:, None]
    return (p * hit).sum(1) + torch.where(hit.any(1), torch.zeros_like(q), q)


# ---- one pass over the cache ---------------------------------------------------------------------------


@dataclass
class CacheStats:
    """What ``cache_stats`` found over every view of every usable record of the run's shards."""

    num_classes: int
    tail: str
    records: int  # (record, view) entries
    images: int  # usable records
    epsilon: float  # mean teacher probability off the true class
    relations: np.ndarray  # (C, C) float64: row y = mean teacher distribution over the entries of class y
    class_entries: np.ndarray  # (C,) entries per true class
    shards: list[str] = field(default_factory=list)

    @property
    def mean_true_prob(self) -> float:
        """The normaliser of the re-weighting: the mean teacher probability of the true class, 1 − ε."""
        return 1.0 - self.epsilon


def _shard_labels(url: str, name: str, reader: CacheReader, what: str) -> tuple[np.ndarray, set]:
    """The labels of a shard's records, in the cache's order; checks that the shard is the cache group's."""
    keys, labels = scan_labels(url)
    ckeys = [str(k) for k in reader.keys(name)]
    if keys != ckeys:
        i = next((j for j, (a, b) in enumerate(zip(keys, ckeys)) if a != b), min(len(keys), len(ckeys)))
        raise KdcacheError(f"shard {url} does not match cache group {name!r} of {reader.path}: the keys differ from "
                           f"record {i} on ({len(keys)} in the shard, {len(ckeys)} in the cache); use the --data the "
                           "cache was made from")
    bad = set(reader.shard_attrs(name).get("bad", {}) or {})
    C = reader.num_classes
    out = np.full(len(keys), -1, dtype=np.int64)
    for i, (k, c) in enumerate(zip(keys, labels)):
        if k in bad:
            continue
        if c is None:
            raise KdcacheError(f"sample {k!r} in shard {url} has no cls label, but {what} needs each record's class; "
                               "use labelled shards, or --kd-signal full")
        if not 0 <= c < C:
            raise KdcacheError(f"sample {k!r} in shard {url} has cls {c}, outside the cache's {C} classes")
        out[i] = c
    return out, bad


def cache_stats(reader: CacheReader, urls: list[str], tail: str, what: str = "a derived --kd-signal") -> CacheStats:
    """ε, the class-relation table and the entry counts, in one pass over the cache's arrays of the
    shards ``urls`` (all views of every usable record; labels from the shards' cls members).
    ``tail`` forms each record's dense distribution (``record_distribution``)."""
    aug = reader.manifest.get("augmentation") or {}
    if aug.get("mixup"):
        raise KdcacheError(f"cache {reader.path} holds targets of mixed images (precompute --mixup): {what} needs each "
                           "record's single true class, which a mixed image does not have. Use a cache made without "
                           "--mixup, or --kd-signal full")
    C = reader.num_classes
    sums = np.zeros((C, C), dtype=np.float64)
    entries = np.zeros(C, dtype=np.int64)
    p_true, images, names = 0.0, 0, []
    for url in urls:
        name = shard_name(url)
        labels, bad = _shard_labels(url, name, reader, what)
        d = reader.read_shard(name)
        good = labels >= 0
        lp, ids = d["logprobs"][good], d["classes"][good].astype(np.int64)  # (n, V, k)
        n, V, k = lp.shape
        if n == 0:
            continue
        y = torch.from_numpy(np.repeat(labels[good], V))
        ids_t = torch.from_numpy(ids.reshape(-1, k))
        p, q = record_distribution(torch.from_numpy(lp.reshape(-1, k)), ids_t, C, tail)
        p_true += float(true_class_prob(p, q, ids_t, y).sum())
        # row y += the record's dense distribution: q everywhere, then p − q at its stored classes
        flat = (y[:, None] * C + ids_t.clamp_min(0)).reshape(-1).numpy()  # a sampled slot's -1 has p = q = 0
        sums += np.bincount(flat, weights=(p - q[:, None]).reshape(-1).numpy(), minlength=C * C).reshape(C, C)
        sums += np.bincount(y.numpy(), weights=q.numpy(), minlength=C)[:, None]
        entries += np.bincount(y.numpy(), minlength=C)
        images += n
        names.append(name)
    total = int(entries.sum())
    if total == 0:
        raise KdcacheError(f"cache {reader.path} holds no usable record of the run's shards: {what} has nothing to "
                           "average")
    relations = sums / np.maximum(entries, 1)[:, None]
    eps = 1.0 - p_true / total
    return CacheStats(C, tail, total, images, float(eps), relations, entries, names)


def confused_pairs(relations: np.ndarray, entries: np.ndarray, top: int) -> list[tuple[int, int, float]]:
    """The ``top`` most confused class pairs (a, b), a < b: the teacher's mean probability of each
    on the other's records, averaged over the two directions (classes without entries left out)."""
    C = len(relations)
    seen = entries > 0
    both = (relations + relations.T) / 2
    pairs = [(float(both[a, b]), a, b) for a in range(C) for b in range(a + 1, C) if seen[a] and seen[b]]
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [(a, b, v) for v, a, b in pairs[:top]]


# ---- targets during training ----------------------------------------------------------------------------


def _label_target(s: "DerivedSignal", y: torch.Tensor):
    """The hard label: one class with log-probability 0 (no tail mass)."""
    return torch.zeros(len(y), 1, device=y.device), y[:, None]


def _smoothed_target(s: "DerivedSignal", y: torch.Tensor):
    """1 − ε on the true class; the uniform tail spreads ε over the C − 1 others."""
    return torch.full((len(y), 1), s.log_keep, device=y.device), y[:, None]


def _relations_target(s: "DerivedSignal", y: torch.Tensor):
    """Row y of the relation table over all C classes (k = C: no tail); −inf where the row is 0."""
    table = s.log_relations(y.device)
    return table[y], torch.arange(s.num_classes, device=y.device).expand(len(y), -1)


TARGETS = {"label": _label_target, "smoothed": _smoothed_target, "relations": _relations_target}


class DerivedSignal:
    """A derived signal with the statistics it needs: the targets and row weights of each batch."""

    def __init__(self, name: str, stats: CacheStats):
        self.name, self.signal, self.stats = name, SIGNALS[name], stats
        self.num_classes = stats.num_classes
        if self.signal.reweight and not stats.mean_true_prob > 0:
            raise KdcacheError(f"--kd-signal {name}: the teacher gives the true class no probability on any record, "
                               "so there is nothing to weight by")
        keep = 1.0 - stats.epsilon
        self.log_keep = math.log(keep) if keep > 0 else -math.inf
        self._log_rel: dict = {}

    def backend(self, requested: str) -> str:
        """The loss backend: a dense target (relations, k = C) gains nothing from the fused kernel,
        so ``auto`` takes the PyTorch reference for it; sparse ones follow ``requested``."""
        return "torch" if requested == "auto" and self.signal.target == "relations" else requested

    def log_relations(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._log_rel:
            with np.errstate(divide="ignore"):
                self._log_rel[key] = torch.from_numpy(np.log(self.stats.relations)).float().to(device)
        return self._log_rel[key]

    def targets(self, batch, device):
        """(log-probs, class ids) of the batch's derived targets, on ``device``."""
        y = batch.label.to(device, non_blocking=True)
        return TARGETS[self.signal.target](self, y)

    def weights(self, batch, device) -> torch.Tensor | None:
        """(B,) p(true class | the batch's view) / (1 − ε), or None for a signal without weights."""
        if not self.signal.reweight:
            return None
        ids = batch.classes.to(device, non_blocking=True)
        p, q = record_distribution(batch.logprobs.to(device, non_blocking=True), ids, self.num_classes, self.stats.tail)
        w = true_class_prob(p, q, ids, batch.label.to(device, non_blocking=True)) / self.stats.mean_true_prob
        return w.float()

    @property
    def record(self) -> dict:
        """What the run records (config.json "resolved", summary.json)."""
        s = self.stats
        return {"name": self.name, "target": self.signal.target, "reweight": self.signal.reweight,
                "epsilon": s.epsilon, "mean_true_prob": s.mean_true_prob, "entries": s.records, "images": s.images,
                "tail": s.tail, "relations": RELATIONS_FILE}

    def artifacts(self, class_names: list[str] | None = None, top: int = 20) -> dict:
        """Files for the run directory: the relation table and a JSON summary of it."""
        s = self.stats
        return {RELATIONS_FILE: s.relations, RELATIONS_JSON: relations_summary(s, class_names, top)}


def relations_summary(s: CacheStats, class_names: list[str] | None, top: int) -> dict:
    """ε, the entry counts and the most confused pairs of a ``CacheStats`` (JSON-ready)."""
    if class_names is not None and len(class_names) != s.num_classes:
        class_names = None  # names of other classes than the cache's teacher's

    def nm(c):
        return class_names[c] if class_names is not None else str(c)

    return {"num_classes": s.num_classes, "epsilon": s.epsilon, "mean_true_prob": s.mean_true_prob,
            "entries": s.records, "images": s.images, "tail": s.tail, "shards": s.shards,
            "class_entries": s.class_entries.tolist(), "class_names": class_names,
            "diagonal": np.diag(s.relations).tolist(),
            "confused_pairs": [{"a": a, "b": b, "a_name": nm(a), "b_name": nm(b), "p_b_on_a": float(s.relations[a, b]),
                                "p_a_on_b": float(s.relations[b, a]), "mean": v}
                               for a, b, v in confused_pairs(s.relations, s.class_entries, top)]}
