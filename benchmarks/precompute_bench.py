"""Precompute benchmark: how much does the data path (read, decode, draw views, render) cost?

In one run, on the same machine, with the same teacher, batch size and device, it measures:

* precompute   - ``kdcache.precompute.precompute`` end to end on real JPEG shards: DataLoader
                 workers read each shard, decode every image once, render V views, the main process
                 runs the teacher, takes top-k and writes the Zarr cache.
* teacher only - the same teacher on pre-rendered view tensors (rendered once, before timing), through
                 the same ``teacher_topk`` call (host-to-device copy, normalisation, forward,
                 log-softmax, top-k). This is the ceiling precompute can reach. Timed before and
                 after the precompute run; the better figure is used.
* data path    - the workers' side alone (read + decode + views + render, no teacher), for context.

The ratio precompute / teacher-only (in views per second) is the share of the teacher's speed that
survives the data path; 1.0 means the data path is free. On a CPU-only machine the workers and the
teacher share the same cores, so the ratio there is a floor, not the GPU figure.

    python benchmarks/precompute_bench.py                       # CPU defaults, about 1-2 minutes
    python benchmarks/precompute_bench.py --device cuda --res 224 --images 5000 --batch-size 256 --workers 8
    python benchmarks/precompute_bench.py --teacher py:kdcache.zoo:teacher_cnn --res 64
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kdcache.precompute import PrecomputeConfig, ShardRenderStream, precompute  # noqa: E402
from kdcache.runtime import resolve_device  # noqa: E402
from kdcache.shards import Sample, decode_image, iter_samples, write_shards  # noqa: E402
from kdcache.teacher import load_teacher, topk_tensors  # noqa: E402
from kdcache.views import AugSpec, render, render_backend, sample_shard_views  # noqa: E402


def make_dataset(root: Path, images: int, shard_size: int, side: int, num_classes: int, seed: int = 0) -> list[str]:
    """JPEG shards of synthetic photos about ``side`` px on their short side (varied aspect ratios)."""
    from PIL import Image

    rng = np.random.default_rng(seed)

    def samples():
        for i in range(images):
            w = int(side * rng.uniform(1.0, 1.5))
            h = int(side * rng.uniform(1.0, 1.3))
            if rng.random() < 0.5:
                w, h = h, w
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            c = int(rng.integers(num_classes))
            f = rng.uniform(0.02, 0.2, 3)
            img = np.stack([128 + 90 * np.sin(xx * f[0] + c), 128 + 90 * np.cos(yy * f[1] - c),
                            128 + 90 * np.sin((xx + yy) * f[2])], -1)
            img += rng.normal(0, 20, img.shape)
            im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            yield Sample(f"img{i:07d}", buf.getvalue(), "jpg", c, "")

    return write_shards(samples(), root, "bench", shard_size)


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    r = render_backend()
    info = {
        "CPU": cpu,
        "cores": f"{os.cpu_count()} logical, torch threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "PIL": f"{r['pil']} {r['pil_version']} ({r['resample']})",
        "python": platform.python_version(),
        "load average at the end (1 min)": f"{os.getloadavg()[0]:.2f}",
    }
    if device.type == "cuda":
        info["GPU"] = torch.cuda.get_device_name(device)
    return info


def render_views(urls, args) -> list[torch.Tensor]:
    """The views precompute will render, rendered once up front (not timed)."""
    aug = AugSpec()
    pixels = []
    for url in urls:
        samples = list(iter_samples(url))
        ims = [decode_image(s) for s in samples]
        sv = sample_shard_views(args.seed, "x", [s.key for s in samples], [(im.height, im.width) for im in ims],
                                args.views, aug)
        for i, im in enumerate(ims):
            for v in range(args.views):
                pixels.append(render(im, sv.view(i, v), args.res))
    return pixels


def time_teacher_only(pixels, args, teacher, device, min_seconds: float) -> float:
    """Views/s of the teacher on pre-rendered views (same batch size, same call as precompute).

    Cycles over the batches for at least ``min_seconds`` (and at least 4 batches), after one warm-up batch.
    """
    batches = [torch.stack(pixels[i: i + args.batch_size]) for i in range(0, len(pixels), args.batch_size)]
    if device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    n = 0
    with torch.inference_mode():
        [t.cpu() for t in topk_tensors(teacher, batches[0], args.topk)]  # warm-up
        t0 = time.perf_counter()
        while n < len(pixels) or time.perf_counter() - t0 < min_seconds:
            b = batches[(n // args.batch_size) % len(batches)]
            [t.cpu() for t in topk_tensors(teacher, b, args.topk)]  # .cpu(), as precompute does: synchronised
            n += len(b)
            if time.perf_counter() - t0 >= min_seconds and n >= min(len(pixels), 4 * args.batch_size):
                break
        seconds = time.perf_counter() - t0
    return n / seconds


def time_data_path(urls, cfg) -> float:
    """Views/s of the workers' side alone: read, decode, draw views, render; no teacher."""
    from torch.utils.data import DataLoader

    from kdcache.precompute import RecordBatch, _identity

    workers = max(0, min(cfg.workers, len(urls)))
    loader = DataLoader(ShardRenderStream(urls, cfg), batch_size=None, num_workers=workers, collate_fn=_identity,
                        prefetch_factor=4 if workers else None)
    n, t0 = 0, time.perf_counter()
    for item in loader:
        if isinstance(item, RecordBatch):
            n += len(item.index)
    return n / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="timm:resnet18", help="teacher spec (random weights; nothing downloaded)")
    p.add_argument("--device", default="auto")
    p.add_argument("--res", type=int, default=112, help="teacher resolution")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--images", type=int, default=160)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--side", type=int, default=256, help="short side of the generated JPEGs")
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-seconds", type=float, default=8.0, help="minimum timing of each teacher-only pass")
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed afterwards)")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kdcache-bench-"))
    try:
        t0 = time.perf_counter()
        urls = make_dataset(work / "data", args.images, args.shard_size, args.side, args.num_classes, args.seed)
        mb = sum(os.path.getsize(u) for u in urls) / 2**20
        print(f"dataset: {args.images} JPEGs (~{args.side}px short side, {mb:.1f} MiB) in {len(urls)} shards, "
              f"made in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        cfg = PrecomputeConfig(
            data=str(work / "data"), teacher=args.teacher, out=str(work / "cache.zarr"), num_classes=args.num_classes,
            views=args.views, topk=args.topk, seed=args.seed, res=args.res, batch_size=args.batch_size,
            device=str(device), workers=args.workers, progress=False, random_init=0,
        )
        teacher, _ = load_teacher(args.teacher, device, num_classes=args.num_classes, resolution=args.res, random_init=0)
        pixels = render_views(urls, args)
        # teacher-only before and after precompute; the better of the two (a shared machine's load
        # only ever slows a measurement down)
        teach = [time_teacher_only(pixels, args, teacher, device, args.teacher_seconds)]
        summary = precompute(cfg)
        teach.append(time_teacher_only(pixels, args, teacher, device, args.teacher_seconds))
        teach_views = max(teach)
        pre_img = summary["images_per_s"]
        pre_views = summary["records"] / summary["seconds"]
        print(f"precompute: {summary['images']} images, {summary['records']} views in {summary['seconds']:.1f}s; "
              f"teacher only: {', '.join(f'{t:.1f}' for t in teach)} views/s", file=sys.stderr)
        data_views = time_data_path(urls, cfg)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    print("\n| teacher | device | res | batch | V | workers | images | precompute (img/s) | precompute (views/s) "
          "| teacher only (views/s) | ratio | data path alone (views/s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| `{args.teacher}` | {device} | {args.res} | {args.batch_size} | {args.views} | {args.workers} | "
          f"{args.images} | {pre_img:.1f} | {pre_views:.1f} | {teach_views:.1f} | **{pre_views / teach_views:.2f}** | "
          f"{data_views:.1f} |")
    print()
    for k, v in machine_info(device).items():
        print(f"- {k}: {v}")


if __name__ == "__main__":
    main()
