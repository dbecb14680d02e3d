"""The GPU benchmark suite: every figure docs/benchmarks.md still lacks, in one command.

    python benchmarks/gpu_suite.py --out DIR                     # CUDA: about 7 minutes (--budget-s 420)
    python benchmarks/gpu_suite.py --out DIR --device cpu --quick   # the same code paths on the CPU, < 1 min
    make bench-gpu BENCH_OUT=DIR                                 # the same, through the Makefile

Three sections, each under its share of the time budget (combinations that do not fit in memory or
in the remaining time are skipped and listed with the reason):

1. **loss**: one forward + backward of the sparse-KD loss (loss and d/d logits) for
   B x C x logits dtype x k x tail mode (and sampled targets), four implementations: the naive dense loss (the dense
   teacher built by scatter, then KL), the PyTorch reference (``sparse_kd_loss_reference``), the
   reference under ``torch.compile`` (dynamic shapes; its first call, the compile, is reported
   apart) and the fused Triton kernel (``sparse_kd_loss(backend="triton")``). Medians of CUDA-event
   timings after warm-up, achieved bandwidth (3·B·C·itemsize bytes: two reads of the logits and one
   write of the gradient) against a measured device-to-device copy, peak extra memory of each
   (``torch.cuda.max_memory_allocated`` around one call, gradient included), and each loss value
   against the reference's.
2. **precompute**: ``kdcache.tools.precompute`` end to end on generated JPEG shards with a timm teacher
   (random weights, ``random_init=0``) at 224 px, once per render backend (``--render pil`` and
   ``--render torch``: on CUDA the torch backend decodes with nvJPEG and crops on the GPU), against
   the same teacher's forward on pre-rendered tensors (``precompute_bench.time_teacher_only``): the
   data-path ratio, goal >= 0.9; then ``--render pil --targets sample --samples 16``, whose draws
   run in the main process between teacher batches (its ratio against the top-k row shows what
   drawing costs next to this teacher). Also each backend's decode + render speed on one CPU core
   (and, on CUDA, the torch backend's on the GPU).
3. **train**: a timm student at 224 px from the precompute section's caches, labels-only, cached KD
   and live KD, bf16 autocast and channels-last, eager and ``--compile``
   (``TrainConfig(compile=True, channels_last=True, amp="bf16")``), for each backend's cache:
   steady-state img/s (``train_bench.steady_ips``) and main-process CPU ms per image. Goal: cached
   >= 0.95x labels-only.

It writes ``gpu_suite.json`` (everything, with the machine: device name, driver, torch, triton,
torchvision, timm, Python, CPU) and ``gpu_suite.md`` (the tables) into ``--out``. With ``--device
cpu`` the Triton kernel runs under ``TRITON_INTERPRET=1`` (set here) and the compile variants are
skipped (inductor's CPU code generation takes minutes per shape): CPU figures are smoke figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Draws per record of the precompute row with sampled targets (the targets study's choice).
SAMPLES = 16

# Section shares of the time budget (a section may use what an earlier one left).
SHARES = {"loss": 0.40, "precompute": 0.25, "train": 0.35}

FULL = SimpleNamespace(
    B=(256, 1024, 4096), C=(1000, 32000, 128000), dtypes=("float32", "bfloat16"), k=(10, 100),
    tails=("uniform", "renorm", "bucket", "sampled"), warmup=3, iters=10, temperature=2.0,
    teacher="timm:resnet50", student="timm:resnet18", res=224, images=2048, shard_size=128, side=320,
    classes=1000, views=4, topk=10, batch=256, teacher_seconds=4.0, train_views=2, train_epochs=2, log_every=4,
    render_images=48,
)
QUICK = SimpleNamespace(
    B=(16,), C=(100, 1000), dtypes=("float32", "bfloat16"), k=(10,), tails=("uniform", "renorm", "bucket", "sampled"),
    warmup=1, iters=7, temperature=2.0,
    teacher="timm:resnet18", student="timm:resnet18", res=32, images=48, shard_size=16, side=48, classes=10,
    views=2, topk=5, batch=16, teacher_seconds=0.5, train_views=2, train_epochs=2, log_every=2, render_images=16,
)


# ---- the machine ---------------------------------------------------------------------------------


def environment(device) -> dict:
    import importlib.metadata as md

    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(), "device": str(device),
           "torch": torch.__version__, "cpu_count": os.cpu_count()}
    for dist in ("triton", "torchvision", "timm", "numpy", "zarr", "webdataset", "pillow", "pillow-simd"):
        try:
            env[dist] = md.version(dist)
        except md.PackageNotFoundError:
            env[dist] = None
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        env["cpu"] = platform.processor() or None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   sm_count=p.multi_processor_count, cuda=torch.version.cuda)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    return env


# ---- 1. the loss ---------------------------------------------------------------------------------


def naive_loss(z, logprobs, classes, T, tail):
    """The dense way: the teacher's full distribution built by scatter, then KL (every tail, and sampled targets)."""
    import torch
    import torch.nn.functional as F

    from loss_bench import naive_kd_loss

    if tail == "uniform":
        return naive_kd_loss(z, logprobs, classes, T)
    B, C = z.shape
    ids = classes.long()
    l = logprobs.float()
    log_q = F.log_softmax(z.float() / T, dim=-1)
    if tail in ("renorm", "sampled"):  # sampled: the stored weights are the target as they are, not tempered
        p = torch.zeros(B, C, device=z.device).scatter(1, ids, torch.softmax(l if tail == "sampled" else l / T, dim=-1))
        return F.kl_div(log_q, p, reduction="batchmean") * (T * T)
    # bucket: the uniform teacher at T and the student, each as k classes + one tail bucket
    k = l.shape[1]
    m = (1.0 - l.double().exp().sum(-1)).clamp_min(0.0).float()
    u = torch.log(torch.clamp(m, min=1e-30) / max(C - k, 1)).masked_fill(m <= 0, float("-inf"))
    t = u[:, None].expand(B, C).scatter(1, ids, l)
    log_p = F.log_softmax(t / T, dim=-1)
    p_top = log_p.gather(1, ids).exp()
    p_tail = (1.0 - p_top.sum(-1)).clamp_min(0.0)
    s_top = log_q.gather(1, ids)
    s_tail = log_q.scatter(1, ids, float("-inf")).logsumexp(-1)
    kl = (torch.xlogy(p_top, p_top) - p_top * s_top).sum(-1) + torch.xlogy(p_tail, p_tail) - p_tail * s_tail
    return kl.mean() * (T * T)


def _time(fn, device, warmup, iters):
    from loss_bench import time_fn

    return time_fn(fn, device, warmup, iters)


def _measure(row, name, fn, device, cfg, B, C, es, skipped, what) -> None:
    """One implementation on one input: first call (compiles; not timed), peak extra memory,
    median time, GB/s and the loss value, into ``row``; a failure is recorded, not raised."""
    import torch

    from loss_bench import peak_extra_mib

    cuda = device.type == "cuda"
    try:
        t0 = time.perf_counter()
        loss, _ = fn()
        loss = loss.detach()
        if cuda:
            torch.cuda.synchronize()
        row[f"{name}_first_s"] = time.perf_counter() - t0
        row[f"{name}_loss"] = float(loss)
        row[f"{name}_mib"] = peak_extra_mib(fn, device)
        warm, iters = (cfg.warmup, cfg.iters) if (cuda or name != "triton") else (0, 1)
        ms = _time(fn, device, warm, iters)
        row[f"{name}_ms"] = ms
        row[f"{name}_gbs"] = 3 * B * C * es / (ms * 1e-3) / 1e9
    except torch.OutOfMemoryError:
        skipped.append({"what": f"{what} {name}", "why": "out of GPU memory"})
        torch.cuda.empty_cache()
    except Exception as e:  # a failing implementation is a result, not the end of the suite
        row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def loss_section(cfg, device, deadline, out) -> None:
    """Two passes: the naive loss, the reference and the kernel over every combination (largest
    first: the budget cuts the small, launch-bound shapes), then the reference under ``torch.compile`` (one compile
    per dtype and tail, its first call reported as ``compiled_first_s``) in the time left."""
    import torch

    from kdcache.learn.losses import sparse_kd_loss, sparse_kd_loss_reference, triton_available
    from loss_bench import copy_bandwidth_gbs, make_inputs

    cuda = device.type == "cuda"
    rows, skipped = out["rows"], out["skipped"]
    if cuda:
        copy = copy_bandwidth_gbs(device)
    else:  # a 64 MiB copy, for the record
        x = torch.empty(1 << 26, dtype=torch.uint8)
        y = torch.empty_like(x)
        copy = 2 * x.numel() / (_time(lambda: y.copy_(x), device, 1, 5) * 1e-3) / 1e9
    out["copy_gbs"] = copy
    use_triton = triton_available() and (cuda or os.environ.get("TRITON_INTERPRET") == "1")
    if not use_triton:
        skipped.append({"what": "triton (all)", "why": "triton is not importable" if not triton_available()
                        else "CPU without TRITON_INTERPRET=1"})
    if not cuda:
        skipped.append({"what": "compiled (all)", "why": "CPU run: inductor's C++ code generation takes minutes per "
                        "shape and says nothing about the GPU"})
    combos = [(B, C, dt, k, tail) for dt in cfg.dtypes for k in cfg.k for tail in cfg.tails
              for B in cfg.B for C in cfg.C]
    # Largest first: the goals (bandwidth, memory) are about large B·C, and the small shapes are
    # launch-bound (the first H200 run went smallest first and the budget cut 4096 x 128000).
    combos.sort(key=lambda c: (-c[0] * c[1], c[2], c[3], c[4]))
    T = cfg.temperature
    compiled = torch.compile(sparse_kd_loss_reference, dynamic=True) if cuda else None
    # the eager pass leaves a third of the section's time to the compiles when there are any
    first_deadline = deadline if compiled is None else time.perf_counter() + 0.65 * (deadline - time.perf_counter())

    def inputs(B, C, dt, k):
        dtype = getattr(torch, dt)
        z, lp, ids = make_inputs(B, C, k, dtype, device)
        return z.requires_grad_(), lp, ids, torch.empty((), dtype=dtype).element_size()

    def fb(z, loss_fn):
        def f():
            loss = loss_fn()
            (g,) = torch.autograd.grad(loss, z)
            return loss, g
        return f

    # pass 1: naive, reference, triton
    for B, C, dt, k, tail in combos:
        what = f"B={B} C={C} {dt} k={k} {tail}"
        if k > C:
            skipped.append({"what": what, "why": f"k={k} > C={C}"})
            continue
        if time.perf_counter() > first_deadline:
            skipped.append({"what": what, "why": "time budget spent"})
            continue
        if cuda:
            free, _ = torch.cuda.mem_get_info(device)
            es_ = torch.empty((), dtype=getattr(torch, dt)).element_size()
            need = B * C * (8 * 4 + 3 * es_)  # the naive loss's (B, C) float32 temporaries, logits and gradient
            if need > 0.8 * free:
                skipped.append({"what": what, "why": f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"})
                continue
        z, lp, ids, es = inputs(B, C, dt, k)
        row = {"B": B, "C": C, "dtype": dt, "k": k, "tail": tail}
        fns = {"naive": fb(z, lambda: naive_loss(z, lp, ids, T, tail)),
               "reference": fb(z, lambda: sparse_kd_loss_reference(z, lp, ids, T, tail))}
        if use_triton:
            fns["triton"] = fb(z, lambda: sparse_kd_loss(z, lp, ids, T, tail, backend="triton"))
        for name, fn in fns.items():
            _measure(row, name, fn, device, cfg, B, C, es, skipped, what)
        if use_triton and cuda and "triton_ms" in row:
            try:
                fwd = _time(lambda: sparse_kd_loss(z, lp, ids, T, tail, backend="triton"), device, cfg.warmup,
                            cfg.iters)
                row["triton_fwd_ms"] = fwd
                row["triton_fwd_gbs"] = 3 * B * C * es / (fwd * 1e-3) / 1e9
            except Exception as e:
                row["triton_fwd_error"] = str(e)[:300]
        rows.append(row)
        del z, lp, ids, fns
        if cuda:
            torch.cuda.empty_cache()

    # pass 2: the reference under torch.compile, one (dtype, tail) group after the other
    if compiled is not None:
        for dt in cfg.dtypes:
            for tail in cfg.tails:
                group = [r for r in rows if r["dtype"] == dt and r["tail"] == tail]
                for n, row in enumerate(group):
                    what = f"B={row['B']} C={row['C']} {dt} k={row['k']} {tail} compiled"
                    if time.perf_counter() > deadline:
                        skipped.append({"what": what, "why": "time budget spent"})
                        continue
                    z, lp, ids, es = inputs(row["B"], row["C"], dt, row["k"])
                    _measure(row, "compiled", fb(z, lambda: compiled(z, lp, ids, T, tail)), device, cfg, row["B"],
                             row["C"], es, skipped, what)
                    if n == 0 and "compiled_first_s" in row:
                        row["compile_s"] = round(row["compiled_first_s"], 2)
                    del z, lp, ids
                    torch.cuda.empty_cache()

    for row in rows:
        ref = row.get("reference_loss")
        for name in ("naive", "reference", "compiled", "triton"):
            if ref is not None and f"{name}_loss" in row and name != "reference":
                row[f"{name}_vs_reference"] = abs(row[f"{name}_loss"] - ref) / max(abs(ref), 1e-12)
            if f"{name}_ms" in row and "triton_ms" in row and name != "triton":
                row[f"triton_speedup_vs_{name}"] = row[f"{name}_ms"] / row["triton_ms"]


# ---- 2. precompute -------------------------------------------------------------------------------


def precompute_section(cfg, device, deadline, out, work: Path, state: dict, workers: int) -> None:
    import torch

    from kdcache.tools.precompute import PrecomputeConfig, precompute
    from kdcache.models.teacher import load_teacher
    from precompute_bench import render_diff, render_per_core, render_views, time_teacher_only

    urls = dataset(cfg, work, state)
    out["settings"] = {"teacher": cfg.teacher, "res": cfg.res, "images": cfg.images, "shards": len(urls),
                       "side": cfg.side, "views": cfg.views, "topk": cfg.topk, "batch": cfg.batch, "workers": workers}
    teacher, _ = load_teacher(cfg.teacher, device, num_classes=cfg.classes, resolution=cfg.res, random_init=0)
    ns = SimpleNamespace(seed=0, views=cfg.views, res=cfg.res, batch_size=cfg.batch, topk=cfg.topk)
    per_shard = cfg.shard_size * cfg.views
    pixels = render_views(urls[: max(1, -(-4 * cfg.batch // per_shard))], ns)[: 4 * cfg.batch]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
    teach = [time_teacher_only(pixels, ns, teacher, device, cfg.teacher_seconds)]
    # each backend with top-k targets, then PIL with sampled targets (drawn in the main process)
    for backend, targets in (("pil", "topk"), ("torch", "topk"), ("pil", "sample")):
        what = f"--render {backend}" + (f" --targets {targets}" if targets != "topk" else "")
        if time.perf_counter() > deadline:
            out["skipped"].append({"what": f"precompute {what}", "why": "time budget spent"})
            continue
        cache = work / f"cache-{backend}-{targets}.zarr"
        shutil.rmtree(cache, ignore_errors=True)
        pc = PrecomputeConfig(data=str(work / "data"), teacher=cfg.teacher, out=str(cache), num_classes=cfg.classes,
                              views=cfg.views, topk=cfg.topk, res=cfg.res, batch_size=cfg.batch, device=str(device),
                              workers=workers, progress=False, random_init=0, render=backend, targets=targets,
                              samples=SAMPLES)
        s = precompute(pc)
        if targets == "topk":
            state.setdefault("caches", {})[backend] = str(cache)
        out["rows"].append({"backend": backend, "targets": targets, "what": what, "images": s["images"],
                            "records": s["records"],
                            "seconds": s["seconds"], "images_per_s": s["images_per_s"],
                            "views_per_s": s["records"] / max(s["seconds"], 1e-9), "workers": s.get("workers"),
                            "threads": s.get("threads")})
    teach.append(time_teacher_only(pixels, ns, teacher, device, cfg.teacher_seconds))
    out["teacher_only_views_per_s"] = teach
    best = max(teach)
    for r in out["rows"]:
        r["teacher_only_views_per_s"] = best
        r["ratio"] = r["views_per_s"] / best
    del pixels
    if time.perf_counter() < deadline:  # how far the backends' pixels (and this teacher's outputs) are apart
        out["render_diff"] = render_diff(urls, cfg.views, cfg.res, cfg.render_images, device, teacher, topk=cfg.topk)
    else:
        out["skipped"].append({"what": "render diff", "why": "time budget spent"})
    del teacher
    if time.perf_counter() < deadline:
        out["render_per_core"] = render_per_core(urls, cfg.views, cfg.res, cfg.batch, cfg.render_images, device)
    else:
        out["skipped"].append({"what": "render per core", "why": "time budget spent"})


def dataset(cfg, work: Path, state: dict) -> list[str]:
    from precompute_bench import make_dataset

    if "urls" not in state:
        t0 = time.perf_counter()
        state["urls"] = make_dataset(work / "data", cfg.images, cfg.shard_size, cfg.side, cfg.classes, seed=0)
        with open(work / "data" / "classes.json", "w") as f:
            json.dump([f"c{c}" for c in range(cfg.classes)], f)
        state["dataset_s"] = time.perf_counter() - t0
    return state["urls"]


# ---- 3. train ------------------------------------------------------------------------------------


def train_section(cfg, device, deadline, out, work: Path, state: dict, workers: int) -> None:
    from kdcache.tools.precompute import PrecomputeConfig, precompute
    from kdcache.learn.trainer import TrainConfig, train
    from train_bench import steady_ips

    dataset(cfg, work, state)
    cuda = device.type == "cuda"
    out["settings"] = {"student": cfg.student, "teacher": cfg.teacher, "res": cfg.res, "images": cfg.images,
                       "batch": cfg.batch, "epochs": cfg.train_epochs, "workers": workers, "amp": "bf16",
                       "channels_last": True}
    caches = dict(state.get("caches") or {})
    for backend in ("pil", "torch"):
        if backend not in caches:  # the precompute section did not run: make the cache here
            cache = work / f"cache-{backend}.zarr"
            shutil.rmtree(cache, ignore_errors=True)
            precompute(PrecomputeConfig(data=str(work / "data"), teacher=cfg.teacher, out=str(cache),
                                        num_classes=cfg.classes, views=cfg.views, topk=cfg.topk, res=cfg.res,
                                        batch_size=cfg.batch, device=str(device), workers=workers, progress=False,
                                        random_init=0, render=backend))
            caches[backend] = str(cache)
    # eager runs first (both caches), then --compile: the budget cuts the compile runs first
    plan = [(b, c, m) for c in (False, True) for b in ("pil", "torch") for m in ("labels", "cached", "live")]
    for backend, compile_, mode in plan:
        what = f"{backend} cache, {'compile' if compile_ else 'eager'}, {mode}"
        if compile_ and not cuda:
            out["skipped"].append({"what": what, "why": "CPU run: torch.compile on the CPU is not what this measures"})
            continue
        if time.perf_counter() > deadline:
            out["skipped"].append({"what": what, "why": "time budget spent"})
            continue
        run = work / f"run-{backend}-{int(compile_)}-{mode}"
        shutil.rmtree(run, ignore_errors=True)
        kw = dict(teacher=cfg.teacher, mode="live") if mode == "live" else dict(mode=mode)
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = train(TrainConfig(
                    data=str(work / "data"), cache=caches[backend], student=cfg.student, out=str(run),
                    epochs=cfg.train_epochs, batch_size=cfg.batch, res=cfg.res, workers=workers, device=str(device),
                    progress=False, log_every=cfg.log_every, num_classes=cfg.classes, seed=0, amp="bf16",
                    channels_last=True, compile=compile_, **kw))
        except Exception as e:
            out["rows"].append({"backend": backend, "compile": compile_, "mode": mode,
                                "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        out["rows"].append({"backend": backend, "compile": compile_, "mode": mode, "images_per_s": steady_ips(run),
                            "main_cpu_ms_per_image": s.get("main_cpu_ms_per_image"),
                            "wall_s": time.perf_counter() - t0})
    by = {(r["backend"], r["compile"], r["mode"]): r.get("images_per_s") for r in out["rows"]}
    out["ratios"] = []
    for backend in ("pil", "torch"):
        for compile_ in (False, True):
            lab, cac, liv = (by.get((backend, compile_, m)) for m in ("labels", "cached", "live"))
            if lab and cac:
                out["ratios"].append({"backend": backend, "compile": compile_, "cached_over_labels": cac / lab,
                                      "cached_over_live": cac / liv if liv else None})


# ---- output --------------------------------------------------------------------------------------


def _f(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = ["# kdcache GPU suite", ""]
    lines.append(f"- device: {env.get('gpu') or 'CPU'} ({env['device']}), driver {env.get('driver') or '-'}, "
                 f"CUDA {env.get('cuda') or '-'}")
    lines.append(f"- torch {env['torch']}, triton {env.get('triton')}, torchvision {env.get('torchvision')}, "
                 f"timm {env.get('timm')}, Python {env['python']}; CPU {env.get('cpu')} ({env['cpu_count']} cores)")
    lines.append(f"- mode: {'quick' if res['quick'] else 'full'}, budget {res['budget_s']:.0f} s, took "
                 f"{res['seconds']:.0f} s, {res['date']}"
                 + ("; **CPU smoke figures, not GPU performance**" if env["device"] == "cpu" else ""))
    lines.append("")
    sec = res["sections"]
    if "loss" in sec:
        s = sec["loss"]
        lines += ["## Sparse-KD loss (forward + backward)", "",
                  f"Device-to-device copy: {_f(s.get('copy_gbs'), '.0f')} GB/s (read + write). ms = median; GB/s = "
                  "3·B·C·itemsize / time; MiB = peak extra memory of one call (gradient included); Δ = |loss − "
                  "reference| / |reference|.", "",
                  "| B | C | dtype | k | tail | naive ms | ref ms | compiled ms | triton ms | triton GB/s (% copy) "
                  "| ×naive | ×ref | ×compiled | MiB naive / ref / compiled / triton | Δ triton |",
                  "|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
        for r in s.get("rows", []):
            gbs = r.get("triton_gbs")
            pct = f"{_f(gbs, '.0f')} ({100 * gbs / s['copy_gbs']:.0f}%)" if gbs and s.get("copy_gbs") else "-"
            mib = " / ".join(_f(r.get(f"{n}_mib"), ".0f") for n in ("naive", "reference", "compiled", "triton"))
            errs = "; ".join(f"{n}: {r[f'{n}_error']}" for n in ("naive", "reference", "compiled", "triton")
                             if f"{n}_error" in r)
            lines.append(f"| {r['B']} | {r['C']} | {r['dtype']} | {r['k']} | {r['tail']} | {_f(r.get('naive_ms'))} | "
                         f"{_f(r.get('reference_ms'))} | {_f(r.get('compiled_ms'))} | {_f(r.get('triton_ms'))} | {pct} | "
                         f"{_f(r.get('triton_speedup_vs_naive'))} | {_f(r.get('triton_speedup_vs_reference'))} | "
                         f"{_f(r.get('triton_speedup_vs_compiled'))} | {mib} | {_f(r.get('triton_vs_reference'), '.1e')} |"
                         + (f" errors: {errs}" if errs else ""))
        compiles = [(r["dtype"], r["tail"], r["compile_s"]) for r in s.get("rows", []) if "compile_s" in r]
        if compiles:
            lines += ["", "torch.compile first calls: " + ", ".join(f"{d} {t} {c:.1f} s" for d, t, c in compiles)]
        lines.append("")
    if "precompute" in sec:
        s = sec["precompute"]
        st = s.get("settings", {})
        lines += ["## Precompute data path", "",
                  f"Teacher `{st.get('teacher')}` (random weights) at {st.get('res')} px, {st.get('images')} JPEGs "
                  f"(~{st.get('side')} px) in {st.get('shards')} shards, V = {st.get('views')}, batch {st.get('batch')}, "
                  f"{st.get('workers')} workers. Teacher only (pre-rendered tensors): "
                  + ", ".join(f"{v:.0f}" for v in s.get("teacher_only_views_per_s", [])) + " views/s.", "",
                  "| precompute | img/s | views/s | teacher only views/s | ratio (goal ≥ 0.9) |", "|---|---:|---:|---:|---:|"]
        for r in s.get("rows", []):
            # A section cut short leaves rows without the teacher-only figure: '-' where a number is missing.
            lines.append(f"| {r['what']} | {_f(r.get('images_per_s'), '.1f')} | {_f(r.get('views_per_s'), '.1f')} | "
                         f"{_f(r.get('teacher_only_views_per_s'), '.1f')} | **{_f(r.get('ratio'))}** |")
        rd = s.get("render_diff")
        if rd:
            lines += ["", f"Backends against each other, {rd['crops']} crops of {rd['images']} images at {rd['res']} px "
                      "(|Δ| in uint8 levels; the teacher's log-probs over the first one's top-k):", "",
                      "| a vs b | max \\|Δ\\| | mean \\|Δ\\| | pixels differing | max \\|Δ log-prob\\| | mean \\|Δ log-prob\\| "
                      "| top-1 agree | top-k set agree |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for px, te in zip(rd["pixels"], rd.get("teacher") or [{}] * len(rd["pixels"])):
                lines.append(f"| {px['a']} vs {px['b']} | {px['max']} | {px['mean']:.4f} | {100 * px['share_differing']:.2f}% "
                             f"| {_f(te.get('max_abs_dlogprob'), '.2e')} | {_f(te.get('mean_abs_dlogprob'), '.2e')} "
                             f"| {_f(te.get('top1_agreement'), '.3f')} | {_f(te.get('topk_set_agreement'), '.3f')} |")
        if rd and rd.get("cuda_checks"):
            lines += ["", "GPU path checks (first shard): " + ", ".join(f"{k} {v}" for k, v in rd["cuda_checks"].items())]
        if s.get("render_per_core"):
            lines += ["", "Decode once + render V views, one CPU thread (the workers' job), or the GPU:", "",
                      "| backend | where | images | img/s | views/s |", "|---|---|---:|---:|---:|"]
            for r in s["render_per_core"]:
                lines.append(f"| {r['backend']} | {r['where']} | {r['images']} | {r['images_per_s']:.1f} | "
                             f"{r['views_per_s']:.1f} |")
        lines.append("")
    if "train" in sec:
        s = sec["train"]
        st = s.get("settings", {})
        lines += ["## Training throughput", "",
                  f"Student `{st.get('student')}` at {st.get('res')} px, batch {st.get('batch')}, {st.get('images')} "
                  f"images, {st.get('epochs')} epochs, {st.get('workers')} workers, bf16 autocast, channels-last; "
                  "steady-state img/s (first logging window left out).", "",
                  "| cache | compile | mode | img/s | main CPU ms/img |", "|---|---|---|---:|---:|"]
        for r in s.get("rows", []):
            lines.append(f"| {r['backend']} | {'yes' if r['compile'] else 'no'} | {r['mode']} | "
                         f"{_f(r.get('images_per_s'), '.0f')} | {_f(r.get('main_cpu_ms_per_image'))} |"
                         + (f" error: {r['error']}" if r.get("error") else ""))
        if s.get("ratios"):
            lines += ["", "| cache | compile | cached / labels (goal ≥ 0.95) | cached / live |", "|---|---|---:|---:|"]
            for r in s["ratios"]:
                lines.append(f"| {r['backend']} | {'yes' if r['compile'] else 'no'} | **{r['cached_over_labels']:.2f}** "
                             f"| {_f(r.get('cached_over_live'))} |")
        lines.append("")
    skipped = [(name, x) for name, s in sec.items() for x in s.get("skipped", [])]
    if skipped:
        lines += ["## Skipped", ""] + [f"- {name}: {x['what']}: {x['why']}" for name, x in skipped] + [""]
    errors = [(name, s["error"]) for name, s in sec.items() if s.get("error")]
    if errors:
        lines += ["## Errors", ""] + [f"- {name}: {e.splitlines()[-1]}" for name, e in errors] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu_suite.json and gpu_suite.md (e.g. $OUT on the device)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the CPU smoke run; default on the CPU)")
    p.add_argument("--budget-s", type=float, default=None, help="time budget in seconds (default 420, quick 120)")
    p.add_argument("--sections", default="loss,precompute,train")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores - 2, at most 12)")
    p.add_argument("--work", default=None, help="keep data, caches and runs here (default: a temp dir)")
    a = p.parse_args(argv)

    if (a.device or "").startswith("cpu"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel is first jitted
    import torch

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = a.quick or device.type == "cpu"
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    cfg = QUICK if quick else FULL
    budget = a.budget_s if a.budget_s is not None else (120.0 if quick else 420.0)
    workers = a.workers if a.workers is not None else (1 if quick else max(1, min(12, (os.cpu_count() or 4) - 2)))
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="kdcache-gpu-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    res = {"schema": 1, "quick": quick, "budget_s": budget, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "environment": environment(device), "sections": {}}
    t0 = time.perf_counter()
    state: dict = {}
    rc = 0
    try:
        used = 0.0
        for name in sections:
            share = sum(SHARES[n] for n in sections[: sections.index(name) + 1]) / sum(SHARES[n] for n in sections)
            deadline = t0 + budget * share
            sec = res["sections"][name] = {"rows": [], "skipped": []}
            ts = time.perf_counter()
            print(f"[gpu_suite] {name} (until t+{deadline - t0:.0f} s)", file=sys.stderr, flush=True)
            try:
                if name == "loss":
                    loss_section(cfg, device, deadline, sec)
                elif name == "precompute":
                    precompute_section(cfg, device, deadline, sec, work, state, workers)
                elif name == "train":
                    train_section(cfg, device, deadline, sec, work, state, workers)
                else:
                    raise ValueError(f"unknown section {name!r}")
            except Exception:
                sec["error"] = traceback.format_exc()
                print(sec["error"], file=sys.stderr, flush=True)
                rc = 1
            sec["seconds"] = time.perf_counter() - ts
            used += sec["seconds"]
            res["seconds"] = time.perf_counter() - t0
            (out_dir / "gpu_suite.json").write_text(json.dumps(res, indent=1, default=str))  # partial results too
    finally:
        res["seconds"] = time.perf_counter() - t0
        res["dataset_s"] = state.get("dataset_s")
        (out_dir / "gpu_suite.json").write_text(json.dumps(res, indent=1, default=str))
        (out_dir / "gpu_suite.md").write_text(markdown(res))
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(res))
    return rc


if __name__ == "__main__":
    sys.exit(main())
