"""What does the teacher's knowledge consist of? Distillation taken apart with `train --kd-signal`.

Tang et al. (2020, "Understanding and Improving Knowledge Distillation") explain KD's gain by three
kinds of teacher knowledge: universal (it acts like label smoothing), domain (how the classes relate)
and instance-specific (the teacher's confidence on the true class re-weights each example). Each
can be isolated from a cache (docs/losses.md, "Signals derived from the cache"). This script trains
the same student, with the same budget, seeds and views, on each:

| arm | kdcache flags |
| --- | --- |
| labels only | `train --mode labels --cache C` (cross-entropy on the cache's views) |
| smoothing | `train --cache C --kd-signal smoothing` |
| relations | `train --cache C --kd-signal relations` |
| reweight | `train --cache C --kd-signal reweight` |
| relations+reweight | `train --cache C --kd-signal relations+reweight` |
| full KD (consistent) | `train --cache C` |
| function matching | `train --cache M` (M: the same views with `precompute --mixup`) |

Every arm but function matching sees exactly the same crops in the same order (the cache's V views,
epoch e replays view e mod V); only the targets differ, so differences between arms are the
targets' doing. The setting is distill_study.py's data-limited regime, reused from it (its data,
teacher, caches and run helpers): the demo's digits, a teacher trained on all 1497 training images,
the small student on a subset of 250 for a long schedule, crops of 25-100 % of the area.

    python benchmarks/decompose_study.py --out decompose                  # 240 epochs, 3 seeds
    python benchmarks/decompose_study.py --out decompose --quick          # a smoke run (the test's)

Its own flags: ``--epochs`` (one schedule), ``--seeds``, ``--views``, ``--arms`` (comma-separated,
default the seven above; ``smoothing+reweight`` is also known). Every other flag is
distill_study.py's (``--subset``, ``--scale``, ``--lr``, ``--teacher``, ``--student``, ...). Runs go
one at a time with one torch thread (``--jobs N`` for N at once); finished runs are reused. Writes
``results.json``, ``table.md``, ``decompose.png`` (accuracy per arm with every seed, and the curves)
and ``relations.png`` (the cache's class relations, ``kdcache inspect --relations``).
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill_study as ds  # noqa: E402  (the data-limited regime's set-up)

ARMS = {
    "labels only": dict(mode="labels", cache="views"),
    "smoothing": dict(cache="views", kd_signal="smoothing"),
    "relations": dict(cache="views", kd_signal="relations"),
    "reweight": dict(cache="views", kd_signal="reweight"),
    "relations+reweight": dict(cache="views", kd_signal="relations+reweight"),
    "smoothing+reweight": dict(cache="views", kd_signal="smoothing+reweight"),
    "full KD (consistent)": dict(cache="views"),
    "function matching": dict(cache="mixup"),
}
DEFAULT_ARMS = ("labels only", "smoothing", "relations", "reweight", "relations+reweight", "full KD (consistent)",
                "function matching")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=240, help="the schedule (one)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--views", type=int, default=16, help="V of the caches")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    p.add_argument("--quick", action="store_true", help="a smoke run: tiny subset, 2 epochs, 1 seed")
    mine, rest = p.parse_known_args(argv)
    if "--jobs" not in rest:
        rest += ["--jobs", "1"]
    a = ds.parse(rest + (["--quick"] if mine.quick else []))  # data, teacher, student, subset, crops, lr, ...
    a.epochs, a.seeds, a.views = (2, 1, 2) if mine.quick else (mine.epochs, mine.seeds, mine.views)
    a.arms = [x.strip() for x in mine.arms.split(",") if x.strip()]
    unknown = [x for x in a.arms if x not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    return a


def arm_config(a, arm: str, run: str, seed: int, subset: str, caches: dict) -> dict:
    spec = dict(ARMS[arm])
    return ds.common(a, run, seed, a.epochs, data=subset, **{**spec, "cache": caches[spec["cache"]]})


def paired(results: list[dict], arm: str, base: str) -> list[float]:
    """arm − base per seed (same seed: same initialisation, data order and, but for function
    matching, the same views)."""
    by = {(r["arm"], r["seed"]): r["val_top1"] for r in results}
    return [by[(arm, s)] - by[(base, s)] for (x, s) in sorted(by) if x == arm and (base, s) in by]


def report(a, out: Path, results: list[dict], teacher: dict, signals: dict, meta: dict) -> str:
    full = "full KD (consistent)"
    gain_full = statistics.mean(paired(results, full, "labels only")) if full in a.arms and "labels only" in a.arms else None
    lines = [f"Teacher `{a.teacher}`: {100 * teacher['whole_images']:.1f} % top-1 on whole validation images, "
             f"{100 * teacher['crops']:.1f} % on crops like the students'. "
             f"Cache: V = {a.views} views of {a.subset} images, ε = {signals.get('epsilon', float('nan')):.4f} "
             "(the teacher's mean probability off the true class).", "",
             f"Student `{a.student}`, {a.epochs} epochs, {a.seeds} seeds; final validation top-1 (%), mean ± std, "
             "every seed; gain over labels only, paired by seed (points, mean ± std, and on how many seeds the arm is "
             "above labels); share of full KD's gain (ratio of the mean gains):", "",
             "| arm | top-1 (%) | gain over labels (points) | share of full KD's gain |", "|---|---|---|---|"]
    for arm in a.arms:
        xs = [r["val_top1"] for r in results if r["arm"] == arm]
        d = paired(results, arm, "labels only") if arm != "labels only" and "labels only" in a.arms else []
        gain = (f"{100 * statistics.mean(d):+.1f} ± {100 * statistics.stdev(d) if len(d) > 1 else 0.0:.1f} "
                f"({sum(x > 0 for x in d)}/{len(d)})" if d else "—")
        share = (f"{100 * statistics.mean(d) / gain_full:.0f} %" if d and gain_full else "—")
        lines.append(f"| {arm} | **{ds.mean_std(xs)}** ({', '.join(f'{100 * x:.1f}' for x in xs)}) | {gain} | {share} |")
    lines += ["", f"Machine: {meta['machine']}; wall time {meta['wall_s'] / 60:.1f} min (this invocation: finished runs "
              f"are reused); the runs' training time summed: {sum(r['train_s'] for r in results) / 60:.1f} min."]
    text = "\n".join(lines)
    (out / "table.md").write_text(text + "\n")
    return text


def plot(a, out: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.6), dpi=100, gridspec_kw={"width_ratios": [1.1, 1]})
    shown = [arm for arm in a.arms if arm != "labels only"] if "labels only" in a.arms else []
    for i, arm in enumerate(shown):  # paired by seed: the seeds' own spread cancels
        d = [100 * x for x in paired(results, arm, "labels only")]
        c = f"C{a.arms.index(arm)}"
        ax[0].bar(i, np.mean(d), color=c, alpha=0.55)
        ax[0].errorbar(i, np.mean(d), yerr=np.std(d, ddof=1) if len(d) > 1 else 0, color="black", capsize=4)
        ax[0].scatter([i] * len(d), d, color="black", s=12, zorder=3)
    ax[0].axhline(0, color="gray", linewidth=1)
    ax[0].set_xticks(range(len(shown)), shown, rotation=30, ha="right", fontsize=8)
    ax[0].set_ylabel("top-1 gain over labels only (points)")
    ax[0].set_title(f"paired by seed: mean ± std and each of {a.seeds} seeds", fontsize=9)
    ax[0].grid(axis="y", alpha=0.3)
    for i, arm in enumerate(a.arms):
        runs = [r for r in results if r["arm"] == arm]
        epochs = [x for x, _ in runs[0]["curve"]]
        ax[1].plot(epochs, 100 * np.mean([[y for _, y in r["curve"]] for r in runs], axis=0), color=f"C{i}", label=arm)
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("validation top-1 (%), mean over seeds")
    ax[1].set_title(f"{a.subset} training images, V = {a.views} views", fontsize=9)
    ax[1].grid(alpha=0.3)
    ax[1].legend(fontsize=7)
    fig.suptitle("What the teacher's targets teach: distillation taken apart (train --kd-signal)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "decompose.png")
    plt.close(fig)


def main(argv=None) -> dict:
    import torch

    from kdcache.tools.inspection import relations

    a = parse(argv)
    t0 = time.perf_counter()
    out, subset, weights, teacher = ds.prepare_setting(a)
    kinds = sorted({ARMS[arm]["cache"] for arm in a.arms} | {"views"})
    caches = {kind: ds.make_cache(a, out, weights, subset, kind, a.views)[0] for kind in kinds}
    rel = relations(caches["views"], subset, str(out / "relations.png"))
    jobs = [{"arm": arm, "epochs": a.epochs, "seed": seed,
             "config": arm_config(a, arm, str(out / "runs" / f"{arm.replace(' ', '_').replace('+', '-')}-s{seed}"),
                                  seed, subset, caches)}
            for seed in range(a.seeds) for arm in a.arms]
    done = ds.run_all(jobs, a.jobs)
    order = {arm: i for i, arm in enumerate(a.arms)}
    results = sorted(done, key=lambda r: (order[r["arm"]], r["seed"]))
    signals = {"epsilon": rel["epsilon"], "entries": rel["entries"], "confused_pairs": rel["confused_pairs"][:5]}
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                       f"{torch.__version__}, {a.jobs} run(s) at a time, 1 thread each",
            "wall_s": time.perf_counter() - t0, "args": {k: v for k, v in vars(a).items()}}
    full = {"teacher": teacher, "signals": signals, "results": results, "meta": meta}
    (out / "results.json").write_text(json.dumps(full, indent=1, default=str))
    plot(a, out, results)
    print(report(a, out, results, teacher, signals, meta))
    return full


if __name__ == "__main__":
    main()
