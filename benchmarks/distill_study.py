"""When does consistent cached distillation pay? The paper's comparison, with kdcache's own flags.

Beyer et al. (CVPR 2022) compare how a student sees the teacher: a *fixed* teacher (its outputs on
the centre crop, computed once), *independent* views (teacher and student each take their own
random crop), *consistent* views (the same crop for both) and *function matching* (consistent,
on mixed images). This script trains the same student, with the same budget and seeds, in each of
these settings and without a teacher:

| arm | kdcache flags |
| --- | --- |
| labels only | `train` without a cache (a fresh crop every epoch, cross-entropy) |
| fixed teacher | `precompute --center-crop --views 1`, then `train --student-view fresh` |
| independent views | `precompute --views V`, then `train --student-view fresh` |
| consistent, cached | `precompute --views V`, then `train` (epoch e replays view e mod V) |
| consistent, live | `train --teacher` without a cache (the teacher on the student's fresh crop each epoch) |
| function matching | `precompute --views V --mixup`, then `train` |

The default setting is chosen so that the effect can show on a 2-core CPU in about half an hour:
a teacher trained on the whole demo training set (scikit-learn's digits), and a much smaller
student distilled on a small subset of it with aggressive crops, for schedules long enough that
labels-only overfits. A second part sweeps the number of stored views V at the longest schedule.

    python benchmarks/distill_study.py --out study            # the default study (~30 min, 2 cores)
    python benchmarks/distill_study.py --out study --quick    # a smoke run (what the tests run)

It writes ``results.json``, ``table.md``, ``curves.png`` (validation accuracy against epochs, per
arm, at the longest schedule) and ``views.png`` (accuracy, precompute time and bytes against V).
Any train/val shards and teacher can be given instead (``--train-data``, ``--val-data``,
``--teacher``, ``--teacher-weights``, ``--student``, ``--num-classes``, ``--res``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARMS = ("labels only", "fixed teacher", "independent views", "consistent, cached", "consistent, live",
        "function matching")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="work and result folder")
    p.add_argument("--train-data", default=None, help="training shards (default: the demo's digits, built here)")
    p.add_argument("--val-data", default=None, help="validation shards (default: the demo's)")
    p.add_argument("--teacher", default="py:kdcache.models.zoo:teacher_cnn")
    p.add_argument("--teacher-weights", default=None, help="default: train the teacher on the whole training set")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--student", default="py:kdcache.models.zoo:student_cnn")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--subset", type=int, default=250, help="training images the student sees")
    p.add_argument("--epochs", default="60,240", help="schedule lengths (comma-separated)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--views", type=int, default=16, help="V of the cached arms")
    p.add_argument("--sweep", default="1,4,16,64", help="V values of the sweep (at the longest schedule)")
    p.add_argument("--scale", default="0.25,1.0", help="crop area range of every view (aggressive on purpose)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)), help="runs in parallel (1 thread each)")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny subset, short schedules, 1 seed")
    a = p.parse_args(argv)
    if a.quick:
        a.subset, a.epochs, a.seeds, a.views, a.sweep, a.teacher_epochs, a.jobs = 40, "2", 1, 2, "1,2", 1, 1
    a.epochs = [int(x) for x in str(a.epochs).split(",")]
    a.sweep = [int(x) for x in str(a.sweep).split(",")]
    a.scale = tuple(float(x) for x in a.scale.split(","))
    return a


# ---- data, teacher, caches -----------------------------------------------------------------------------


def prepare_data(a, out: Path) -> tuple[str, str, str]:
    """(full training shards, the student's subset, validation shards)."""
    from kdcache.data.shards import expand_urls, iter_samples, write_dataset

    if a.train_data is None:
        from kdcache.tools.demo_data import build_digits_dataset

        data = out / "data"
        if not (data / "val" / "classes.json").exists():
            build_digits_dataset(data, shard_size=250, seed=0, limit=240 if a.quick else None)
        a.train_data, a.val_data = str(data / "train"), str(data / "val")
    subset = out / f"subset-{a.subset}"
    if not (subset / "train" / "classes.json").exists():
        samples = [s for u in expand_urls(a.train_data) for s in iter_samples(u)]
        pick = np.random.default_rng(0).permutation(len(samples))[: a.subset]
        classes = json.loads((Path(expand_urls(a.train_data)[0]).parent / "classes.json").read_text())
        write_dataset(subset, [samples[i] for i in sorted(pick)], None, classes, shard_size=64)
    return a.train_data, str(subset / "train"), a.val_data


def common(a, out: str, seed: int, epochs: int, **kw) -> dict:
    from kdcache.data.views import AugSpec

    base = dict(student=a.student, out=out, num_classes=a.num_classes, epochs=epochs, batch_size=a.batch_size,
                lr=a.lr, weight_decay=0.05, warmup_steps=20, res=a.res, val_data=a.val_data, workers=0, threads=1,
                device="cpu", seed=seed, progress=False, temperature=a.temperature, log_every=50,
                eval_epochs=max(1, epochs // 30),  # about 30 points per curve
                aug=AugSpec(scale=a.scale, flip=False))
    base.update(kw)
    return base


def train_teacher(a, out: Path) -> str:
    from kdcache.learn.trainer import TrainConfig, train

    if a.teacher_weights:
        return a.teacher_weights
    run = out / "teacher"
    if not (run / "summary.json").exists():
        train(TrainConfig(**common(a, str(run), 0, a.teacher_epochs, student=a.teacher, data=a.train_data,
                                   threads=None, resume=True)))
    return str(run / "model.pt")


def make_cache(a, out: Path, teacher_weights: str, subset: str, kind: str, views: int) -> tuple[str, float, int]:
    """A cache of the subset: (path, precompute seconds, bytes on disk)."""
    from kdcache.tools.precompute import PrecomputeConfig, precompute
    from kdcache.data.views import AugSpec

    path = out / "caches" / f"{kind}-V{views}.zarr"
    meta = path.with_suffix(".json")
    if not meta.exists():
        aug = (AugSpec(name="center_crop", flip=False) if kind == "center"
               else AugSpec(scale=a.scale, flip=False, mixup=kind == "mixup"))
        t0 = time.perf_counter()
        precompute(PrecomputeConfig(data=subset, teacher=a.teacher, teacher_weights=teacher_weights, out=str(path),
                                    num_classes=a.num_classes, views=views, topk=5, seed=1, res=a.res, aug=aug,
                                    batch_size=256, workers=0, device="cpu", progress=False))
        seconds = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        meta.write_text(json.dumps({"seconds": seconds, "bytes": size}))
    m = json.loads(meta.read_text())
    return str(path), m["seconds"], m["bytes"]


# ---- runs ----------------------------------------------------------------------------------------------


def arm_config(a, arm: str, run: str, seed: int, epochs: int, subset: str, teacher_weights: str, caches: dict) -> dict:
    if arm == "labels only":
        return common(a, run, seed, epochs, data=subset)
    if arm == "consistent, live":
        return common(a, run, seed, epochs, data=subset, teacher=a.teacher, teacher_weights=teacher_weights,
                      topk=5)
    cache = {"fixed teacher": caches["center"], "independent views": caches["views"],
             "consistent, cached": caches["views"], "function matching": caches["mixup"]}[arm]
    fresh = arm in ("fixed teacher", "independent views")
    return common(a, run, seed, epochs, data=subset, cache=cache, student_view="fresh" if fresh else "cache")


def run_one(job: dict) -> dict:
    """One training run (in a worker process: one torch thread). Returns its final figures and curve."""
    import warnings

    import torch

    from kdcache.learn.trainer import TrainConfig, train

    torch.set_num_threads(1)
    out = Path(job["config"]["out"])
    if not (out / "summary.json").exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(TrainConfig(**{**job["config"], "resume": True}))
    s = json.loads((out / "summary.json").read_text())
    curve = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "val_top1" in row:
            curve[int(row["epoch"]) + 1] = row["val_top1"]
    return {**{k: v for k, v in job.items() if k != "config"}, "val_top1": s["final_val_top1"],
            "best_val_top1": s["best_val_top1"], "curve": sorted(curve.items()), "train_s": s["train_time_s"]}


def run_all(jobs: list[dict], at_once: int) -> list[dict]:
    """Every job through ``run_one``, ``at_once`` processes at a time (one torch thread each), with
    a line per finished run; results in the order they finish."""
    done = []

    def said(r):
        done.append(r)
        print(f"[{len(done)}/{len(jobs)}] {r['arm']} {r['epochs']} epochs seed {r['seed']}: {100 * r['val_top1']:.1f} %",
              flush=True)

    if at_once > 1:
        with mp.get_context("spawn").Pool(at_once) as pool:
            for r in pool.imap_unordered(run_one, jobs):
                said(r)
    else:
        for j in jobs:
            said(run_one(j))
    return done


def teacher_accuracy(a, teacher_weights: str) -> dict:
    """The teacher on whole images (the centre view) and on crops like the students' (4 per image)."""
    import torch

    from kdcache.models.factory import create_model, normalize
    from kdcache.data.shards import decode_image, expand_urls, iter_samples
    from kdcache.data.views import AugSpec, center_view, sample_view
    from kdcache.data.render import render

    info = create_model(a.teacher, num_classes=a.num_classes, weights=teacher_weights, resolution=a.res)
    model = info.model.eval()
    aug = AugSpec(scale=a.scale, flip=False)
    whole = crops = n = nc = 0
    with torch.no_grad():
        for u in expand_urls(a.val_data):
            for s in iter_samples(u):
                im = decode_image(s)
                px = [render(im, center_view(im.width, im.height), a.res)]
                px += [render(im, sample_view(9, s.key, v, im.width, im.height, aug), a.res) for v in range(4)]
                pred = model(normalize(torch.stack(px), info.mean, info.std)).argmax(1)
                whole += int(pred[0] == s.cls)
                crops += int((pred[1:] == s.cls).sum())
                n, nc = n + 1, nc + 4
    return {"whole_images": whole / n, "crops": crops / nc, "val_images": n}


# ---- report --------------------------------------------------------------------------------------------


def mean_std(xs: list[float]) -> str:
    m = 100 * statistics.mean(xs)
    sd = 100 * statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:.1f} ± {sd:.1f}"


def report(a, out: Path, results: list[dict], sweep: list[dict], teacher: dict, meta: dict) -> str:
    lines = [f"Teacher `{a.teacher}`: {100 * teacher['whole_images']:.1f} % top-1 on whole validation images "
             f"(centre view), {100 * teacher['crops']:.1f} % on crops like the students' (scale {a.scale}).", "",
             f"Student `{a.student}` on {a.subset} training images, {a.seeds} seeds, final validation top-1 (%), "
             f"mean ± std, then every seed:", "",
             "| arm | " + " | ".join(f"{e} epochs" for e in a.epochs) + " |",
             "|---|" + "---|" * len(a.epochs)]
    for arm in ARMS:
        cells = []
        for e in a.epochs:
            xs = [r["val_top1"] for r in results if r["arm"] == arm and r["epochs"] == e]
            cells.append(f"**{mean_std(xs)}** ({', '.join(f'{100 * x:.1f}' for x in xs)})" if xs else "-")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", f"Views swept at {max(a.epochs)} epochs (consistent, cached; live = a fresh view every epoch):", "",
              "| V | top-1 (%) | precompute (s) | cache bytes |", "|---|---|---|---|"]
    for row in sweep:
        xs = row["val_top1"]
        lines.append(f"| {row['V']} | {mean_std(xs)} ({', '.join(f'{100 * x:.1f}' for x in xs)}) | "
                     f"{row['seconds'] if row['seconds'] is None else format(row['seconds'], '.1f')} | "
                     f"{'-' if row['bytes'] is None else format(row['bytes'], ',')} |")
    lines += ["", f"Machine: {meta['machine']}; wall time {meta['wall_s'] / 60:.1f} min."]
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    return text


def plot(a, out: Path, results: list[dict], sweep: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = max(a.epochs)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for arm in ARMS:
        runs = [r for r in results if r["arm"] == arm and r["epochs"] == e]
        if not runs:
            continue
        epochs = [x for x, _ in runs[0]["curve"]]
        acc = np.mean([[y for _, y in r["curve"]] for r in runs], axis=0)
        ax.plot(epochs, 100 * acc, label=arm)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(f"{a.subset} training images, mean of {a.seeds} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png")
    plt.close(fig)

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.8), dpi=100)
    stored = [r for r in sweep if isinstance(r["V"], int)]
    xs = [r["V"] for r in stored]
    ax[0].errorbar(xs, [100 * np.mean(r["val_top1"]) for r in stored],
                   yerr=[100 * np.std(r["val_top1"]) for r in stored], marker="o", label="cached, V views")
    live = [r for r in sweep if r["V"] == "live"]
    if live:
        ax[0].axhline(100 * np.mean(live[0]["val_top1"]), color="gray", linestyle="--", label="live (fresh views)")
    ax[0].set_xscale("log", base=2)
    ax[0].set_xlabel("stored views V")
    ax[0].set_ylabel("validation top-1 (%)")
    ax[0].legend(fontsize=8)
    ax[0].grid(alpha=0.3)
    l1 = ax[1].plot(xs, [r["seconds"] for r in stored], marker="o", color="tab:blue", label="precompute time (s)")
    ax[1].set_xscale("log", base=2)
    ax[1].set_xlabel("stored views V")
    ax[1].set_ylabel("precompute seconds", color="tab:blue")
    twin = ax[1].twinx()
    l2 = twin.plot(xs, [r["bytes"] / 1e6 for r in stored], marker="s", color="tab:orange", label="cache size (MB)")
    twin.set_ylabel("cache MB", color="tab:orange")
    ax[1].legend(l1 + l2, [x.get_label() for x in l1 + l2], fontsize=8, loc="upper left")
    ax[1].set_title("what the views cost", fontsize=9)
    ax[0].set_title("what the views buy", fontsize=9)
    ax[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "views.png")
    plt.close(fig)


def prepare_setting(a) -> tuple[Path, str, str, dict]:
    """The study's folder, the student's subset, the teacher's weights and accuracy (made or reused)."""
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _, subset, _ = prepare_data(a, out)
    weights = train_teacher(a, out)
    teacher = teacher_accuracy(a, weights)
    print(f"teacher: {teacher}", flush=True)
    return out, subset, weights, teacher


def main(argv=None) -> dict:
    a = parse(argv)
    t0 = time.perf_counter()
    out, subset, weights, teacher = prepare_setting(a)
    caches = {kind: make_cache(a, out, weights, subset, kind, 1 if kind == "center" else a.views)[0]
              for kind in ("center", "views", "mixup")}
    jobs = []
    for e in a.epochs:
        for arm in ARMS:
            for seed in range(a.seeds):
                run = out / "runs" / f"{arm.replace(' ', '_').replace(',', '')}-e{e}-s{seed}"
                jobs.append({"arm": arm, "epochs": e, "seed": seed,
                             "config": arm_config(a, arm, str(run), seed, e, subset, weights, caches)})
    E = max(a.epochs)
    sweep_caches = {V: make_cache(a, out, weights, subset, "views", V) for V in a.sweep}
    for V, (path, _, _) in sweep_caches.items():
        if V == a.views:
            continue  # the main grid has these runs
        for seed in range(a.seeds):
            run = out / "runs" / f"sweep-V{V}-s{seed}"
            jobs.append({"arm": f"V={V}", "epochs": E, "seed": seed,
                         "config": common(a, str(run), seed, E, data=subset, cache=path)})
    done = run_all(jobs, a.jobs)
    results = [r for r in done if r["arm"] in ARMS]
    sweep = []
    for V in a.sweep:
        arm = "consistent, cached" if V == a.views else f"V={V}"
        xs = [r["val_top1"] for r in done if r["arm"] == arm and r["epochs"] == E]
        _, sec, size = sweep_caches[V]
        sweep.append({"V": V, "val_top1": xs, "seconds": sec, "bytes": size})
    sweep.append({"V": "live", "val_top1": [r["val_top1"] for r in results
                                            if r["arm"] == "consistent, live" and r["epochs"] == E],
                  "seconds": None, "bytes": None})
    import torch

    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                       f"{torch.__version__}, {a.jobs} runs in parallel, 1 thread each",
            "wall_s": time.perf_counter() - t0, "args": {k: v for k, v in vars(a).items()}}
    text = report(a, out, results, sweep, teacher, meta)
    plot(a, out, results, sweep)
    full_results = {"teacher": teacher, "results": results, "sweep": sweep, "meta": meta}
    (out / "results.json").write_text(json.dumps(full_results, indent=1, default=str))
    print(text)
    return full_results


if __name__ == "__main__":
    main()
