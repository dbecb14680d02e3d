"""Bytes per record of a cache, split by array: the plain layout against ``--compact`` (format 3).

Two teachers:

- **synthetic C = 1000**: ``--images`` images (default 2 shards × 1000), V = 10 views, top-10, real
  geometry (Inception crops of ImageNet-like image sizes, flips, mixup pairs) drawn by the seeded
  sampler. Each image has a cluster of 20 plausible classes (logit +4 ± 1, one of them +4 more)
  over N(0, 1) logits for the other 980; each view adds N(0, 0.8) noise; the logits are scaled by
  1.6. That gives a mean top-1 probability of ~0.71, a mean top-10 mass of ~0.97, the top-1 class
  agreeing with view 0's in ~70 % of the views, and ~20 distinct classes in the V·k = 100 top-10
  entries of one image (the overlap the class lists exploit). The script prints these statistics.
  The records go through ``CacheWriter`` exactly as precompute's would (float32 log-probs, so the
  compact layout quantises from float32 like precompute --compact does).
- **a hard synthetic teacher, C = 1000** (``--hard``): the same, but each image's cluster has 10
  classes (logit +2 ± 1, one +7 more) and each view adds N(0, 2.5) noise, so the top classes hold
  and the lower ranks change from view to view: ~83 distinct classes among an image's 100 top-10
  entries. There the compact layout codes each group's class ids directly rather than against
  per-image lists (``cache/store/class_coding.py`` picks the cheaper per group); the table says
  which coding the groups chose.
- **the demo's trained teacher** (``--demo DIR``: a ``kdcache demo`` output; its data and
  ``runs/teacher/model.pt``): ``kdcache precompute`` runs on its training shards with the demo's
  settings (V = 8, mixup, top-5 of 10 classes) into a plain and a compact cache. Without
  ``--demo`` this part is skipped.

For each cache the table gives bytes on disk per record (records = good images × V) of every
array, the group metadata (each group's and array's ``zarr.json``; shard indexes are inside the
array files) and the total. The compact cache is read back and compared with the plain one: the
largest log-prob difference (the quantisation bound is 1/16 nat plus float16 rounding of the
top-k mass), the largest tail-mass difference, and whether classes and geometry are identical.

    python benchmarks/storage_bench.py                       # synthetic teacher only
    python benchmarks/storage_bench.py --hard                # and the hard synthetic teacher
    python benchmarks/storage_bench.py --demo kdcache-demo   # and the demo's teacher
    python benchmarks/storage_bench.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# ---- measuring -------------------------------------------------------------------------------------


def bytes_by_array(path: str | Path) -> tuple[dict[str, int], int]:
    """({array: bytes of its chunk files}, bytes of metadata: every zarr.json), summed over the groups."""
    arrays: dict[str, int] = {}
    meta = 0
    for dp, _, files in os.walk(path):
        rel = Path(dp).relative_to(path).parts
        for f in files:
            size = os.path.getsize(os.path.join(dp, f))
            if f == "zarr.json":
                meta += size
            elif len(rel) >= 2:
                arrays[rel[1]] = arrays.get(rel[1], 0) + size
    return arrays, meta


def records(path: str | Path) -> int:
    from kdcache.cache.store import CacheReader

    r = CacheReader(str(path))
    n = 0
    for name in r.shard_names():
        a = r.shard_attrs(name)
        n += (int(a["num_samples"]) - len(a.get("bad") or {})) * r.views
    return n


def per_record(path) -> dict:
    arrays, meta = bytes_by_array(path)
    n = records(path)
    out = {a: b / n for a, b in sorted(arrays.items())}
    out["metadata"] = meta / n
    out["total"] = (sum(arrays.values()) + meta) / n
    return out


def class_codings(path) -> dict[str, int]:
    """How many groups of a cache chose each class coding (compact layout; {} for plain)."""
    import zarr

    out: dict[str, int] = {}
    for _, g in zarr.open_group(str(path), mode="r").groups():
        if "class_coding" in g.attrs:
            out[g.attrs["class_coding"]] = out.get(g.attrs["class_coding"], 0) + 1
    return out


def compare(plain, compact, truth: dict | None = None) -> dict:
    """How far the compact cache's decoded arrays are from the plain one's, and (``truth``: the
    float32 top-k log-probs per shard) how far each is from the teacher's float32 values: per
    log-prob and in top-k mass (1 − tail)."""
    from kdcache.cache.store import CacheReader

    a, b = CacheReader(str(plain)), CacheReader(str(compact))
    worst = {"max_abs_logprob_diff": 0.0, "max_abs_topk_mass_diff": 0.0}
    if truth is not None:
        worst.update({f"{w}_{q}": 0.0 for w in ("plain", "compact") for q in ("logprob_err", "topk_mass_err")})
    same_cls = same_geo = True

    def up(key, x):
        worst[key] = max(worst[key], float(x))

    for name in a.shard_names():
        x, y = a.read_shard(name), b.read_shard(name)
        good = np.isfinite(x["logprobs"].astype(np.float64)).all(-1)
        lx, ly = x["logprobs"].astype(np.float64)[good], y["logprobs"].astype(np.float64)[good]
        up("max_abs_logprob_diff", np.abs(lx - ly).max())
        up("max_abs_topk_mass_diff", np.abs(np.exp(lx).sum(-1) - np.exp(ly).sum(-1)).max())
        if truth is not None:
            lt = truth[name].astype(np.float64)[good]
            for w, l in (("plain", lx), ("compact", ly)):
                up(f"{w}_logprob_err", np.abs(l - lt).max())
                up(f"{w}_topk_mass_err", np.abs(np.exp(l).sum(-1) - np.exp(lt).sum(-1)).max())
        same_cls &= bool(np.array_equal(x["classes"], y["classes"]))
        same_geo &= all(np.array_equal(x[g], y[g]) for g in ("box", "flip", "mix_with", "mix_lam"))
    return {**worst, "classes_identical": same_cls, "geometry_identical": same_geo}


# ---- the synthetic teacher -------------------------------------------------------------------------


def synthetic_logits(n: int, C: int, V: int, seed: int, cluster: int = 20, lift: float = 4.0, top: float = 4.0,
                     view_noise: float = 0.8, scale: float = 1.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, size=(n, C)).astype(np.float32)
    for i in range(n):
        cl = rng.choice(C, size=cluster, replace=False)
        base[i, cl] += lift + rng.normal(0, 1.0, size=cluster).astype(np.float32)
        base[i, cl[0]] += top
    out = np.empty((n, V, C), dtype=np.float32)
    for v in range(V):
        out[:, v] = (base + rng.normal(0, view_noise, size=(n, C)).astype(np.float32)) * scale
    return out


HARD = dict(cluster=10, lift=2.0, top=7.0, view_noise=2.5)  # the hard teacher's synthetic_logits settings


def synthetic_shard(name: str, n: int, C: int, V: int, k: int, seed: int, mixup: bool, teacher: dict | None = None):
    """One shard's records as precompute would hand them to CacheWriter."""
    import torch

    from kdcache.data.views import AugSpec, sample_shard_views

    rng = np.random.default_rng(seed + 1)
    keys = [f"n{rng.integers(1e8):08d}_{i:05d}" for i in range(n)]  # ImageNet-like keys
    h = rng.integers(200, 500, n)
    w = (h * rng.choice([0.75, 1.0, 1.333, 1.5], n)).astype(int)
    size = np.stack([h, w], 1).astype(np.int32)
    sv = sample_shard_views(0, name, keys, size, V, AugSpec(mixup=mixup))  # the manifest's seed
    logits = torch.from_numpy(synthetic_logits(n, C, V, seed, **(teacher or {})))
    lp = torch.log_softmax(logits, -1)
    vals, ids = torch.topk(lp, k, -1)
    return dict(keys=keys, size=size, logprobs=vals.numpy(), classes=ids.numpy(), box=sv.box, flip=sv.flip,
                mix_with=sv.mix_with, mix_lam=sv.mix_lam), lp


def synthetic_stats(shards) -> dict:
    top1, mass, agree, union = [], [], [], []
    for rec, _ in shards:
        p = np.exp(rec["logprobs"].astype(np.float64))
        top1.append(p[..., 0].ravel())
        mass.append(p.sum(-1).ravel())
        c = rec["classes"]
        agree.append((c[:, :, 0] == c[:, :1, 0]).ravel())
        union.append([len(set(c[i].ravel().tolist())) for i in range(len(c))])
    cat = np.concatenate
    return {"mean_top1_prob": float(cat(top1).mean()), "mean_topk_mass": float(cat(mass).mean()),
            "top1_agrees_with_view0": float(cat(agree).mean()),
            "mean_distinct_classes_per_image": float(np.mean(cat(union)))}


def synthetic_caches(root: Path, images: int, shards: int, C: int = 1000, V: int = 10, k: int = 10,
                     mixup: bool = False, teacher: dict | None = None, label: str = "synthetic") -> dict:
    from kdcache.data.render import render_backend
    from kdcache.cache.store import CacheWriter, encoding_record, make_manifest
    from kdcache.data.views import AugSpec

    per = images // shards
    names = [f"train-{s:06d}" for s in range(shards)]
    data = [synthetic_shard(n, per, C, V, k, seed=s, mixup=mixup, teacher=teacher) for s, n in enumerate(names)]
    out = {"stats": synthetic_stats(data), "caches": {}}
    # compact_lists: every group coded against per-image class lists, as before groups chose (the
    # encoding earlier releases wrote)
    encodings = {"plain": encoding_record("plain"), "compact": encoding_record("compact", "topk"),
                 "compact_lists": {**encoding_record("compact", "topk"), "classes": "image_list"}}
    for layout, encoding in encodings.items():
        path = root / f"{label}-{'mixup-' if mixup else ''}{layout}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        man = make_manifest(teacher={"spec": "synthetic", "num_classes": C}, augmentation=AugSpec(mixup=mixup).to_dict(),
                            seed=0, views=V, topk=k, resolution=224, render=render_backend(), shards=names,
                            sources=[f"/data/{n}.tar" for n in names], encoding=encoding)
        w = CacheWriter(str(path), man)
        t0 = time.perf_counter()
        for s, (name, (rec, _)) in enumerate(zip(names, data)):
            w.write_shard(name, source=f"/data/{name}.tar", **rec)
        out["caches"][layout] = {"path": str(path), "bytes": per_record(path), "write_s": time.perf_counter() - t0,
                                 "class_codings": class_codings(path)}
    truth = {name: rec["logprobs"] for name, (rec, _) in zip(names, data)}
    out["compact_vs_plain"] = compare(out["caches"]["plain"]["path"], out["caches"]["compact"]["path"], truth)
    return out


# ---- the demo's teacher ----------------------------------------------------------------------------


def demo_caches(root: Path, demo_dir: Path, views: int = 8, topk: int = 5) -> dict:
    from kdcache.tools import demo
    from kdcache.tools.precompute import PrecomputeConfig, precompute
    from kdcache.data.views import AugSpec

    weights = demo_dir / "runs" / "teacher" / "model.pt"
    out = {"caches": {}}
    for layout in ("plain", "compact"):
        path = root / f"demo-{layout}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        precompute(PrecomputeConfig(
            data=str(demo_dir / "data" / "train"), teacher=demo.TEACHER, teacher_weights=str(weights), num_classes=10,
            out=str(path), views=views, topk=topk, seed=0, res=32, aug=AugSpec(scale=demo.SCALE, flip=False, mixup=True),
            batch_size=256, workers=0, device="cpu", progress=False, compact=layout == "compact"))
        out["caches"][layout] = {"path": str(path), "bytes": per_record(path), "precompute_s": time.perf_counter() - t0}
    from kdcache.cache.store import CacheReader

    r = CacheReader(out["caches"]["plain"]["path"])
    lp = np.concatenate([r.read_shard(n)["logprobs"].reshape(-1, topk) for n in r.shard_names()]).astype(np.float64)
    lp = lp[np.isfinite(lp).all(-1)]
    out["stats"] = {"mean_top1_prob": float(np.exp(lp[:, 0]).mean()), "mean_topk_mass": float(np.exp(lp).sum(-1).mean())}
    out["compact_vs_plain"] = compare(out["caches"]["plain"]["path"], out["caches"]["compact"]["path"])
    return out


# ---- report ----------------------------------------------------------------------------------------

ORDER = ("logprobs", "topk_logmass", "logprob_steps", "classes", "class_list", "class_code", "counts", "box", "flip",
         "mix_with", "mix_lam", "keys", "size", "metadata", "total")


def table(title: str, part: dict) -> str:
    cols = [c for c in ("plain", "compact", "compact_lists") if c in part["caches"]]
    sizes = [part["caches"][c]["bytes"] for c in cols]
    lines = [f"{title}", "", "| array | " + " | ".join(f"{c} (B/record)" for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    fmt = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
    for a in ORDER:
        if any(a in b for b in sizes):
            bold = "**" if a == "total" else ""
            lines.append(f"| {bold}{a}{bold} | " + " | ".join(f"{bold}{fmt(b.get(a))}{bold}" for b in sizes) + " |")
    cmp_ = part["compact_vs_plain"]
    lines += ["", f"compact vs plain: max |Δ log-prob| {cmp_['max_abs_logprob_diff']:.4f}, max |Δ top-k mass| "
                  f"{cmp_['max_abs_topk_mass_diff']:.2e}, classes identical: {cmp_['classes_identical']}, geometry "
                  f"identical: {cmp_['geometry_identical']}."]
    if "plain_logprob_err" in cmp_:
        lines.append(f"Against the teacher's float32 top-k: plain (float16) max |Δ log-prob| {cmp_['plain_logprob_err']:.4f}, "
                     f"max |Δ top-k mass| {cmp_['plain_topk_mass_err']:.2e}; compact max |Δ log-prob| "
                     f"{cmp_['compact_logprob_err']:.4f}, max |Δ top-k mass| {cmp_['compact_topk_mass_err']:.2e}.")
    lines.append("Teacher: " + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in part["stats"].items()) + ".")
    codings = part["caches"]["compact"].get("class_codings")
    if codings:
        lines.append("Compact groups' class coding: " + ", ".join(f"{v} {k}" for k, v in sorted(codings.items())) + ".")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="synthetic images (split over --shards)")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--hard", action="store_true", help="also the hard synthetic teacher (~83 classes per image)")
    p.add_argument("--demo", default=None, help="a `kdcache demo` output folder (its data and trained teacher)")
    p.add_argument("--work", default=None, help="where the caches go (default: a temporary folder, removed)")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="kdcache-storage-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        res = {"synthetic": synthetic_caches(work, a.images, a.shards),
               "synthetic_mixup": synthetic_caches(work, a.images, a.shards, mixup=True)}
        if a.hard:
            res["hard"] = synthetic_caches(work, a.images, a.shards, teacher=HARD, label="hard")
        if a.demo:
            res["demo"] = demo_caches(work, Path(a.demo))
        text = [table(f"Synthetic teacher, C = 1000, V = 10, k = 10, {a.images} images in {a.shards} shards, no mixup:",
                      res["synthetic"]),
                "", table("The same with mixup:", res["synthetic_mixup"])]
        if "hard" in res:
            text += ["", table(f"Hard synthetic teacher (lower ranks vary across views), C = 1000, V = 10, k = 10, "
                               f"{a.images} images in {a.shards} shards, no mixup:", res["hard"])]
        if "demo" in res:
            text += ["", table("The demo's trained teacher (digits, C = 10, V = 8, k = 5, mixup):", res["demo"])]
        print("\n".join(text))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
        return res
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
