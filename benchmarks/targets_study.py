"""Top-k targets (each tail mode) against sampled targets at equal bytes, and the compact layout.

Top-k targets drop the teacher's tail and the loss models it (``--tail uniform|renorm|bucket``), a
bias; sampled targets (Random-Sampling KD, Anshumann et al., "Sparse Logit Sampling", ACL 2025:
``precompute --targets sample``) store classes drawn from the teacher with their counts, an
unbiased estimate. On the demo's data (scikit-learn's digits, C = 10) the dense teacher is the
top-10 cache, so every arm can be set against it. Arms (same student, budget, views and seeds):

| arm | cache | train |
| --- | --- | --- |
| dense teacher | top-10 (k = C: nothing dropped) | `--tail uniform` (no tail to model) |
| top-K uniform / renorm / bucket | top-K | `--tail uniform` / `renorm` / `bucket` |
| top-K uniform, compact | top-K, `--compact` | `--tail uniform` |
| sampled | `--targets sample --samples N`, N chosen so that the target arrays take the bytes of top-K's | (read from the cache) |
| labels only | the top-K cache's views | `--mode labels` |

Every cache holds V = 8 seeded views per image with mixup, as the demo's (``--no-mixup``: without). Each student is then
evaluated on the centre view of the validation images: top-1, negative log-likelihood and expected
calibration error (15 equal-width confidence bins), and a reliability diagram of every arm (the
seeds' predictions pooled) is written as a PNG.

    python benchmarks/targets_study.py --out targets-study           # the study (~12 min on 2 cores)
    python benchmarks/targets_study.py --out targets-study --quick   # a smoke run (what the test runs)

One torch thread per run, ``--jobs`` runs at a time (default 2). Data, teacher, caches and finished
runs in ``--out`` are reused on a re-run.
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

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

STUDENT = "py:kdcache.models.zoo:student_cnn"
BINS = 15


def arms(K: int) -> dict:
    """arm → (cache kind, train settings)."""
    return {
        "dense teacher (top-10)": ("dense", {}),
        f"top-{K} uniform": ("topk", {"tail": "uniform"}),
        f"top-{K} renorm": ("topk", {"tail": "renorm"}),
        f"top-{K} bucket": ("topk", {"tail": "bucket"}),
        f"top-{K} uniform, compact": ("compact", {"tail": "uniform"}),
        "sampled": ("sample", {}),
        "labels only": ("topk", {"mode": "labels"}),
    }


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--topk", type=int, default=2, help="K of the top-K arms (of 10 classes)")
    p.add_argument("--samples", default="auto",
                   help="draws per record of the sampled arm; auto: the candidate whose target bytes are closest "
                        "to the top-K cache's")
    p.add_argument("--candidates", default="2,4,6,8,12,16", help="N tried by --samples auto")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None, help="student epochs (default: the demo's, 16)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--mixup", action=argparse.BooleanOptionalAction, default=True,
                   help="caches with mixup (the demo's views; default) or without")
    p.add_argument("--quick", action="store_true", help="a smoke run: small data, 1-epoch runs, 1 seed")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.jobs, a.candidates = 1, 1, "2,4"
    a.candidates = [int(x) for x in str(a.candidates).split(",")]
    return a


# ---- data, teacher, caches -------------------------------------------------------------------------


def prepare(a, root: Path) -> dict:
    """The demo's data and teacher (stages 1-2 of ``kdcache demo``), made once."""
    from kdcache.tools import demo
    from kdcache.tools.demo_data import build_digits_dataset
    from kdcache.learn.trainer import train

    plan = demo.QUICK if a.quick else demo.FULL
    plan = dataclasses.replace(plan, student_epochs=a.epochs or (1 if a.quick else plan.student_epochs))
    data = root / "data"
    if not (data / "val" / "classes.json").exists():
        build_digits_dataset(data, shard_size=plan.shard_size, seed=plan.seed, limit=plan.images)
    teacher = root / "runs" / "teacher"
    epochs = 1 if a.quick else plan.teacher_epochs
    if not (teacher / "summary.json").exists():
        train(demo._train_config(plan, root, "teacher", demo.TEACHER, epochs, "cpu", 0, False))
    return {"plan": dataclasses.asdict(plan), "data": str(data), "teacher": str(teacher / "model.pt")}


def target_bytes(path: Path) -> dict:
    """Bytes per record on disk: the target arrays (log-probs/counts and classes, in whichever
    layout), everything else, and the total."""
    from storage_bench import per_record

    b = per_record(path)
    targets = sum(v for k, v in b.items() if k in ("logprobs", "classes", "counts", "topk_logmass", "logprob_steps",
                                                   "class_list", "class_code"))
    return {"targets": targets, "total": b["total"], "arrays": b}


def make_cache(a, prep: dict, root: Path, kind: str, k: int = 0, samples: int = 0) -> dict:
    from kdcache.tools import demo
    from kdcache.tools.precompute import PrecomputeConfig, precompute
    from kdcache.data.views import AugSpec

    plan = demo.DemoPlan(**prep["plan"])
    name = {"dense": "top10", "topk": f"top{k}", "compact": f"top{k}-compact", "sample": f"sample{samples}"}[kind]
    path = root / "caches" / f"{name}.zarr"
    meta = path.with_suffix(".json")
    if not meta.exists():
        t0 = time.perf_counter()
        precompute(PrecomputeConfig(
            data=str(Path(prep["data"]) / "train"), teacher=demo.TEACHER, teacher_weights=prep["teacher"],
            num_classes=10, out=str(path), views=plan.views, topk=10 if kind == "dense" else max(k, 1),
            seed=plan.seed, res=plan.res, aug=AugSpec(scale=demo.SCALE, flip=False, mixup=a.mixup), batch_size=256,
            workers=0, device="cpu", progress=False, compact=kind == "compact",
            targets="sample" if kind == "sample" else "topk", samples=max(samples, 1)))
        meta.write_text(json.dumps({"seconds": time.perf_counter() - t0, **target_bytes(path)}))
    return {"path": str(path), **json.loads(meta.read_text())}


def caches(a, prep: dict, root: Path) -> tuple[dict, int]:
    """Every cache the arms need; the sampled one at the bytes of the top-K one."""
    out = {"dense": make_cache(a, prep, root, "dense"), "topk": make_cache(a, prep, root, "topk", a.topk),
           "compact": make_cache(a, prep, root, "compact", a.topk)}
    want = out["topk"]["targets"]
    if a.samples == "auto":
        tried = {}
        for n in a.candidates:
            tried[n] = make_cache(a, prep, root, "sample", samples=n)
            if tried[n]["targets"] > want:
                break
        n = min(tried, key=lambda m: abs(tried[m]["targets"] - want))
    else:
        n = int(a.samples)
    out["sample"] = make_cache(a, prep, root, "sample", samples=n)
    return out, n


# ---- runs ------------------------------------------------------------------------------------------


def evaluate(model_spec: str, weights: str, val: str, res: int) -> dict:
    """Predicted probabilities on the centre view of every validation image, with the labels."""
    import torch

    from kdcache.models.factory import create_model, normalize
    from kdcache.data.shards import decode_image, expand_urls, iter_samples
    from kdcache.data.views import center_view
    from kdcache.data.render import crop_tensor

    info = create_model(model_spec, num_classes=10, weights=weights, resolution=res)
    model = info.model.eval()
    pix, lab = [], []
    for u in expand_urls(val):
        for s in iter_samples(u):
            im = decode_image(s)
            pix.append(crop_tensor(im, center_view(im.width, im.height), res))
            lab.append(s.cls)
    with torch.no_grad():
        x = normalize(torch.stack(pix).float() / 255.0, info.mean, info.std)
        probs = torch.cat([torch.softmax(model(x[i : i + 256]).float(), -1) for i in range(0, len(x), 256)])
    return {"probs": probs.numpy().astype(np.float64), "labels": np.array(lab, dtype=np.int64)}


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> dict:
    """Top-1, NLL, ECE (equal-width bins of the top-1 confidence) and the reliability curve."""
    conf, pred = probs.max(1), probs.argmax(1)
    hit = (pred == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    ece, curve = 0.0, []
    for b in range(bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(hit[m].mean() - conf[m].mean())
            curve.append({"bin": b, "confidence": float(conf[m].mean()), "accuracy": float(hit[m].mean()),
                          "count": int(m.sum())})
    nll = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return {"top1": float(hit.mean()), "nll": nll, "ece": float(ece), "curve": curve,
            "mean_confidence": float(conf.mean())}


def run_one(job: dict) -> dict:
    """Train one (arm, seed) and evaluate it; in a fresh process with one torch thread."""
    import torch

    torch.set_num_threads(1)
    from kdcache.tools import demo
    from kdcache.learn.trainer import train

    out = Path(job["out"])
    ev = out / "eval.json"
    if ev.exists() and (out / "summary.json").exists():
        return json.loads(ev.read_text())
    plan = demo.DemoPlan(**job["plan"])
    cfg = demo._train_config(plan, Path(job["root"]), "x", STUDENT, plan.student_epochs, "cpu", 0, False,
                             cache=job["cache"], threads=1, **job["train"])
    cfg = dataclasses.replace(cfg, out=str(out), seed=job["seed"], eval_epochs=plan.student_epochs)
    t0 = time.perf_counter()
    s = train(cfg)
    e = evaluate(STUDENT, str(out / "model.pt"), str(Path(job["data"]) / "val"), plan.res)
    np.savez_compressed(out / "val_probs.npz", **e)
    rep = {"arm": job["arm"], "seed": job["seed"], "train_s": time.perf_counter() - t0,
           "summary_val_top1": s["final_val_top1"], **calibration(e["probs"], e["labels"])}
    ev.write_text(json.dumps(rep, indent=1))
    return rep


# ---- report ----------------------------------------------------------------------------------------


def mean_std(xs):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def aggregate(reps: list[dict], root: Path, arm_names) -> dict:
    out = {}
    for arm in arm_names:
        rs = sorted((r for r in reps if r["arm"] == arm), key=lambda r: r["seed"])
        if not rs:
            continue
        pooled = [np.load(root / "runs" / slug(arm, r["seed"]) / "val_probs.npz") for r in rs]
        cal = calibration(np.concatenate([p["probs"] for p in pooled]), np.concatenate([p["labels"] for p in pooled]))
        out[arm] = {"seeds": [r["seed"] for r in rs],
                    **{m: dict(zip(("mean", "std"), mean_std([r[m] for r in rs])), values=[r[m] for r in rs])
                       for m in ("top1", "nll", "ece", "mean_confidence")},
                    "pooled_curve": cal["curve"], "pooled_ece": cal["ece"], "train_s": [r["train_s"] for r in rs]}
    return out


def slug(arm: str, seed: int) -> str:
    return f"{arm.replace(', ', '-').replace(' ', '_').replace('(', '').replace(')', '')}-s{seed}"


def report(a, agg: dict, cache_info: dict, n_samples: int, teacher: dict, meta: dict) -> str:
    K = a.topk
    lines = [f"Teacher (`{meta['teacher_spec']}`) on the validation centre views: top-1 {100 * teacher['top1']:.1f} %, "
             f"NLL {teacher['nll']:.3f}, ECE {100 * teacher['ece']:.2f} %.", "",
             "Bytes per record on disk (records = images × V; the target arrays, then the whole cache):", "",
             "| cache | target arrays | whole cache |", "|---|---|---|"]
    for kind, label in (("dense", "top-10 (dense)"), ("topk", f"top-{K}"), ("compact", f"top-{K}, compact"),
                        ("sample", f"sampled, N = {n_samples}")):
        c = cache_info[kind]
        lines.append(f"| {label} | {c['targets']:.2f} | {c['total']:.2f} |")
    lines += ["", f"Students (`{STUDENT}`), {a.seeds} seeds, validation centre views; mean ± std, then each seed:", "",
              "| arm | top-1 (%) | NLL | ECE (%) | mean confidence (%) |", "|---|---|---|---|---|"]
    for arm, r in agg.items():
        def cell(m, scale=100.0, fmt=".1f"):
            vals = ", ".join(format(scale * v, fmt) for v in r[m]["values"])
            return f"{scale * r[m]['mean']:{fmt}} ± {scale * r[m]['std']:{fmt}} ({vals})"

        lines.append(f"| {arm} | {cell('top1')} | {cell('nll', 1.0, '.3f')} | {cell('ece', 100.0, '.2f')} | "
                     f"{cell('mean_confidence')} |")
    base = "dense teacher (top-10)"
    if base in agg and len(agg[base]["top1"]["values"]) > 1:
        lines += ["", "Paired differences against the dense teacher (same seed, views and data order), mean ± std:", "",
                  "| arm | Δ top-1 (points) | Δ NLL | Δ ECE (points) |", "|---|---|---|---|"]
        for arm, r in agg.items():
            if arm == base:
                continue
            d = {m: [x - y for x, y in zip(r[m]["values"], agg[base][m]["values"])] for m in ("top1", "nll", "ece")}
            f = lambda xs, s, fmt: f"{s * statistics.fmean(xs):+{fmt}} ± {s * statistics.stdev(xs):{fmt}}"  # noqa: E731
            lines.append(f"| {arm} | {f(d['top1'], 100, '.1f')} | {f(d['nll'], 1, '.3f')} | {f(d['ece'], 100, '.2f')} |")
    lines += ["", f"Machine: {meta['machine']}; wall time {meta['wall_s'] / 60:.1f} min."]
    return "\n".join(lines)


def plot(agg: dict, teacher: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.6), dpi=100, gridspec_kw={"width_ratios": [1.15, 1]})
    ax[0].plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    series = [("teacher", teacher["curve"], "black", "--")] + [(arm, r["pooled_curve"], None, "-") for arm, r in agg.items()]
    for label, curve, color, ls in series:
        xs = [p["confidence"] for p in curve]
        ys = [p["accuracy"] for p in curve]
        ax[0].plot(xs, ys, marker="o", markersize=3, linestyle=ls, color=color, label=label, linewidth=1.2)
    ax[0].set_xlabel("confidence (top-1 probability), bin mean")
    ax[0].set_ylabel("accuracy in the bin")
    ax[0].set_title(f"reliability, seeds pooled ({BINS} bins)")
    ax[0].grid(alpha=0.3)
    ax[0].legend(fontsize=7)
    names = list(agg)
    y = np.arange(len(names))
    ax[1].barh(y, [100 * agg[n]["ece"]["mean"] for n in names], xerr=[100 * agg[n]["ece"]["std"] for n in names],
               color="tab:blue", alpha=0.8)
    ax[1].axvline(100 * teacher["ece"], color="black", linestyle="--", linewidth=1, label="teacher")
    ax[1].set_yticks(y, names, fontsize=8)
    ax[1].invert_yaxis()
    ax[1].set_xlabel("ECE (%), mean ± std over seeds")
    ax[1].legend(fontsize=7)
    ax[1].grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    import torch

    a = parse(argv)
    root = Path(a.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prep = prepare(a, root)
    teacher_eval = evaluate("py:kdcache.models.zoo:teacher_cnn", prep["teacher"], str(Path(prep["data"]) / "val"),
                            prep["plan"]["res"])
    teacher = calibration(teacher_eval["probs"], teacher_eval["labels"])
    info, n_samples = caches(a, prep, root)
    arm_set = arms(a.topk)
    jobs = []
    for arm, (kind, train_kw) in arm_set.items():
        for seed in range(a.seeds):
            jobs.append({"arm": arm, "seed": seed, "cache": info[kind]["path"], "train": train_kw, "plan": prep["plan"],
                         "root": str(root), "data": prep["data"], "out": str(root / "runs" / slug(arm, seed))})
    reps = []
    if a.jobs > 1:
        with mp.get_context("spawn").Pool(a.jobs) as pool:
            for r in pool.imap_unordered(run_one, jobs):
                reps.append(r)
                print(f"[{len(reps)}/{len(jobs)}] {r['arm']} seed {r['seed']}: top-1 {100 * r['top1']:.1f} %, "
                      f"ECE {100 * r['ece']:.2f} %", flush=True)
    else:
        reps = [run_one(j) for j in jobs]
    agg = aggregate(reps, root, arm_set)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                       f"{a.jobs} runs in parallel, 1 thread each", "wall_s": time.perf_counter() - t0,
            "teacher_spec": "py:kdcache.models.zoo:teacher_cnn"}
    text = report(a, agg, info, n_samples, teacher, meta)
    (root / "table.md").write_text(text + "\n")
    plot(agg, teacher, root / "reliability.png")
    results = {"args": {k: v for k, v in vars(a).items()}, "samples": n_samples, "caches": info, "teacher": teacher,
               "arms": agg, "meta": meta}
    (root / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(text)
    return results


if __name__ == "__main__":
    main()
