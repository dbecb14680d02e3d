"""Does an ensemble of two teachers teach better than either alone? (`precompute --teacher A --teacher B`)

Beyer et al. (CVPR 2022) got their best ImageNet student from function matching with an ensemble of
two teachers, at 224 and 384 px. This script asks the same question on the demo's digits, in
distill_study.py's data-limited regime (a small student on 250 training images for a long schedule,
crops of 25-100 % of the area), with two teachers trained by `kdcache train` on all training images:

| member | architecture | input resolution |
| --- | --- | --- |
| A | `--teacher` (default the zoo's teacher_cnn) | the students' (`--res`, 32 px) |
| B | `--teacher-b` (default the same architecture, another seed) | `--res-b` (default 48 px) |

Member B sees every view at its own resolution (the same crop box rendered larger: the paper's
T384 -> S224). The arms, each one cache of the same V views of the student's subset (the same boxes
for every arm: the views depend on the seed and the keys only):

| arm | cache |
| --- | --- |
| labels only | member A's cache, `--mode labels` (cross-entropy on the same views) |
| teacher A | `precompute --teacher A` |
| teacher B | `precompute --teacher B --teacher-res 48` |
| ensemble A+B | `precompute --teacher A --teacher B --teacher-res 32 --teacher-res 48` |

    python benchmarks/ensemble_study.py --out ensemble              # 240 epochs, 3 seeds
    python benchmarks/ensemble_study.py --out ensemble --quick      # a smoke run (the test's)

Its own flags: ``--epochs`` (one schedule), ``--seeds``, ``--views``, ``--teacher-b``, ``--res-b``;
every other flag is distill_study.py's (``--subset``, ``--scale``, ``--lr``, ``--teacher``, ...).
Runs go one at a time with one torch thread (``--jobs N`` for N at once); finished runs and caches
are reused. Writes ``results.json`` and ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill_study as ds  # noqa: E402  (the data-limited regime's set-up)

ARMS = ("labels only", "teacher A", "teacher B", "ensemble A+B")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=240, help="the schedule (one)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--views", type=int, default=16, help="V of the caches")
    p.add_argument("--teacher-b", default=None, help="member B's architecture (default: --teacher's)")
    p.add_argument("--res-b", type=int, default=48, help="member B's input resolution")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny subset, 2 epochs, 1 seed")
    mine, rest = p.parse_known_args(argv)
    if "--jobs" not in rest:
        rest += ["--jobs", "1"]
    a = ds.parse(rest + (["--quick"] if mine.quick else []))
    a.epochs, a.seeds, a.views = (2, 1, 2) if mine.quick else (mine.epochs, mine.seeds, mine.views)
    a.teacher_b = mine.teacher_b or a.teacher
    a.res_b = mine.res_b
    return a


def train_member_b(a, out: Path) -> str:
    """Member B: trained like member A (all training images, the teacher's epochs) at its own
    resolution, from another seed."""
    from kdcache.learn.trainer import TrainConfig, train

    run = out / "teacher-b"
    if not (run / "summary.json").exists():
        train(TrainConfig(**ds.common(a, str(run), 1, a.teacher_epochs, student=a.teacher_b, data=a.train_data,
                                      res=a.res_b, threads=None, resume=True)))
    return str(run / "model.pt")


def member_accuracy(a, teacher: str, weights: str, res: int) -> dict:
    """distill_study's teacher accuracy for one member at its own resolution."""
    saved = (a.teacher, a.res)
    a.teacher, a.res = teacher, res
    try:
        return ds.teacher_accuracy(a, weights)
    finally:
        a.teacher, a.res = saved


def make_cache(a, out: Path, subset: str, name: str, members: list[tuple[str, str, int]]) -> str:
    """A cache of the subset by ``members`` [(spec, weights, resolution)]: its path (made once)."""
    from kdcache.data.views import AugSpec
    from kdcache.tools.precompute import PrecomputeConfig, precompute

    path = out / "caches" / f"{name}-V{a.views}.zarr"
    done = path.with_suffix(".json")
    if not done.exists():
        t0 = time.perf_counter()
        one = len(members) == 1
        specs, weights, res = ([m[i] for m in members] for i in range(3))
        precompute(PrecomputeConfig(data=subset, teacher=specs[0] if one else specs,
                                    teacher_weights=weights[0] if one else weights,
                                    teacher_res=res[0] if one else res, out=str(path), num_classes=a.num_classes,
                                    views=a.views, topk=5, seed=1, res=a.res, aug=AugSpec(scale=a.scale, flip=False),
                                    batch_size=256, workers=0, device="cpu", progress=False))
        done.write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    return str(path)


def paired(results: list[dict], arm: str, base: str) -> list[float]:
    by = {(r["arm"], r["seed"]): r["val_top1"] for r in results}
    return [by[(arm, s)] - by[(base, s)] for (x, s) in sorted(by) if x == arm and (base, s) in by]


def report(a, out: Path, results: list[dict], members: dict, meta: dict) -> str:
    lines = ["Teachers (top-1 on whole validation images / on crops like the students'): "
             + "; ".join(f"{k} `{v['spec']}` at {v['res']} px: {100 * v['whole_images']:.1f} % / "
                         f"{100 * v['crops']:.1f} %" for k, v in members.items()) + ".", "",
             f"Student `{a.student}` at {a.res} px, {a.subset} training images, {a.epochs} epochs, V = {a.views}, "
             f"{a.seeds} seeds; final validation top-1 (%), mean ± std (every seed); differences paired by seed "
             "(points, mean ± std, and on how many seeds positive):", "",
             "| arm | top-1 (%) | over labels only | ensemble over this arm |", "|---|---|---|---|"]
    for arm in ARMS:
        xs = [r["val_top1"] for r in results if r["arm"] == arm]
        if not xs:
            continue

        def diff(x, y):
            d = paired(results, x, y)
            return (f"{100 * statistics.mean(d):+.1f} ± {100 * statistics.stdev(d) if len(d) > 1 else 0.0:.1f} "
                    f"({sum(v > 0 for v in d)}/{len(d)})") if d else "—"

        lines.append(f"| {arm} | **{ds.mean_std(xs)}** ({', '.join(f'{100 * x:.1f}' for x in xs)}) | "
                     f"{diff(arm, 'labels only') if arm != 'labels only' else '—'} | "
                     f"{diff('ensemble A+B', arm) if arm != 'ensemble A+B' else '—'} |")
    lines += ["", f"Machine: {meta['machine']}; wall time {meta['wall_s'] / 60:.1f} min (finished runs are reused); "
              f"the runs' training time summed: {sum(r['train_s'] for r in results) / 60:.1f} min."]
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    return text


def main(argv=None) -> dict:
    import torch

    a = parse(argv)
    t0 = time.perf_counter()
    out, subset, weights_a, acc_a = ds.prepare_setting(a)
    weights_b = train_member_b(a, out)
    acc_b = member_accuracy(a, a.teacher_b, weights_b, a.res_b)
    member_a, member_b = (a.teacher, weights_a, a.res), (a.teacher_b, weights_b, a.res_b)
    caches = {"teacher A": make_cache(a, out, subset, "A", [member_a]),
              "teacher B": make_cache(a, out, subset, "B", [member_b]),
              "ensemble A+B": make_cache(a, out, subset, "AB", [member_a, member_b])}
    caches["labels only"] = caches["teacher A"]
    jobs = []
    for seed in range(a.seeds):
        for arm in ARMS:
            extra = {"mode": "labels"} if arm == "labels only" else {}
            run = out / "runs" / f"{arm.replace(' ', '_').replace('+', '')}-s{seed}"
            jobs.append({"arm": arm, "epochs": a.epochs, "seed": seed,
                         "config": ds.common(a, str(run), seed, a.epochs, data=subset, cache=caches[arm], **extra)})
    done = ds.run_all(jobs, a.jobs)
    order = {arm: i for i, arm in enumerate(ARMS)}
    results = sorted(done, key=lambda r: (order[r["arm"]], r["seed"]))
    members = {"A": {"spec": a.teacher, "res": a.res, **acc_a}, "B": {"spec": a.teacher_b, "res": a.res_b, **acc_b}}
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                       f"{torch.__version__}, {a.jobs} run(s) at a time, 1 thread each",
            "wall_s": time.perf_counter() - t0, "args": {k: v for k, v in vars(a).items()}}
    full = {"members": members, "results": results, "meta": meta}
    (out / "results.json").write_text(json.dumps(full, indent=1, default=str))
    print(report(a, out, results, members, meta))
    return full


if __name__ == "__main__":
    main()
