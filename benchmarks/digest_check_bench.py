"""What train's start-up check of a cache costs: every view of every group read, decoded and checked
against its digest (``CacheReader.read_shard``, what ``replay.prepare_shards`` runs per group),
against what one epoch reads of the cache (one view per group, ``read_view``).

The caches are storage_bench's synthetic ones (C = 1000, V = 10, top-10, ImageNet-like image sizes,
2 shards x 1000 images by default), plain and compact; each figure is the median of ``--repeat``
fresh readers (a reader validates a group once, so a fresh one pays what train pays). The compact
layout also re-derives the geometry of every view from the seeded sampler, which is most of its cost.

    python benchmarks/digest_check_bench.py [--images 2000] [--mixup] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from storage_bench import synthetic_caches  # noqa: E402


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(path: str, repeat: int) -> dict:
    from kdcache.cache.store import CacheReader

    names = CacheReader(path).shard_names()
    images = sum(CacheReader(path).check_shard(n) for n in names)
    V = CacheReader(path).views

    def startup():  # train's check: every view of every group, digests and values
        r = CacheReader(path)
        for n in names:
            r.read_shard(n)

    def epoch():  # what one epoch reads of the cache: one view per group (digest checked)
        r = CacheReader(path)
        for n in names:
            r.read_view(n, 0)

    s, e = timed(startup, repeat), timed(epoch, repeat)
    return {"groups": len(names), "images": images, "views": V, "startup_check_s": s, "epoch_cache_read_s": e,
            "startup_ms_per_image": 1e3 * s / images, "epoch_read_ms_per_image": 1e3 * e / images}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--mixup", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        built = synthetic_caches(Path(tmp), args.images, args.shards, mixup=args.mixup)
        out = {layout: measure(c["path"], args.repeat) for layout, c in built["caches"].items()}
    for layout, m in out.items():
        print(f"{layout:8s} {m['groups']} groups, {m['images']} images, V = {m['views']}: start-up check "
              f"{m['startup_check_s']:.2f} s ({m['startup_ms_per_image']:.3f} ms/image), one epoch's cache reads "
              f"{m['epoch_cache_read_s']:.3f} s ({m['epoch_read_ms_per_image']:.4f} ms/image)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
