"""Spot checks while training: the teacher re-run on a few of the very batches being trained on.

``kdcache verify`` proves a cache offline; a spot check catches, during the run, a cache paired
with the wrong data (re-encoded images with the same keys and sizes, another resize filter or
preprocessing), before hours are spent on wrong targets. ``SpotCheck.due(epoch, step)`` picks a
fixed fraction of the steps (a pure function of the seed, the epoch and the step, so a resumed run
checks the same steps); ``check(batch)`` runs the cache's teacher on the batch's replayed pixels
(at the cache's resolution) and compares every record with what the cache stored, exactly as
verify compares (``agreement.compare_record``: float16 step plus ``ATOL``, a compact cache's
quantisation step, the tail mass). It returns the figures a run logs (max and mean |Δ log-prob|,
top-1 agreement); a record beyond the tolerance raises ``SpotCheckError`` (exit 1) naming the
shard, key and view, or, with ``strict=False``, is counted and reported in the figures.

Only top-k caches can be spot-checked this way: sampled targets are draws, which ``verify``
re-draws; a check of them is refused.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..cache.agreement import ATOL, RTOL, compare_record
from ..cache.store import CacheReader
from ..data.views import stable_seed
from ..errors import KdcacheError
from ..models.factory import file_sha256
from ..models.teacher import logprob_tensors
from .live import LiveTeacher


class SpotCheckError(KdcacheError):
    """The teacher no longer gives what the cache stored for a record being trained on."""

    exit_code = 1


class SpotCheck:
    """Re-run a cache's teacher on ``fraction`` of the training steps (module doc)."""

    def __init__(self, live: LiveTeacher, fraction: float, *, step: float = 0.0, seed: int = 0, strict: bool = True,
                 atol: float = ATOL, rtol: float = RTOL, cache: str = ""):
        if not 0.0 <= fraction <= 1.0:
            raise KdcacheError(f"the spot-check fraction must lie in [0, 1], got {fraction}")
        self.live, self.fraction, self.step, self.seed, self.strict = live, float(fraction), step, seed, strict
        self.atol, self.rtol, self.cache = atol, rtol, cache

    @classmethod
    def for_cache(cls, cache, fraction: float, *, weights: str | None = None, device=None, seed: int = 0,
                  strict: bool = True, storage_options: dict | None = None) -> "SpotCheck":
        """A spot check with the teacher that made ``cache`` (a path, URL, handle or reader): its spec
        from the manifest, its ``weights`` file (checked against the recorded hash; a seeded random
        teacher needs none)."""
        reader = cache if isinstance(cache, CacheReader) else getattr(cache, "reader", None)
        if reader is None:
            reader = CacheReader(str(cache), storage_options)
        m = reader.manifest
        if reader.kind != "topk":
            raise KdcacheError(f"cache {reader.path} holds sampled targets (draws, not the teacher's log-probs): a spot "
                               "check compares top-k log-probs; check a sampled cache with `kdcache verify`, which "
                               "re-draws its targets")
        t = m["teacher"]
        if "members" in t:
            raise KdcacheError(f"cache {reader.path} was made by an ensemble of {len(t['members'])} teachers; a spot "
                               "check re-runs a single teacher. Check an ensemble cache with `kdcache verify` (one "
                               "--teacher and --teacher-weights per member)")
        if weights is not None:
            if not os.path.isfile(weights):
                raise KdcacheError(f"teacher weights file {weights} does not exist")
            sha = file_sha256(weights)
            if t.get("weights_sha256") and sha != t["weights_sha256"]:
                raise KdcacheError(f"--teacher-weights {weights} (sha256 {sha[:12]}...) are not the weights cache "
                                   f"{reader.path} was made with (sha256 {str(t['weights_sha256'])[:12]}...); a spot "
                                   "check needs the cache's own teacher")
        elif t.get("random_init_seed") is None and t.get("weights_sha256"):
            raise KdcacheError(f"a spot check re-runs the teacher of cache {reader.path} ({t.get('spec')}): pass its "
                               "weights with --teacher-weights")
        live = LiveTeacher.load(t["spec"], weights=weights, cache=reader, device=device)
        return cls(live, fraction, step=reader.logprob_step, seed=seed, strict=strict, cache=reader.path)

    def due(self, epoch: int, step: int) -> bool:
        """Whether step ``step`` of epoch ``epoch`` is checked (about ``fraction`` of all steps)."""
        if self.fraction <= 0.0:
            return False
        u = stable_seed("spot-check", self.seed, epoch, step) / float(1 << 64)
        return u < self.fraction

    @torch.no_grad()
    def check(self, batch, world: int = 1) -> dict:
        """Compare every record of a bound batch with the teacher now; the figures to log. Under DDP
        (``world`` > 1) every rank checks the same step and the figures are those of all ranks
        together; a failure on any rank stops every rank (strict)."""
        if batch.logprobs is None:
            raise KdcacheError("a spot check compares the cache's targets, and this batch carries none")
        device = self.live.teacher.device
        pixels = batch.teacher_pixels(device)
        if pixels is None:
            pixels = batch.pixels(device)
        logp = logprob_tensors(self.live.teacher, pixels, self.live.mean, self.live.std)
        vals, ids = torch.sort(logp, dim=-1, descending=True)
        vals, ids = vals.half().cpu().numpy(), ids.cpu().numpy()
        stored_lp, stored_cls = batch.logprobs.cpu().numpy(), batch.classes.cpu().numpy()
        deltas, top1, failures = [], 0, []
        for i in range(len(batch)):
            r = compare_record(stored_lp[i], stored_cls[i], vals[i], ids[i], self.atol, self.rtol, self.step)
            deltas.append(np.inf if r["max_delta"] is None else r["max_delta"])
            top1 += bool(r["top1_exact"])
            if r["reasons"]:
                failures.append(f"shard {batch.shards[i]!r}, key {batch.keys[i]!r}, view {batch.view}: "
                                f"{r['reasons'][0]}")
        d = np.asarray(deltas, dtype=np.float64)
        sums = torch.tensor([len(d), float(d.sum()), top1, len(failures)], dtype=torch.float64)
        worst = torch.tensor([float(d.max()) if len(d) else 0.0], dtype=torch.float64)
        if world > 1:
            sums, worst = _all_ranks(sums, "sum", device), _all_ranks(worst, "max", device)
        n, total, agree, failed = (float(x) for x in sums)
        if failed and self.strict:
            where = failures[0] if failures else "a record on another rank"
            more = f" (and {int(failed) - 1} more records of this step)" if failed > 1 else ""
            raise SpotCheckError(
                f"spot check: the teacher no longer gives what cache {self.cache} stored for {where}{more}. "
                "The cache and these shards do not belong together (re-encoded images, another resize or "
                "preprocessing), or the teacher differs; run `kdcache verify` on them, or pass --spot-check-warn "
                "to train on anyway")
        out = {"spot_records": int(n), "spot_max_dlogprob": float(worst[0]), "spot_mean_dlogprob": total / max(n, 1),
               "spot_top1_agree": agree / max(n, 1), "spot_failures": int(failed)}
        if failures:
            out["spot_first_failure"] = failures[0]
        return out


def _all_ranks(t: torch.Tensor, op: str, device) -> torch.Tensor:
    import torch.distributed as dist

    x = t.to(device)
    dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x.cpu()


def spot_totals(records: list[dict]) -> dict | None:
    """The run's spot-check figures from its logged checks (``metrics.jsonl`` lines with ``spot_records``)."""
    checks = [r for r in records if "spot_records" in r]
    if not checks:
        return None
    n = sum(r["spot_records"] for r in checks)
    return {"batches": len(checks), "records": n,
            "max_dlogprob": max(r["spot_max_dlogprob"] for r in checks),
            "mean_dlogprob": sum(r["spot_mean_dlogprob"] * r["spot_records"] for r in checks) / max(n, 1),
            "top1_agree": sum(r["spot_top1_agree"] * r["spot_records"] for r in checks) / max(n, 1),
            "failures": sum(r["spot_failures"] for r in checks)}
