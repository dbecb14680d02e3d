"""Training throughput: labels-only vs cached-KD vs live-KD, same student, same data pipeline.

For each teacher the script precomputes a cache (V views, top-k), then trains the same student
three times on the cache's views through the same replay stream:

- ``labels``: cross-entropy on the shards' labels (``--mode labels`` with ``--cache``: the cache
  only supplies the views, so the pipeline is identical);
- ``cached``: sparse-KD loss on the cached top-k (the teacher never runs);
- ``live``: the teacher runs on every batch (``--teacher``), top-k taken like precompute's;
- ``spot``: cached KD with ``--spot-check 1`` (the cache's teacher re-run on every step and compared
  with the stored targets). Its cost is linear in the fraction of steps checked, so the overhead of
  ``--spot-check F`` is F x (spot - cached); the table gives it at F = 0.01, as a share of what a
  live teacher adds (live - cached).

Reported per mode:

- steady-state images/s: the median over logging windows, the first window (worker start-up, the
  first shard decode) left out; labels and cached run ``--repeats`` times, alternating, and the
  median run is kept, to damp interference from other processes;
- the main process's CPU milliseconds per image over the training loop (``summary.json``'s
  ``main_cpu_ms_per_image``: the student step, the loss, the live teacher, batch assembly — not
  the data workers). On a shared or busy machine this is the steadier measure of what cached KD
  adds over labels-only;

and the ratios cached/labels and cached/live of both. The goal is cached >= 0.95x labels-only.

    python benchmarks/train_bench.py                  # CPU defaults, about 2 minutes
    python benchmarks/train_bench.py --device cuda --images 8192 --res 128 --teacher-res 224 \\
        --student timm:resnet18 --teachers py:kdcache.models.zoo:teacher_cnn,timm:resnet50 --batch-size 256
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdcache.tools.precompute import PrecomputeConfig, precompute  # noqa: E402
from kdcache.learn.trainer import TrainConfig, train  # noqa: E402


def make_data(root: Path, shards: int, per_shard: int, classes: int, seed: int = 0) -> Path:
    """JPEG shards of class-structured pictures, 80-140 px, with cls labels."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(root / f"train-{s:06d}.tar")) as w:
            for i in range(per_shard):
                c = int(rng.integers(classes))
                wd, ht = (int(v) for v in rng.integers(80, 141, size=2))
                yy, xx = np.mgrid[0:ht, 0:wd]
                img = np.stack([128 + 100 * np.sin(xx / (3 + c) + c), 128 + 100 * np.cos(yy / (4 + c)),
                                (xx * (c + 1) + yy) % 256], -1) + rng.normal(0, 12, (ht, wd, 3))
                buf = io.BytesIO()
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
                w.write({"__key__": f"s{s}_{i:05d}", "jpg": buf.getvalue(), "cls": str(c).encode()})
    with open(root / "classes.json", "w") as f:
        json.dump([f"c{c}" for c in range(classes)], f)
    return root


def steady_ips(run_dir: Path) -> float:
    """Median images/s over the logging windows after the first."""
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ips = [r["images_per_s"] for r in rows if "images_per_s" in r]
    return statistics.median(ips[1:] if len(ips) > 1 else ips)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teachers", default="py:kdcache.models.zoo:teacher_cnn,timm:resnet50")
    p.add_argument("--student", default="py:kdcache.models.zoo:student_cnn")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--images", type=int, default=256, help="training images in all")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--res", type=int, default=64, help="student resolution")
    p.add_argument("--teacher-res", type=int, default=64)
    p.add_argument("--views", type=int, default=1)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs of labels and cached (median kept)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in the main process, for every run (default: torch's)")
    p.add_argument("--out", default=None, help="keep data, caches and runs here (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="kdcache-train-bench-"))
    data = make_data(work / "data", a.shards, a.images // a.shards, a.classes)
    results = []
    try:
        for teacher in a.teachers.split(","):
            tag = teacher.replace(":", "_").replace(".", "_")
            cache = work / f"cache-{tag}.zarr"
            shutil.rmtree(cache, ignore_errors=True)
            t0 = time.perf_counter()
            pre = precompute(PrecomputeConfig(
                data=str(data), teacher=teacher, num_classes=a.classes, out=str(cache), views=a.views, topk=a.topk,
                res=a.teacher_res, batch_size=a.batch_size, device=a.device, workers=a.workers, progress=False,
                random_init=0,  # random weights on purpose: only the speed is measured
                threads=torch.get_num_threads(),
            ))
            row = {"teacher": teacher, "precompute_images_per_s": pre["images"] * a.views / (time.perf_counter() - t0)}
            runs: dict[str, list] = {"labels": [], "cached": [], "live": [], "spot": []}
            for mode in ["labels", "cached"] * a.repeats + ["live", "spot"]:
                run = work / f"run-{tag}-{mode}"
                shutil.rmtree(run, ignore_errors=True)
                kw = {"live": dict(teacher=teacher, mode="live"), "spot": dict(mode="cached", spot_check=1.0)}.get(
                    mode, dict(mode=mode))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # views reused when epochs > V: expected here
                    s = train(TrainConfig(
                        data=str(data), cache=str(cache), student=a.student, out=str(run), epochs=a.epochs,
                        batch_size=a.batch_size, res=a.res, teacher_res=a.teacher_res, workers=a.workers,
                        device=a.device, progress=False, log_every=a.log_every, num_classes=a.classes, seed=0,
                        threads=torch.get_num_threads(),  # every mode with the same threads (kdcache's default: cores less workers)
                        **kw,
                    ))
                runs[mode].append((steady_ips(run), s["main_cpu_ms_per_image"]))
            for mode, got in runs.items():
                row[mode] = statistics.median(g[0] for g in got)
                row[f"{mode}_cpu_ms"] = statistics.median(g[1] for g in got)
                row[f"{mode}_runs"] = got
            row["cached_over_labels"] = row["cached"] / row["labels"]
            row["cached_over_live"] = row["cached"] / row["live"]
            row["cpu_cached_over_labels"] = row["labels_cpu_ms"] / row["cached_cpu_ms"]  # as a throughput ratio
            row["cpu_cached_over_live"] = row["live_cpu_ms"] / row["cached_cpu_ms"]
            # --spot-check 0.01: 1 % of the per-step cost of checking, against what a live teacher adds
            row["spot_0_01_over_live_extra"] = 0.01 * (row["spot_cpu_ms"] - row["cached_cpu_ms"]) / max(
                row["live_cpu_ms"] - row["cached_cpu_ms"], 1e-9)
            row["spot_0_01_over_cached"] = 0.01 * (row["spot_cpu_ms"] - row["cached_cpu_ms"]) / row["cached_cpu_ms"]
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if not a.out:
            shutil.rmtree(work, ignore_errors=True)

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
               + (f", {torch.cuda.get_device_name(0)}" if a.device.startswith("cuda") else ", CPU only"))
    print(f"\nmachine: {machine}")
    print(f"student {a.student} @ {a.res}px, teacher @ {a.teacher_res}px, batch {a.batch_size}, "
          f"{a.images} images in {a.shards} shards, {a.epochs} epochs, V={a.views}, k={a.topk}, workers {a.workers}, "
          f"device {a.device}, torch threads {torch.get_num_threads()}, median of {a.repeats} runs for labels/cached\n")
    print("| teacher | labels-only img/s | cached-KD img/s | live-KD img/s | cached/labels | cached/live "
          "| main CPU ms/img labels / cached / live / spot-1.0 | CPU cached/labels | CPU cached/live "
          "| --spot-check 0.01 cost: of live's extra / of cached |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['teacher']} | {r['labels']:.0f} | {r['cached']:.0f} | {r['live']:.0f} | "
              f"{r['cached_over_labels']:.2f} | {r['cached_over_live']:.2f} | "
              f"{r['labels_cpu_ms']:.2f} / {r['cached_cpu_ms']:.2f} / {r['live_cpu_ms']:.2f} / {r['spot_cpu_ms']:.2f} | "
              f"{r['cpu_cached_over_labels']:.2f} | {r['cpu_cached_over_live']:.2f} | "
              f"{100 * r['spot_0_01_over_live_extra']:.2f} % / {100 * r['spot_0_01_over_cached']:.2f} % |")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine, "args": vars(a), "results": results}, indent=2))


if __name__ == "__main__":
    main()
