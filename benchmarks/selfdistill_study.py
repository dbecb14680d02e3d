"""Does self-distillation help the exits of a multi-exit student? (Zhang et al., "Be Your Own Teacher")

The same multi-exit student (a zoo SmallCNN with three stages: two shallow exits and its own head),
the same views, budget and seeds, trained four ways on the demo data (scikit-learn's digits), and
the plain student (no exits) as the reference for the deepest exit:

| arm | deepest exit | shallow exits | kdcache flags |
| --- | --- | --- | --- |
| plain, labels | CE | (none: the student alone) | `--mode labels` |
| independent, labels | CE | CE | `--mode labels --self-distill --sd-alpha 0` |
| self-distilled, labels | CE | α·T²·KL(deepest ‖ exit) + (1−α)·CE | `--mode labels --self-distill` |
| independent, cached KD | cached KD | CE | `--self-distill --sd-alpha 0` |
| plain, cached KD | cached KD | (none) | (the demo's student) |
| self-distilled, cached KD | cached KD | α·T²·KL(deepest ‖ exit) + (1−α)·CE | `--self-distill` |

(α = 0.3, T = 3 as in the paper's code; ``--sd-alpha 0`` leaves each shallow exit on its own
cross-entropy, so the exits are trained jointly but nothing flows from deep to shallow.) Every arm
trains on the cache's views (mixup included); "labels" arms use ``--mode labels --cache``, so only
the deepest exit's loss differs between the labels and cached-KD arms. The data, teacher and cache
are the demo's (``kdcache demo``'s stages 1-3, reused when present).

Each run is then evaluated with ``kdcache.tools.evaluate.evaluate_run`` (per-exit top-1, the ensemble of
exits, early exit over a grid of thresholds). Reported: per-exit top-1 mean ± std over seeds and
each value, and the early-exit accuracy/compute curve per arm (the mean over seeds at each
threshold) in a PNG.

    python benchmarks/selfdistill_study.py --out sd-study            # the study (~15 min on 2 cores)
    python benchmarks/selfdistill_study.py --out sd-study --quick    # a smoke run (what the test runs)

One torch thread per process, ``--jobs`` runs in parallel (default 2), data workers 0. Finished
runs (``summary.json`` and ``eval.json`` present) are reused on a re-run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARMS = {
    "plain, labels": dict(mode="labels", self_distill=False),
    "independent, labels": dict(mode="labels", self_distill={"alpha": 0.0}),
    "self-distilled, labels": dict(mode="labels", self_distill=True),
    "plain, cached KD": dict(self_distill=False),
    "independent, cached KD": dict(self_distill={"alpha": 0.0}),
    "self-distilled, cached KD": dict(self_distill=True),
}
QUICK_ARMS = ("plain, cached KD", "independent, labels", "self-distilled, cached KD")
# Paired comparisons (same seed, same views): (label, arm, baseline arm)
PAIRS = (("self-distilled − independent, labels", "self-distilled, labels", "independent, labels"),
         ("self-distilled − independent, cached KD", "self-distilled, cached KD", "independent, cached KD"),
         ("self-distilled − plain, labels", "self-distilled, labels", "plain, labels"),
         ("self-distilled − plain, cached KD", "self-distilled, cached KD", "plain, cached KD"),
         ("independent − plain, labels", "independent, labels", "plain, labels"),
         ("independent − plain, cached KD", "independent, cached KD", "plain, cached KD"))
STUDENT = "py:kdcache.models.zoo:student_cnn"


def slug(arm: str) -> str:
    return arm.replace(", ", "-").replace(" ", "_")


def prepare(root: Path, quick: bool) -> dict:
    """The demo's data, teacher and cache (stages 1-3 of ``kdcache demo``), made once."""
    from kdcache.tools import demo
    from kdcache.tools.demo_data import build_digits_dataset
    from kdcache.tools.precompute import PrecomputeConfig, precompute
    from kdcache.learn.trainer import train
    from kdcache.data.views import AugSpec

    plan = demo.QUICK if quick else demo.FULL
    root.mkdir(parents=True, exist_ok=True)
    data, cache = root / "data", root / "cache.zarr"
    if not (data / "val" / "classes.json").exists():
        build_digits_dataset(data, shard_size=plan.shard_size, seed=plan.seed, limit=plan.images)
    teacher = root / "runs" / "teacher"
    if not (teacher / "summary.json").exists():
        train(demo._train_config(plan, root, "teacher", demo.TEACHER, plan.teacher_epochs, "cpu", 0, False))
    if not demo._cache_complete(cache):
        precompute(PrecomputeConfig(
            data=str(data / "train"), teacher=demo.TEACHER, teacher_weights=str(teacher / "model.pt"),
            num_classes=10, out=str(cache), views=plan.views, topk=plan.topk, seed=plan.seed, res=plan.res,
            aug=AugSpec(scale=demo.SCALE, flip=False, mixup=True), batch_size=256, workers=0, device="cpu",
            progress=False))
    t = json.loads((teacher / "summary.json").read_text())
    return {"plan": dataclasses.asdict(plan), "data": str(data), "cache": str(cache),
            "teacher_val_top1": t["final_val_top1"]}


def _one_thread() -> dict:
    """``threads=1`` where this kdcache's TrainConfig has the field (the process is set to one thread anyway)."""
    from kdcache.learn.config import TrainConfig

    return {"threads": 1} if "threads" in {f.name for f in dataclasses.fields(TrainConfig)} else {}


def one_run(job: dict) -> dict:
    """Train one (arm, seed) and evaluate it; in a fresh process with one torch thread."""
    import torch

    torch.set_num_threads(1)
    from kdcache.tools import demo
    from kdcache.tools.evaluate import evaluate_run
    from kdcache.learn.trainer import train

    out = Path(job["out"])
    ev_path = out / "eval.json"
    if ev_path.exists() and (out / "summary.json").exists():
        return json.loads(ev_path.read_text())
    plan = demo.DemoPlan(**job["plan"])
    cfg = demo._train_config(plan, Path(job["root"]), "x", job["student"], job["epochs"], "cpu", 0, False,
                             cache=job["cache"], **ARMS[job["arm"]], **_one_thread())
    cfg = dataclasses.replace(cfg, out=str(out), seed=job["seed"])
    t0 = time.perf_counter()
    summary = train(cfg)
    train_s = time.perf_counter() - t0
    rep = evaluate_run(str(out), str(Path(job["data"]) / "val"), thresholds=None, sweep=True, batch_size=256,
                       device="cpu", plot=str(out / "early_exit.png"))
    rep.update(arm=job["arm"], seed=job["seed"], train_s=train_s, summary_val_top1=summary["final_val_top1"])
    ev_path.write_text(json.dumps(rep, indent=1))
    return rep


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _deep_name(reps: list[dict]) -> str:
    multi = [r for r in reps if r["self_distill"]]
    return multi[0]["exits"][-1]["name"] if multi else "exit"


def aggregate(reps: list[dict]) -> dict:
    """Per arm: per-exit top-1 (mean, std, values; a plain run's one exit is the deepest), the
    ensemble, early exit at the default thresholds, and the mean early-exit curve over seeds."""
    deep = _deep_name(reps)
    out = {}
    for arm in ARMS:
        rs = sorted((r for r in reps if r["arm"] == arm), key=lambda r: r["seed"])
        if not rs:
            continue
        names = [e["name"] for e in rs[0]["exits"]] if rs[0]["self_distill"] else [deep]
        exits = {}
        for i, n in enumerate(names):
            vals = [r["exits"][i]["top1"] for r in rs]
            m, sd = mean_std(vals)
            exits[n] = {"mean": m, "std": sd, "values": vals, "compute_alone": rs[0]["exits"][i]["compute_alone"]}
        ens = [r["ensemble"]["top1"] for r in rs]
        ee = [r["early_exit"]["top1"] for r in rs]
        eec = [r["early_exit"]["compute"] for r in rs]
        curve = []
        for j, p in enumerate(rs[0]["sweep"]):
            curve.append({"threshold": p["thresholds"][0] if p["thresholds"] else None,
                          "top1": statistics.fmean(r["sweep"][j]["top1"] for r in rs),
                          "compute": statistics.fmean(r["sweep"][j]["compute"] for r in rs)})
        out[arm] = {"seeds": [r["seed"] for r in rs], "self_distill": rs[0]["self_distill"], "exits": exits,
                    "ensemble": dict(zip(("mean", "std"), mean_std(ens)), values=ens,
                                     compute=rs[0]["ensemble"]["compute"]),
                    "early_exit": {"thresholds": rs[0]["early_exit"]["thresholds"], "top1": mean_std(ee),
                                   "compute": mean_std(eec), "share": [statistics.fmean(x) for x in
                                                                        zip(*(r["early_exit"]["share"] for r in rs))],
                                   "values": ee},
                    "curve": curve, "train_s": [r["train_s"] for r in rs]}
    return out


def paired(agg: dict) -> dict:
    """Per pair of arms and exit: the per-seed differences (same seed, same views), mean ± std."""
    out = {}
    for label, arm, base in PAIRS:
        if arm not in agg or base not in agg:
            continue
        a, b = agg[arm], agg[base]
        rows = {}
        for n in a["exits"]:
            if n in b["exits"] and a["seeds"] == b["seeds"]:
                d = [x - y for x, y in zip(a["exits"][n]["values"], b["exits"][n]["values"])]
                rows[n] = {"mean": statistics.fmean(d), "std": statistics.stdev(d) if len(d) > 1 else 0.0,
                           "values": d, "wins": sum(x > 0 for x in d), "n": len(d)}
        out[label] = rows
    return out


def table(agg: dict, pairs: dict) -> str:
    pct = lambda m, s: f"{100 * m:.1f} ± {100 * s:.1f}"  # noqa: E731
    arms = list(agg)
    ref = next(a for a in arms if agg[a]["self_distill"]) if any(agg[a]["self_distill"] for a in arms) else arms[0]
    names = list(agg[ref]["exits"])
    head = "| arm | " + " | ".join(f"{n} (compute {agg[ref]['exits'][n]['compute_alone']:.2f})" for n in names)
    head += f" | ensemble (compute {agg[ref]['ensemble']['compute']:.2f}) | early exit @0.9: top-1, compute |"
    lines = ["Validation top-1 (%), mean ± std over seeds:", "", head, "|" + " --- |" * (len(names) + 3)]
    for arm in arms:
        a = agg[arm]
        cells = [pct(a["exits"][n]["mean"], a["exits"][n]["std"]) if n in a["exits"] else "—" for n in names]
        ee = a["early_exit"]
        ens = pct(a["ensemble"]["mean"], a["ensemble"]["std"]) if a["self_distill"] else "—"
        early = f"{pct(*ee['top1'])}, {ee['compute'][0]:.2f}" if a["self_distill"] else "—"
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {ens} | {early} |")
    lines += ["", "Each value (seeds " + ", ".join(map(str, agg[arms[0]]["seeds"])) + "), top-1 %:", ""]
    lines += ["| arm | " + " | ".join(names) + " | ensemble |", "|" + " --- |" * (len(names) + 2)]
    for arm in arms:
        a = agg[arm]
        cells = [" / ".join(f"{100 * v:.1f}" for v in a["exits"][n]["values"]) if n in a["exits"] else "—"
                 for n in names]
        ens = " / ".join(f"{100 * v:.1f}" for v in a["ensemble"]["values"]) if a["self_distill"] else "—"
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {ens} |")
    if pairs:
        lines += ["", "Paired differences (same seed and views), top-1 points, mean ± std (seeds where the first is "
                  "better):", "", "| comparison | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
        for label, rows in pairs.items():
            cells = [f"{100 * rows[n]['mean']:+.1f} ± {100 * rows[n]['std']:.1f} ({rows[n]['wins']}/{rows[n]['n']})"
                     if n in rows else "—" for n in names]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(agg: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    styles = {"independent, labels": ("tab:blue", "--"), "self-distilled, labels": ("tab:blue", "-"),
              "independent, cached KD": ("tab:orange", "--"), "self-distilled, cached KD": ("tab:orange", "-"),
              "plain, labels": ("tab:blue", None), "plain, cached KD": ("tab:orange", None)}
    for arm, a in agg.items():
        color, ls = styles[arm]
        if ls is None:  # the plain student: one point
            e = next(iter(a["exits"].values()))
            ax.scatter([e["compute_alone"]], [100 * e["mean"]], color=color, marker="*", s=140, zorder=4, label=arm)
            continue
        pts = sorted(a["curve"], key=lambda p: p["compute"])
        ax.plot([p["compute"] for p in pts], [100 * p["top1"] for p in pts], ls, color=color, marker=".", label=arm)
        for n, e in a["exits"].items():
            ax.scatter([e["compute_alone"]], [100 * e["mean"]], color=color, marker="s" if ls == "-" else "x", zorder=3)
    ax.set_xlabel("compute per image (FLOPs / the plain student's)")
    ax.set_ylabel("validation top-1 (%), mean over seeds")
    ax.set_title("early exit on digits: lines = one shared threshold swept;\n"
                 "squares/crosses = each exit alone; stars = the plain student", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="sd-study", help="Output folder (data, cache, runs, results).")
    ap.add_argument("--quick", action="store_true", help="A smoke run: the quick demo data, 2 epochs, 2 seeds, 3 arms.")
    ap.add_argument("--seeds", default=None, help="Comma-separated seeds [default: 0,1,2,3; quick: 0,1].")
    ap.add_argument("--epochs", type=int, default=None, help="Student epochs [default: the demo's, 16; quick: 2].")
    ap.add_argument("--student", default=STUDENT, help="A staged student spec (three stages: two shallow exits).")
    ap.add_argument("--jobs", type=int, default=2, help="Runs in parallel (one torch thread each).")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    root = Path(args.out).resolve()
    base = prepare(root / "demo", args.quick)
    seeds = [int(s) for s in (args.seeds or ("0,1" if args.quick else "0,1,2,3")).split(",")]
    epochs = args.epochs or (2 if args.quick else base["plan"]["student_epochs"])
    arms = list(ARMS) if not args.quick else list(QUICK_ARMS)
    jobs = [dict(arm=arm, seed=s, out=str(root / "runs" / f"{slug(arm)}-s{s}"), root=str(root / "demo"),
                 plan=base["plan"], cache=base["cache"], data=base["data"], student=args.student, epochs=epochs)
            for s in seeds for arm in arms]
    with mp.get_context("spawn").Pool(max(1, args.jobs), maxtasksperchild=1) as pool:
        reps = pool.map(one_run, jobs, chunksize=1)
    agg = aggregate(reps)
    pairs = paired(agg)
    png = plot(agg, root / "selfdistill_early_exit.png")
    import torch

    results = {
        "command": " ".join([sys.executable.split("/")[-1], *sys.argv]) if argv is None else argv,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "student": args.student, "epochs": epochs, "seeds": seeds, "teacher_val_top1": base["teacher_val_top1"],
        "val_images": reps[0]["val_images"], "arms": agg, "paired": pairs, "png": str(png),
        "wall_s": time.perf_counter() - t0,
    }
    (root / "results.json").write_text(json.dumps(results, indent=1))
    md = table(agg, pairs)
    (root / "table.md").write_text(md + "\n")
    print(md)
    print(f"\nteacher {100 * base['teacher_val_top1']:.1f}% val top-1; {results['val_images']} val images; "
          f"plot {png}; wall {results['wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
