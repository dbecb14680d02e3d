"""Sparse-KD loss benchmark: naive PyTorch vs the reference vs the fused Triton kernel.

For every (B, C) it times one forward + backward (loss and d loss / d logits) and records the peak
extra memory it allocates (CUDA only), then prints a markdown table.

* naive     - dense teacher target built by scatter, log_softmax of both, F.kl_div (what a
              straightforward implementation does).
* reference - kdcache.learn.losses.sparse_kd_loss_reference (PyTorch, autograd).
* triton    - kdcache.learn.losses.sparse_kd_loss(backend="triton"): one kernel launch computes loss and
              gradient; backward is one scaling. CUDA only.

On CUDA: median of CUDA-event timings after warm-up; the kernel's achieved bandwidth (its forward
reads the logits twice and writes the gradient once) is compared with a measured device-to-device
copy. On CPU: median of time.perf_counter timings; the Triton kernel is skipped (the interpreter is
a correctness tool, not a benchmark) and memory is not measured.

    python benchmarks/loss_bench.py                  # CUDA: B in {256,1024,4096} x C in {1k,32k,128k}
    python benchmarks/loss_bench.py --quick          # small sizes (the default on CPU)
    python benchmarks/loss_bench.py --sizes 256x1000,64x32000 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kdcache.learn.losses import sparse_kd_loss, sparse_kd_loss_reference, triton_available  # noqa: E402

FULL_SIZES = [(b, c) for b in (256, 1024, 4096) for c in (1000, 32000, 128000)]
QUICK_SIZES = [(64, 1000), (256, 1000), (64, 32000), (256, 32000), (64, 128000)]


def naive_kd_loss(z, logprobs, classes, T):
    """Dense teacher target by scatter, then log_softmax and kl_div (uniform tail)."""
    B, C = z.shape
    k = logprobs.shape[1]
    l = logprobs.float()
    m = (1.0 - l.exp().sum(-1)).clamp_min(0.0)
    u = torch.log(m / (C - k))
    t = u[:, None].expand(B, C).scatter(1, classes.long(), l)
    log_pt = F.log_softmax(t / T, dim=-1)
    log_q = F.log_softmax(z.float() / T, dim=-1)
    return F.kl_div(log_q, log_pt, log_target=True, reduction="batchmean") * (T * T)


def make_inputs(B, C, k, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # teacher: top-k of a random softmax, stored as fp16 log-probs (int32 ids when C > 32767)
    lp = torch.empty(B, k)
    ids = torch.empty(B, k, dtype=torch.long)
    for i in range(0, B, 256):  # chunked: never a (B, C) float32 on the host for big C
        t = torch.randn(min(256, B - i), C, generator=g) * 4
        lp[i:i + 256], ids[i:i + 256] = F.log_softmax(t, -1).topk(k, dim=-1)
    id_dtype = torch.int16 if C <= 32767 else torch.int32
    z = torch.randn(B, C, generator=g).to(dtype)
    return z.to(device), lp.half().to(device), ids.to(id_dtype).to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_mib(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_gbs(device, nbytes=1 << 30, iters=20):
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = time_fn(lambda: y.copy_(x), device, warmup=3, iters=iters)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def machine_description(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or "CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores (nproc), no GPU, torch {torch.__version__}"


def parse_sizes(text):
    out = []
    for part in text.split(","):
        b, c = part.lower().split("x")
        out.append((int(b), int(c)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes (default on CPU)")
    ap.add_argument("--sizes", help="comma-separated BxC list, e.g. 256x1000,1024x32000")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--tail", default="uniform", choices=["uniform", "renorm", "bucket"])
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    on_cuda = device.type == "cuda"
    if args.sizes:
        sizes = parse_sizes(args.sizes)
    elif args.quick or not on_cuda:
        sizes = QUICK_SIZES
    else:
        sizes = FULL_SIZES
    warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 1)
    iters = args.iters if args.iters is not None else (20 if on_cuda else 9)
    T, k = args.temperature, args.k

    print("# Sparse-KD loss benchmark\n")
    print(f"- machine: {machine_description(device)}")
    if not on_cuda:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"- torch threads: {torch.get_num_threads()}; load average at start: {load} "
              "(CPU timings are only meaningful on an otherwise idle machine)")
    print(f"- logits {args.dtype}, k={k}, T={T:g}, tail={args.tail} (naive: uniform), "
          f"forward + backward, median of {iters} after {warmup} warm-up")
    use_triton = on_cuda and triton_available()
    copy_bw = None
    if use_triton:
        copy_bw = copy_bandwidth_gbs(device)
        print(f"- device-to-device copy: {copy_bw:.0f} GB/s (read + write)")
    elif on_cuda:
        print("- Triton kernel: skipped (triton is not importable)")
    else:
        print("- Triton kernel: skipped (no CUDA device; TRITON_INTERPRET is for correctness, not speed)")
        print("- peak extra memory: measured on CUDA only")
    print()

    head = "| B | C | naive ms | reference ms | triton ms | triton fwd ms | triton GB/s (% of copy) " \
           "| naive MiB | reference MiB | triton MiB |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for B, C in sizes:
        z, lp, ids = make_inputs(B, C, k, dtype, device)
        z.requires_grad_()

        def run(loss_fn):
            def f():
                loss = loss_fn()
                (g,) = torch.autograd.grad(loss, z)
                return g
            return f

        impls = {
            "naive": run(lambda: naive_kd_loss(z, lp, ids, T)),
            "reference": run(lambda: sparse_kd_loss_reference(z, lp, ids, T, args.tail)),
        }
        if use_triton:
            impls["triton"] = run(lambda: sparse_kd_loss(z, lp, ids, T, args.tail, backend="triton"))
        ms, mib = {}, {}
        for name, fn in impls.items():
            try:
                mib[name] = peak_extra_mib(fn, device)
                ms[name] = time_fn(fn, device, warmup, iters)
            except torch.OutOfMemoryError:
                ms[name], mib[name] = float("nan"), float("nan")
                torch.cuda.empty_cache()

        fwd_ms = gbs = None
        if use_triton:
            fwd_ms = time_fn(lambda: sparse_kd_loss(z, lp, ids, T, args.tail, backend="triton"),
                             device, warmup, iters)
            es = z.element_size()
            nbytes = B * C * 3 * es + B * k * (2 + ids.element_size()) + B * 4
            gbs = nbytes / (fwd_ms * 1e-3) / 1e9

        def f(x, fmt="{:.2f}"):
            return "n/a" if x is None else fmt.format(x)

        bw = "n/a" if gbs is None else f"{gbs:.0f} ({100 * gbs / copy_bw:.0f}%)"
        print(f"| {B} | {C} | {f(ms['naive'])} | {f(ms['reference'])} | {f(ms.get('triton'))} "
              f"| {f(fwd_ms)} | {bw} | {f(mib['naive'], '{:.0f}')} | {f(mib['reference'], '{:.0f}')} "
              f"| {f(mib.get('triton'), '{:.0f}')} |", flush=True)
        del z, lp, ids
        if on_cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
