"""Drawing sampled targets (``precompute --targets sample``): the batched ``draw_batch`` against the
per-record reference ``draw_record``, side by side on the same log-probs, in one process.

precompute draws the N classes of every record in its main process, between the teacher's batches,
so on a GPU teacher this time adds to every batch. For B = 256 records of log-probs over C classes
(a teacher's float32 log-softmax of N(0, 3²) logits), N = 16 draws, τ = 1, the script times both
(best of ``--repeats``), checks that they return the same classes and counts, and prints µs per
record and the speed-up. It also prints the floor that the sampler's definition sets: the float64
``exp`` and ``cumsum`` over C classes that every record needs.

    python benchmarks/targets_bench.py
    python benchmarks/targets_bench.py --classes 1000 --batch 64 --repeats 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdcache.cache.targets import draw_batch, draw_record, slots  # noqa: E402


def best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def row(C: int, B: int, N: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(C)
    logp = torch.log_softmax(torch.randn(B, C, generator=g) * 3, -1).numpy()
    keys, views = [f"img{i:06d}" for i in range(B)], [i % 8 for i in range(B)]
    width = slots(N, C)

    def reference():
        return [draw_record(logp[r], 0, keys[r], views[r], N, 1.0, width) for r in range(B)]

    def batched():
        return draw_batch(logp, keys, views, 0, N)

    want, (got_c, got_n) = reference(), batched()
    same = all(np.array_equal(c, got_c[r]) and np.array_equal(n, got_n[r]) for r, (c, n) in enumerate(want))
    t_ref, t_batch = best_seconds(reference, repeats), best_seconds(batched, repeats)
    a = logp[0].astype(np.float64)
    t_floor = best_seconds(lambda: [np.cumsum(np.exp(a - a.max())) for _ in range(B)], repeats)
    return {"classes": C, "batch": B, "samples": N, "reference_us_per_record": 1e6 * t_ref / B,
            "batched_us_per_record": 1e6 * t_batch / B, "speedup": t_ref / t_batch,
            "exp_cumsum_floor_us_per_record": 1e6 * t_floor / B, "identical": same}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[1000, 32000, 128000])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [row(C, args.batch, args.samples, args.repeats) for C in args.classes]
    print(f"sampled targets, B = {args.batch}, N = {args.samples}: µs per record (best of {args.repeats})")
    print(f"{'C':>8} {'per record':>11} {'batched':>9} {'speed-up':>9} {'exp+cumsum':>11}  same draws")
    for r in rows:
        print(f"{r['classes']:>8} {r['reference_us_per_record']:>11.1f} {r['batched_us_per_record']:>9.1f} "
              f"{r['speedup']:>8.2f}x {r['exp_cumsum_floor_us_per_record']:>11.1f}  {r['identical']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
