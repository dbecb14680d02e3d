"""How kdcache's costs grow with records and shards, and how many storage requests each step makes.

For each point (images x V = records, with V = 16, in S shards) the script generates tiny JPEGs
(8-12 px) in S tar shards, then runs, each as its own process through
``benchmarks/scale_support.py`` (the cache on ``countfs://``, the local disk counted as object
storage counts requests; ``scale_support`` explains what counts as one request):

- ``precompute`` of half the shards (``--shard-index 0 --num-shard-groups 2``): wall time, cost per
  record beyond the teacher's forward (time from the first forward to exit, less the forward
  passes, per record written), requests per shard written;
- ``resume``: the full command on that half-finished cache: time and requests until the teacher's
  first forward (finding what is left), then it finishes the cache;
- ``open``: ``CacheReader`` and its shard list, as every command starts;
- ``train`` one epoch (cached KD, 1 worker, batch 256): start-up (the trainer's process until the
  student's first forward, and its requests until then), and the epoch (``train_time_s``; the
  student's forward time is in the JSON);
- ``inspect`` (the summary, ``--json``) and ``verify --samples 64``.

Every process reports its peak RSS at exit (``ru_maxrss``, its own and its reaped workers'). The
teacher and the student are ``scale_support``'s linear maps of 2 x 2-pooled pixels (C = 1000,
top-10): their forward passes cost next to nothing, so what is measured is kdcache's own cost.
Torch runs one thread per process.

With ``--latency-ms L`` (default 20) the read paths (open, resume until the first forward, train
start-up, inspect, verify) are run again with L ms added to every request, where the counted
requests x L stay under ``--latency-budget`` seconds (others are marked as skipped).

    python benchmarks/scale_bench.py --quick          # one small point, under a minute on 2 cores
    python benchmarks/scale_bench.py                  # records 1e4 -> 1e6 at 64 shards, shards 10 -> 1000 at 1e5
    python benchmarks/scale_bench.py --points 62500x10000 --latency-ms 0
    python benchmarks/scale_bench.py --json out.json --plot docs/scale.png
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SUPPORT = HERE / "scale_support.py"
V, K, C, RES = 16, 10, 1000, 8
TEACHER, STUDENT = "py:scale_support:teacher", "py:scale_support:student"

QUICK = [(640, 8)]
DEFAULT = [(625, 64), (6250, 64), (62500, 64), (6250, 10), (6250, 100), (6250, 1000)]


# ---- data -------------------------------------------------------------------------------------


def write_data(root: Path, images: int, shards: int, seed: int = 0) -> None:
    """``images`` tiny JPEGs with cls labels in ``shards`` tars (sizes differ by at most one image).
    A pool of 64 encoded images is reused: keys are unique, bytes need not be."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(64):
        h, w = (int(x) for x in rng.integers(8, 13, size=2))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        pool.append(buf.getvalue())
    root.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, images, shards + 1).round().astype(int)
    for s in range(shards):
        with tarfile.open(root / f"train-{s:06d}.tar", "w") as t:
            for i in range(bounds[s], bounds[s + 1]):
                for name, data in ((f"img{i:08d}.jpg", pool[i % len(pool)]), (f"img{i:08d}.cls", str(i % C).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))


# ---- one child process -------------------------------------------------------------------------


def child_env(work: Path, latency_ms: float) -> tuple[dict, Path, Path]:
    req, marks = work / "requests.log", work / "marks.log"
    for p in (req, marks):
        p.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]), OMP_NUM_THREADS="1",
               KDCACHE_BENCH_REQUESTS=str(req), KDCACHE_BENCH_MARKS=str(marks),
               KDCACHE_BENCH_LATENCY_MS=str(latency_ms))
    return env, req, marks


def read_requests(path: Path) -> list[tuple[float, str, int, int]]:
    """(time, kind, count, pid) of every request a run made."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        f = line.split("\t")
        out.append((float(f[0]), f[1], int(f[2]), int(f[7])))
    return out


def read_marks(path: Path) -> dict:
    """first: the earliest first forward (time), pid: its process; forward_s / calls: summed over processes; rss_mb: the
    largest peak RSS a process (or a DataLoader worker it waited for) reported at exit."""
    out = {"first": None, "pid": None, "forward_s": 0.0, "calls": 0, "rss_mb": None}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        f = line.split("\t")
        if f[0] == "first_forward" and (out["first"] is None or float(f[1]) < out["first"]):
            out["first"], out["pid"] = float(f[1]), int(f[2])
        elif f[0] == "forward_total":
            out["forward_s"] += float(f[1])
            out["calls"] += int(f[2])
        elif f[0] == "peak_rss_kb":
            out["rss_mb"] = max(out["rss_mb"] or 0.0, int(f[1]) / 1024.0)
    return out


def run_child(args: list[str], work: Path, latency_ms: float = 0.0, stop_at_first_forward: bool = False,
              timeout: float = 7200) -> dict:
    """Run ``kdcache ARGS`` (or ``--open URL``) through scale_support; wall time, peak RSS, requests
    (all, and before the first forward of a model), the models' forward time, stdout's last JSON line."""
    env, req, marks = child_env(work, latency_ms)
    cmd = [sys.executable, str(SUPPORT), *args]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(work),
                            start_new_session=True)
    stopped = False
    if stop_at_first_forward:
        while proc.poll() is None and read_marks(marks)["first"] is None and time.time() - t0 < timeout:
            time.sleep(0.05)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            stopped = True
    out, err = proc.communicate(timeout=timeout)
    wall = time.time() - t0
    if not stopped and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    reqs, m = read_requests(req), read_marks(marks)
    rss = m["rss_mb"]
    first, main = m["first"], m["pid"]
    # before the first forward, in the process that runs the model (the start-up: DataLoader workers
    # already loading the first shards count to the epoch)
    before = [r for r in reqs if first is None or (r[0] <= first and r[3] == main)]
    kinds = {}
    for _, kind, n, _ in reqs:
        kinds[kind] = kinds.get(kind, 0) + n
    last = None
    for line in out.decode().splitlines()[::-1]:
        if line.startswith("{"):
            try:
                last = json.loads(line)
                break
            except ValueError:
                continue  # inspect --json prints one indented document, not a line
    return {"wall_s": wall, "rss_mb": rss, "requests": sum(r[2] for r in reqs), "kinds": kinds,
            "requests_before_first": sum(r[2] for r in before),
            "to_first_s": (first - t0) if first is not None else None, "forward_s": m["forward_s"],
            "first_to_end_s": (t0 + wall - first) if first is not None else None, "result": last}


# ---- one point ---------------------------------------------------------------------------------


def measure_point(images: int, shards: int, base: Path, latency_ms: float, latency_budget: float,
                  batch_size: int) -> dict:
    work = base / f"p{images}x{shards}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t = time.time()
    write_data(work / "data", images, shards)
    gen_s = time.time() - t
    url = f"countfs://{work / 'cache.zarr'}"
    pre = ["precompute", "--data", str(work / "data"), "--teacher", TEACHER, "--num-classes", str(C), "--out", url,
           "-V", str(V), "-k", str(K), "--res", str(RES), "-b", "1024", "--workers", "1", "--threads", "1",
           "--device", "cpu", "--no-progress"]
    res = {"images": images, "records": images * V, "shards": shards, "gen_s": gen_s}
    half = run_child(pre + ["--shard-index", "0", "--num-shard-groups", "2"], work)
    written = half["result"]["records"]
    res["precompute"] = {**half, "records": written, "shards_written": half["result"]["shards_written"],
                         "per_record_us": 1e6 * (half["first_to_end_s"] - half["forward_s"]) / max(written, 1),
                         "requests_per_shard": half["requests"] / max(half["result"]["shards_written"], 1)}
    half_copy = work / "half.zarr"
    if latency_ms:
        shutil.copytree(work / "cache.zarr", half_copy)
    res["resume"] = run_child(pre, work)
    res["open"] = run_child(["--open", url], work)
    run_dir = work / "run"
    train = ["train", "--data", str(work / "data"), "--cache", url, "--student", STUDENT, "--out", str(run_dir),
             "--epochs", "1", "-b", str(batch_size), "--workers", "1", "--threads", "1", "--device", "cpu",
             "--no-progress", "--log-every", "1000000"]
    tr = run_child(train, work)
    tr["epoch_s"] = tr["result"]["train_time_s"]
    tr["requests_epoch"] = tr["requests"] - tr["requests_before_first"]
    res["train"] = tr
    res["inspect"] = run_child(["inspect", url, "--json"], work)
    verify = ["verify", url, "--data", str(work / "data"), "--teacher", TEACHER, "--num-classes", str(C),
              "--samples", "64"]
    res["verify"] = run_child(verify, work)
    res["cache_bytes"] = sum(f.stat().st_size for f in (work / "cache.zarr").rglob("*") if f.is_file())
    if latency_ms:
        res["latency_ms"] = latency_ms
        slow = {}
        plans = {
            "open": (["--open", url], res["open"]["requests"], False),
            "resume": (pre[:pre.index("--out") + 1] + [f"countfs://{half_copy}"] + pre[pre.index("--out") + 2:],
                       res["resume"]["requests_before_first"], True),
            "train": (train, res["train"]["requests_before_first"], True),
            "inspect": (["inspect", url, "--json"], res["inspect"]["requests"], False),
            "verify": (verify, res["verify"]["requests"], False),
        }
        for name, (args, n, stop) in plans.items():
            if n * latency_ms / 1000.0 > latency_budget:
                slow[name] = {"skipped": True, "projected_s": n * latency_ms / 1000.0}
                continue
            if name == "train":
                shutil.rmtree(run_dir, ignore_errors=True)
            r = run_child(args, work, latency_ms=latency_ms, stop_at_first_forward=stop)
            slow[name] = {"s": r["to_first_s"] if stop else r["wall_s"], "requests": r["requests_before_first"] if stop
                          else r["requests"]}
        res["slow"] = slow
    shutil.rmtree(work, ignore_errors=True)
    return res


# ---- tables and plot -------------------------------------------------------------------------------


def fmt(x, digits=3):
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return f"{x:,}"


def tables(results: list[dict]) -> str:
    rows = ["| images | records | shards | precompute s | µs/record beyond teacher | precompute requests/shard | "
            "resume: s to first forward | resume requests | open s | open requests | train start-up s | "
            "start-up requests | epoch s | epoch requests | inspect s | inspect requests | verify s | verify requests |",
            "|" + "---|" * 18]
    for r in results:
        p, rs, o, t, i, v = (r[k] for k in ("precompute", "resume", "open", "train", "inspect", "verify"))
        rows.append("| " + " | ".join(fmt(x) for x in (
            r["images"], r["records"], r["shards"], p["wall_s"], p["per_record_us"], p["requests_per_shard"],
            rs["to_first_s"], rs["requests_before_first"], o["wall_s"], o["requests"], t["to_first_s"],
            t["requests_before_first"], t["epoch_s"], t["requests_epoch"], i["wall_s"], i["requests"], v["wall_s"],
            v["requests"])) + " |")
    out = "\n".join(rows)
    rows = ["| records | shards | precompute | resume | open | train | inspect | verify | cache bytes/record |",
            "|" + "---|" * 9]
    for r in results:
        rows.append("| " + " | ".join([fmt(r["records"]), fmt(r["shards"])] + [
            fmt(r[k]["rss_mb"]) for k in ("precompute", "resume", "open", "train", "inspect", "verify")]
            + [fmt(r["cache_bytes"] / r["records"])]) + " |")
    out += "\n\nPeak RSS (MB) of each process:\n\n" + "\n".join(rows)
    rows = ["| records | shards | phase | requests per shard | read | write | list | head | delete |",
            "|" + "---|" * 9]
    for r in results:
        for k in ("precompute", "resume", "open", "train", "inspect", "verify"):
            kinds = r[k]["kinds"]
            per = r[k]["requests"] / (r["precompute"]["shards_written"] if k == "precompute" else r["shards"])
            rows.append("| " + " | ".join([fmt(r["records"]), fmt(r["shards"]), k, fmt(per)] + [
                fmt(kinds.get(x, 0)) for x in ("read", "write", "list", "head", "delete")]) + " |")
    out += "\n\nRequests by kind (whole process):\n\n" + "\n".join(rows)
    if any("slow" in r for r in results):
        rows = ["| records | shards | latency ms | resume: to first forward | open | train start-up | inspect | verify |",
                "|" + "---|" * 8]
        for r in results:
            if "slow" not in r:
                continue
            s = r["slow"]
            cell = [(f"skipped (≈{s[k]['projected_s']:,.0f} s)" if s[k].get("skipped")
                     else f"{s[k]['s']:.1f} s ({s[k]['requests']:,} req)") for k in
                    ("resume", "open", "train", "inspect", "verify")]
            rows.append("| " + " | ".join([fmt(r["records"]), fmt(r["shards"]), fmt(r["latency_ms"])] + cell) + " |")
        out += "\n\nWith a fixed latency per request (simulated object storage):\n\n" + "\n".join(rows)
    return out


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {
        "time (s)": [("precompute, per record beyond the teacher", lambda r: r["precompute"]["per_record_us"] * 1e-6),
                     ("resume to first forward", lambda r: r["resume"]["to_first_s"]),
                     ("open", lambda r: r["open"]["wall_s"]), ("train start-up", lambda r: r["train"]["to_first_s"]),
                     ("epoch", lambda r: r["train"]["epoch_s"]), ("inspect", lambda r: r["inspect"]["wall_s"]),
                     ("verify", lambda r: r["verify"]["wall_s"])],
        "peak RSS (MB)": [(k, (lambda k: lambda r: r[k]["rss_mb"])(k)) for k in
                          ("precompute", "resume", "open", "train", "inspect", "verify")],
        "storage requests": [("precompute", lambda r: r["precompute"]["requests"]),
                             ("resume to first forward", lambda r: r["resume"]["requests_before_first"]),
                             ("open", lambda r: r["open"]["requests"]),
                             ("train start-up", lambda r: r["train"]["requests_before_first"]),
                             ("epoch", lambda r: r["train"]["requests_epoch"]),
                             ("inspect", lambda r: r["inspect"]["requests"]),
                             ("verify", lambda r: r["verify"]["requests"])],
    }
    # the two sweeps: records at the most common shard count, shards at the most common image count
    shard_counts = [r["shards"] for r in results]
    image_counts = [r["images"] for r in results]
    s0 = max(set(shard_counts), key=shard_counts.count)
    i0 = max(set(image_counts), key=image_counts.count)
    sweeps = [("records", f"{s0} shards", sorted((r for r in results if r["shards"] == s0), key=lambda r: r["records"])),
              ("shards", f"{i0 * V:,} records", sorted((r for r in results if r["images"] == i0), key=lambda r: r["shards"]))]
    fig, axes = plt.subplots(len(series), 2, figsize=(11, 11))
    for row, (ylabel, lines) in enumerate(series.items()):
        for col, (xname, fixed, pts) in enumerate(sweeps):
            ax = axes[row][col]
            for label, f in lines:
                xs = [r[xname] for r in pts]
                ys = [f(r) for r in pts]
                ok = [(x, y) for x, y in zip(xs, ys) if y]
                if ok:
                    ax.plot(*zip(*ok), marker="o", label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(f"{xname} ({fixed})")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if col == 1:
                ax.legend(fontsize=7)
    fig.suptitle("kdcache at scale (V = 16, C = 1000, top-10; countfs request counting)")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"the small points {QUICK} (images x shards)")
    ap.add_argument("--points", default=None, help="IMAGESxSHARDS,... (records = images x 16)")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="simulated latency per request (0: none)")
    ap.add_argument("--latency-budget", type=float, default=120.0,
                    help="skip a latency run whose counted requests x latency exceed this many seconds")
    ap.add_argument("--batch-size", type=int, default=256, help="train batch size")
    ap.add_argument("--workdir", default=None, help="where to generate data and caches (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write every measurement here")
    ap.add_argument("--plot", default=None, help="write the log-log plot (PNG) here")
    args = ap.parse_args()
    if args.points:
        points = [tuple(int(x) for x in p.split("x")) for p in args.points.split(",")]
    else:
        points = QUICK if args.quick else DEFAULT
    base = Path(args.workdir or tempfile.mkdtemp(prefix="kdcache-scale-"))
    results = []
    try:
        for images, shards in points:
            t = time.time()
            r = measure_point(images, shards, base, args.latency_ms, args.latency_budget, args.batch_size)
            results.append(r)
            print(f"point {images} images x {V} views = {images * V:,} records in {shards} shards: "
                  f"{time.time() - t:.0f} s", file=sys.stderr, flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
    print(f"CPU: {os.cpu_count()} cores; load average before the run's end: {os.getloadavg()}")
    print(tables(results))
    if args.plot:
        plot(results, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
