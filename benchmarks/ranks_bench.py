"""Four ranks at scale: torchrun precompute and a DDP epoch on a large cache, checked record by record.

tests/test_many_ranks.py proves the two promises on 8 shards of 4 images; this runs the same checks
where they could break differently, on scale_bench.py's synthetic data (tiny JPEGs, a C = 1000
linear teacher and student, V = 16 views):

1. ``precompute`` in one process, then with ``torch.distributed.run --nproc_per_node RANKS`` (gloo,
   CPU) into a second cache: the two caches must hold the same files, byte for byte;
2. ``train`` for one epoch on RANKS ranks (DDP, gloo) from that cache, every batch each rank's loop
   consumes recorded (tests/rank_batches.py: the CLI unchanged, ``epoch_batches`` observed): every
   (shard, key) of the data must be seen exactly once across the ranks, all with view 0, each shard
   on one rank, and every rank must run the same number of steps.

Wall times, records per second and the checks' outcome are printed as a table (and ``--json``).
Torch runs one thread per rank; RANKS processes share this machine's cores.

    python benchmarks/ranks_bench.py                       # 62,500 images x 16 views = 10^6 records, 64 shards
    python benchmarks/ranks_bench.py --quick               # 640 images in 8 shards (the test's)
    python benchmarks/ranks_bench.py --images 6250 --shards 100 --ranks 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import scale_bench as sb  # noqa: E402  (the synthetic data and the cheap models)


def env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(HERE), str(ROOT)]),
                OMP_NUM_THREADS="1")


def torchrun(ranks: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
            *map(str, args)]


def precompute_args(data: Path, out: Path) -> list[str]:
    return ["precompute", "--data", str(data), "--teacher", sb.TEACHER, "--num-classes", str(sb.C), "--out", str(out),
            "-V", str(sb.V), "-k", str(sb.K), "--res", str(sb.RES), "-b", "1024", "--workers", "0", "--threads", "1",
            "--device", "cpu", "--no-progress"]


def run(cmd: list[str], **kw) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env={**env(), **kw}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def check_epoch(batches_dir: Path, ranks: int, data: Path) -> dict:
    """The recorded epoch against the data: every (shard, key) once, view 0, a shard on one rank,
    the same steps on every rank."""
    expected = set()
    for tar in sorted(data.glob("*.tar")):
        import tarfile

        with tarfile.open(tar) as t:
            expected |= {(tar.stem, m.name.rsplit(".", 1)[0]) for m in t.getmembers() if m.name.endswith(".jpg")}
    seen, steps, owner = [], {}, {}
    for r in range(ranks):
        lines = (batches_dir / f"rank{r}.jsonl").read_text().splitlines()
        steps[r] = len(lines)
        for line in lines:
            b = json.loads(line)
            for shard, key, _ in b["records"]:
                seen.append((shard, key, b["view"]))
                owner.setdefault(shard, set()).add(r)
    pairs = [(s, k) for s, k, _ in seen]
    return {"records_seen": len(pairs), "records_expected": len(expected),
            "each_once": len(pairs) == len(set(pairs)) == len(expected) and set(pairs) == expected,
            "views": sorted({v for *_, v in seen}), "shard_on_one_rank": all(len(o) == 1 for o in owner.values()),
            "steps_per_rank": [steps[r] for r in range(ranks)], "same_steps": len(set(steps.values())) == 1}


def measure(images: int, shards: int, ranks: int, batch_size: int, work: Path) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    data = work / "data"
    sb.write_data(data, images, shards)
    one, many = work / "one.zarr", work / "many.zarr"
    res = {"images": images, "records": images * sb.V, "shards": shards, "ranks": ranks}
    res["precompute_1_s"] = run([sys.executable, str(HERE / "scale_support.py"), *precompute_args(data, one)])
    res["precompute_n_s"] = run(torchrun(ranks, HERE / "scale_support.py", *precompute_args(data, many)))
    a, b = files(one), files(many)
    res["cache_files"] = len(a)
    res["caches_equal"] = a == b
    res["files_differing"] = sorted(set(a) ^ set(b)) + sorted(n for n in set(a) & set(b) if a[n] != b[n])
    batches = work / "batches"
    batches.mkdir()
    res["train_epoch_s"] = run(torchrun(ranks, ROOT / "tests" / "rank_batches.py", "train", "--data", data, "--cache",
                                        many, "--student", sb.STUDENT, "--out", work / "run", "--epochs", 1, "-b",
                                        batch_size, "--workers", 1, "--threads", 1, "--device", "cpu", "--no-progress",
                                        "--log-every", 1000000), KD_TEST_BATCHES=str(batches))
    res.update(check_epoch(batches, ranks, data))
    res["ok"] = res["caches_equal"] and res["each_once"] and res["views"] == [0] and res["shard_on_one_rank"] \
        and res["same_steps"]
    return res


def table(r: dict) -> str:
    return "\n".join([
        "| records | shards | ranks | precompute 1 rank s | precompute N ranks s | caches equal (files) | "
        "DDP epoch s | records seen once | steps per rank |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {r['records']:,} | {r['shards']:,} | {r['ranks']} | {r['precompute_1_s']:.1f} | {r['precompute_n_s']:.1f} | "
        f"{'yes' if r['caches_equal'] else 'NO: ' + ', '.join(r['files_differing'][:5])} ({r['cache_files']:,}) | "
        f"{r['train_epoch_s']:.1f} | {r['records_seen']:,} of {r['records_expected']:,} "
        f"{'(each once, view 0, a shard on one rank)' if r['each_once'] and r['shard_on_one_rank'] else '(NOT each once)'}"
        f" | {r['steps_per_rank']} |"])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=62500, help="images (records = images x 16)")
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="640 images in 8 shards")
    ap.add_argument("--workdir", default=None, help="where to generate data and caches (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write the measurement here")
    a = ap.parse_args(argv)
    if a.quick:
        a.images, a.shards = 640, 8
    base = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="kdcache-ranks-"))
    try:
        r = measure(a.images, a.shards, a.ranks, a.batch_size, base / f"r{a.images}x{a.shards}")
    finally:
        if not a.workdir:
            shutil.rmtree(base, ignore_errors=True)
    print(table(r), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    if not r["ok"]:
        raise SystemExit("ranks_bench: a check failed (see the table)")
    return r


if __name__ == "__main__":
    main()
