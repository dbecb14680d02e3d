"""Precompute benchmark: how much does the data path (read, decode, draw views, render) cost?

In one run, on the same machine, with the same teacher, batch size and device, it measures:

* precompute   - ``kdcache.tools.precompute.precompute`` end to end on real JPEG shards: DataLoader
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
    python benchmarks/precompute_bench.py --teacher py:kdcache.models.zoo:teacher_cnn --res 64
    python benchmarks/precompute_bench.py --render torch          # the torch render backend (precompute --render)
    python benchmarks/precompute_bench.py --render-per-core --res 224 --side 320 --images 96
                                                                  # PIL vs torch backend, one CPU thread, no teacher
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

from kdcache.tools.precompute import PrecomputeConfig, ShardRenderStream, precompute  # noqa: E402
from kdcache.runtime import resolve_device  # noqa: E402
from kdcache.data.shards import Sample, decode_image, iter_samples, write_shards  # noqa: E402
from kdcache.models.teacher import load_teacher, topk_tensors  # noqa: E402
from kdcache.data.views import AugSpec, sample_shard_views  # noqa: E402
from kdcache.data.render import render
from kdcache.data.render import render_backend


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

    from kdcache.tools.precompute import RecordBatch
    from kdcache.runtime import unbatched

    workers = max(0, min(cfg.workers, len(urls)))
    loader = DataLoader(ShardRenderStream(urls, cfg), batch_size=None, num_workers=workers, collate_fn=unbatched,
                        prefetch_factor=4 if workers else None)
    n, t0 = 0, time.perf_counter()
    for item in loader:
        if isinstance(item, RecordBatch):
            n += len(item.index)
    return n / (time.perf_counter() - t0)


def render_per_core(urls, views: int, res: int, batch: int, images: int, device) -> list[dict]:
    """The workers' job per render backend, in this process on one thread: read the tar, decode each
    image once, draw ``views`` views and render them at ``res`` (over the first ``images`` images).
    On CUDA also the torch backend's device path (nvJPEG ``decode_many`` + crops on the GPU, the
    tar and headers read on the CPU). Returns one row per backend with images/s and views/s."""
    from kdcache.data.shards import decode_shard
    from kdcache.data.render import crop_batch
    from kdcache.data.render import TorchRenderer, make_renderer

    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        renderers = [("pil", "cpu", make_renderer("pil")), ("torch", "cpu", TorchRenderer("cpu"))]
        if device.type == "cuda":
            renderers.append(("torch", "cuda", TorchRenderer(device)))
        for backend, where, r in renderers:
            n_img = n_view = 0
            t0 = time.perf_counter()
            for url in urls:
                if n_img >= images:
                    break
                d = decode_shard(url, renderer=r)  # deferred (CUDA): headers only, decoded below on the device
                decoded = r.decode_many(d.images) if r.deferred else d.images
                sv = sample_shard_views(0, "x", d.keys, d.sizes, views, AugSpec())
                recs = [(decoded, sv, i, v) for i in range(len(d.keys)) for v in range(views)]
                for lo in range(0, len(recs), batch):
                    crops = crop_batch(recs[lo: lo + batch], res, r)
                    if where == "cuda":
                        crops.pixels(device)
                n_img += len(d.keys)
                n_view += len(recs)
            if where == "cuda":
                torch.cuda.synchronize(device)
            s = time.perf_counter() - t0
            out.append({"backend": backend, "where": where, "images": n_img, "views": n_view, "seconds": s,
                        "images_per_s": n_img / s, "views_per_s": n_view / s})
    finally:
        torch.set_num_threads(threads)
    return out


def render_diff(urls, views: int, res: int, images: int, device, teacher=None, topk: int = 5,
                batch: int = 64) -> dict:
    """How far apart the render backends' pixels are, and what that does to a teacher: the same
    views of the first ``images`` images rendered by PIL, by the torch backend on the CPU and (on
    CUDA) on the GPU. Pixels: max and mean |Δ| in uint8 levels of the crops and the share of pixels
    that differ, each backend against PIL (and the GPU against the torch CPU backend). Teacher (when
    given): its log-probabilities on each backend's pixels against PIL's: max and mean |Δ| over PIL's
    top-``topk`` classes, top-1 and top-k set agreement."""
    from kdcache.data.shards import decode_shard
    from kdcache.data.render import crop_batch
    from kdcache.data.render import PIL_RENDERER, TorchRenderer

    renderers = {"pil": PIL_RENDERER, "torch-cpu": TorchRenderer("cpu")}
    if device.type == "cuda":
        renderers["torch-cuda"] = TorchRenderer(device)
    crops: dict = {k: [] for k in renderers}
    n = 0
    for url in urls:
        if n >= images:
            break
        sv = None
        for name, r in renderers.items():
            d = decode_shard(url, renderer=r)
            decoded = r.decode_many(d.images) if r.deferred else d.images
            if sv is None:
                sv = sample_shard_views(0, "x", d.keys, d.sizes, views, AugSpec())
            recs = [(decoded, sv, i, v) for i in range(len(d.keys)) for v in range(views)]
            crops[name].append(torch.cat([crop_batch(recs[lo: lo + batch], res, r).own.cpu()
                                          for lo in range(0, len(recs), batch)]))
        n += len(d.keys)
    own = {k: torch.cat(v) for k, v in crops.items()}
    out = {"images": n, "views": views, "res": res, "crops": int(len(own["pil"])), "pixels": []}
    if device.type == "cuda":  # the claims the GPU path rests on, checked on the first shard
        gpu, cpu = renderers["torch-cuda"], renderers["torch-cpu"]
        d = decode_shard(urls[0], renderer=gpu)
        dec = gpu.decode_many(d.images)
        one = [gpu.decode_many([e])[0] for e in d.images]
        sv = sample_shard_views(0, "x", d.keys, d.sizes, views, AugSpec())
        recs = [(dec, sv, i, v) for i in range(len(d.keys)) for v in range(views)]
        batched = crop_batch(recs, res, gpu).own
        single = torch.cat([crop_batch([rec], res, gpu).own for rec in recs])
        on_cpu = crop_batch([([im.cpu() for im in dec], sv, i, v) for _, _, i, v in recs], res, cpu).own
        out["cuda_checks"] = {
            "decode_batched_equals_single": all(torch.equal(a, b) for a, b in zip(dec, one)),
            "crops_batched_equal_single": bool(torch.equal(batched, single)),
            "crops_repeat_equal": bool(torch.equal(batched, crop_batch(recs, res, gpu).own)),
            "gpu_resample_equals_cpu": bool(torch.equal(batched.cpu(), on_cpu)),
        }
    pairs = [("torch-cpu", "pil")] + ([("torch-cuda", "pil"), ("torch-cuda", "torch-cpu")] if "torch-cuda" in own else [])
    for a, b in pairs:
        dlt = (own[a].int() - own[b].int()).abs()
        out["pixels"].append({"a": a, "b": b, "max": int(dlt.max()), "mean": float(dlt.float().mean()),
                              "share_differing": float((dlt > 0).float().mean())})
    if teacher is not None:
        from kdcache.models.factory import logits_of, normalize

        def logp(x):  # the forward precompute runs (bf16 autocast, channels-last on CUDA), log-softmax in float32
            parts = []
            dev = teacher.device
            with torch.inference_mode():
                for lo in range(0, len(x), batch):
                    px = normalize(x[lo: lo + batch].to(dev).float().div(255.0), teacher.mean, teacher.std)
                    if dev.type == "cuda":
                        with torch.autocast("cuda", dtype=torch.bfloat16):
                            z = logits_of(teacher.model(px.contiguous(memory_format=torch.channels_last)))
                    else:
                        z = logits_of(teacher.model(px))
                    parts.append(torch.log_softmax(z.float(), dim=-1).cpu())
            return torch.cat(parts)

        lp = {k: logp(v) for k, v in own.items()}
        top = lp["pil"].topk(topk, dim=1).indices
        out["teacher"] = []
        for a, b in pairs:
            d = (lp[a].gather(1, top) - lp[b].gather(1, top)).abs()
            ta, tb = lp[a].topk(topk, dim=1).indices, lp[b].topk(topk, dim=1).indices
            out["teacher"].append({
                "a": a, "b": b, "max_abs_dlogprob": float(d.max()), "mean_abs_dlogprob": float(d.mean()),
                "top1_agreement": float((ta[:, 0] == tb[:, 0]).float().mean()),
                "topk_set_agreement": float((ta.sort(1).values == tb.sort(1).values).all(1).float().mean())})
    return out


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
    p.add_argument("--render", default="pil", choices=["pil", "torch"], help="precompute's render backend")
    p.add_argument("--render-per-core", action="store_true",
                   help="only compare the render backends: decode + render V views per image on one CPU thread "
                        "(pil and torch; on CUDA also the torch backend on the GPU); no teacher")
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kdcache-bench-"))
    try:
        t0 = time.perf_counter()
        urls = make_dataset(work / "data", args.images, args.shard_size, args.side, args.num_classes, args.seed)
        mb = sum(os.path.getsize(u) for u in urls) / 2**20
        print(f"dataset: {args.images} JPEGs (~{args.side}px short side, {mb:.1f} MiB) in {len(urls)} shards, "
              f"made in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        if args.render_per_core:
            rows = render_per_core(urls, args.views, args.res, args.batch_size, args.images, device)
            print(f"\n{args.images} JPEGs ~{args.side} px, V = {args.views}, {args.res} px crops, one thread\n")
            print("| backend | where | img/s | views/s |\n|---|---|---:|---:|")
            for r in rows:
                print(f"| {r['backend']} | {r['where']} | {r['images_per_s']:.1f} | {r['views_per_s']:.1f} |")
            print()
            for k, v in machine_info(device).items():
                print(f"- {k}: {v}")
            return
        cfg = PrecomputeConfig(
            data=str(work / "data"), teacher=args.teacher, out=str(work / "cache.zarr"), num_classes=args.num_classes,
            views=args.views, topk=args.topk, seed=args.seed, res=args.res, batch_size=args.batch_size,
            device=str(device), workers=args.workers, progress=False, random_init=0, render=args.render,
            threads=torch.get_num_threads(),  # the teacher-only timing's threads (kdcache's default would be fewer)
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
