"""Looking inside a cache: summaries, one record, a rendered picture (``kdcache.tools.verify`` proves replay).

Everything here is read-only: the cache is opened with ``CacheReader`` (Zarr mode ``"r"``) and
nothing is ever written into it. A cache may be a local path or an fsspec URL.

- ``summarize``      manifest, per-shard table and totals (records, bytes, top-k mass, entropy, top-1).
- ``record_info``    one record: per view its box, flip, mixup partner and λ, and the teacher's top-k.
- ``render_record``  a PNG: source image with the crop box, the rendered (mixed) view, the top-k bars.
- ``relations``      the class-relation table (mean teacher distribution per true class, labels from
                     the data shards) as a heatmap, or the most confused class pairs for many classes.

Each returns a plain dict (JSON-ready, field names documented in ``docs/cli.md``); the
``format_*`` functions turn those dicts into the text the CLI prints.
"""

from __future__ import annotations

import difflib
import math
import os
from collections import Counter

import numpy as np

from ..errors import KdcacheError, count, size_text, writing
from ..cache.store import CacheReader

# Version of the JSON layout produced by summarize / record_info / verify. Bump on renames.
JSON_SCHEMA = 1

# Render figure: fixed size so the PNG is always FIG_WIDTH x FIG_HEIGHT pixels.
FIGSIZE = (12.0, 4.0)
DPI = 100
DISPLAY_SIZE = 256  # the rendered view is upscaled (nearest) to this many pixels for display


def open_unchecked(cache, storage_options: dict | None) -> CacheReader:
    """A reader that shows edited views instead of refusing them (``summarize`` flags them)."""
    return cache if isinstance(cache, CacheReader) else CacheReader(str(cache), storage_options, check_digests=False,
                                                                        check_values=False)


def _class_name(names: list[str] | None, c: int) -> str | None:
    if names is not None and 0 <= c < len(names):
        return names[c]
    return None


def json_float(x) -> float | None:
    """A JSON-safe float (None for NaN / infinity)."""
    x = float(x)
    return x if math.isfinite(x) else None


# ---- statistics of the sparse teacher distribution ---------------------------------------------


def topk_mass(logprobs: np.ndarray) -> np.ndarray:
    """Σ exp(l_i) over the last axis (float64); -inf entries contribute 0."""
    return np.exp(logprobs.astype(np.float64)).sum(-1)


def impossible_values(logprobs: np.ndarray, classes: np.ndarray, num_classes: int) -> dict[str, int]:
    """Records (of good samples, shaped (..., k)) whose stored values no teacher can have, by kind:
    a damaged or edited cache shows here. Float16 rounding is allowed for: the top-k mass may
    exceed 1 by k·2⁻¹¹ at most."""
    lp = logprobs.astype(np.float64).reshape(-1, logprobs.shape[-1])
    cls = classes.astype(np.int64).reshape(-1, classes.shape[-1])
    if not len(lp):
        return {}
    k = lp.shape[1]
    with np.errstate(invalid="ignore", over="ignore"):
        checks = {
            "log-prob that is NaN or +inf": np.isnan(lp).any(1) | np.isposinf(lp).any(1),
            "log-prob above 0 (a probability above 1)": (lp > 2.0**-10).any(1),
            "top-k probability mass above 1": np.exp(lp).sum(1) > 1.0 + k * 2.0**-11,
            "log-probs not in descending order": (np.diff(lp, axis=1) > 0).any(1),
            f"class id outside 0..{num_classes - 1}": ((cls < 0) | (cls >= num_classes)).any(1),
            "a class id twice in one record": np.array([len(set(r)) < k for r in cls.tolist()]),
        }
    return {what: int(m.sum()) for what, m in checks.items() if m.any()}


def impossible_draws(counts: np.ndarray, classes: np.ndarray, num_classes: int, samples: int) -> dict[str, int]:
    """Like ``impossible_values`` for sampled targets: records (of good samples) whose counts do not
    add up to the draws, or whose classes are out of range, repeated, or set in an unused slot."""
    cnt = counts.astype(np.int64).reshape(-1, counts.shape[-1])
    cls = classes.astype(np.int64).reshape(-1, classes.shape[-1])
    if not len(cnt):
        return {}
    used = cnt > 0
    checks = {
        f"counts that do not add up to the {samples} draws": cnt.sum(1) != samples,
        f"class id outside 0..{num_classes - 1}": (used & ((cls < 0) | (cls >= num_classes))).any(1),
        "a class id twice in one record": np.array([len(set(r[u].tolist())) < int(u.sum()) for r, u in zip(cls, used)]),
        "a class id in an unused slot (count 0)": (~used & (cls != -1)).any(1),
    }
    return {what: int(m.sum()) for what, m in checks.items() if m.any()}


def reconstructed_entropy(logprobs: np.ndarray, num_classes: int) -> np.ndarray:
    """Entropy (nats) of the teacher distribution rebuilt with the uniform tail (DESIGN §3).

    Top-k probs p_i = exp(l_i); tail mass m = max(0, 1 − Σ p_i) spread evenly over the C − k other
    classes: H = −Σ p_i log p_i − m·log(m / (C − k)), with 0·log 0 = 0 (and no tail term when k = C).
    """
    lp = logprobs.astype(np.float64)
    k = lp.shape[-1]
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        plogp = np.where(p > 0, p * lp, 0.0)
    h = -plogp.sum(-1)
    m = np.maximum(0.0, 1.0 - p.sum(-1))
    rest = num_classes - k
    if rest > 0:
        with np.errstate(divide="ignore", invalid="ignore"):
            tail = np.where(m > 0, m * np.log(m / rest), 0.0)
        h = h - tail
    return h


# ---- summary -----------------------------------------------------------------------------------


def _bytes_under(reader: CacheReader, name: str) -> int:
    """Bytes stored under one shard group (every chunk and metadata document), any store."""
    listed = reader.group_nbytes(name)  # sizes from a listing: no request per file
    if listed is not None:
        return listed
    group = reader.root[name]
    try:
        from zarr.core.sync import sync

        sp = group.store_path
        return int(sync(sp.store.getsize_prefix(sp.path)))
    except Exception:  # older zarr or a store without listing: arrays only
        return int(sum(group[a].nbytes_stored() for a in group.array_keys()))


def valid_records(keys: np.ndarray, size: np.ndarray, bad: dict) -> np.ndarray:
    """Records that hold teacher outputs: not listed as bad and with a real image size."""
    bad_keys = set(bad)
    return np.array([k not in bad_keys for k in keys], dtype=bool) & (size[:, 0] >= 0)


SUMMARY_TOP = 10  # the most frequent top-1 classes a summary lists
RELATIONS_TOP = 20  # the most confused class pairs relations() lists
RELATIONS_TAIL = "uniform"  # how relations() spreads each record's mass outside its top-k


def summarize(cache, storage_options: dict | None = None, top: int = SUMMARY_TOP) -> dict:
    """Manifest, per-shard table and totals over the complete shards (see docs/cli.md)."""
    reader = open_unchecked(cache, storage_options)
    man = reader.manifest
    C, V = reader.num_classes, reader.views
    names = reader.shard_names()
    present = set(names)
    listed = list(man.get("shards") or [])
    in_manifest = set(listed)
    order = listed + [s for s in names if s not in in_manifest]

    shards, bad_list = [], []
    n_samples = n_bad = n_records = total_bytes = total_raw = 0
    mass_sum = ent_sum = distinct_sum = 0.0
    sampled = reader.kind == "sample"
    top1 = Counter()
    complete_names, incomplete, missing, edited_views, impossible = [], [], [], [], []
    # the complete groups' data, read ahead on a remote cache (validates arrays, shapes and dtypes)
    attrs_of = {n: reader.shard_attrs(n) for n in order if n in present}
    bytes_of = {n: _bytes_under(reader, n) for n in attrs_of}  # from the listing, before reading drops its entries
    readable = [n for n in order if n in attrs_of and attrs_of[n].get("complete", False)]
    datas = reader.read_ahead(readable, reader.read_shard)
    for name in order:
        row = {"name": name, "status": "missing", "complete": False, "samples": None, "bad": None,
               "records": None, "bytes": 0, "raw_bytes": None, "source": None, "render": None}
        if name not in present:
            missing.append(name)
            shards.append(row)
            continue
        attrs = attrs_of[name]
        row["source"] = attrs.get("source")
        row["render"] = attrs.get("render")
        row["samples"] = int(attrs["num_samples"]) if "num_samples" in attrs else None
        row["bytes"] = bytes_of[name]
        if not attrs.get("complete", False):
            row["status"] = "incomplete"
            incomplete.append(name)
            shards.append(row)
            continue
        data = next(datas)
        edited = reader.digest_problems(name, data)
        if edited:
            edited_views.append({"shard": name, "views": edited})
        bad = dict(attrs.get("bad") or {})
        valid = valid_records(data["keys"], data["size"], bad)
        lp = data["logprobs"][valid]  # (n, V, k)
        cls = data["classes"][valid]
        recs = int(valid.sum()) * V
        row.update(status="complete", complete=True, bad=len(bad), records=recs, raw_bytes=reader.nbytes_raw(name))
        for key, why in sorted(bad.items()):
            bad_list.append({"shard": name, "key": key, "reason": why})
        complete_names.append(name)
        n_samples += len(data["keys"])
        n_bad += len(bad)
        n_records += recs
        total_bytes += row["bytes"]
        total_raw += row["raw_bytes"]
        found = (impossible_draws(data["counts"][valid], cls, C, reader.samples) if sampled
                 else impossible_values(lp, cls, C))
        for what, n in found.items():
            impossible.append({"shard": name, "what": what, "records": n})
        if recs and sampled:
            distinct_sum += float((data["counts"][valid] > 0).sum())
            top1.update(np.asarray(cls[..., 0]).ravel().tolist())
        elif recs:
            mass_sum += float(topk_mass(lp).sum())
            ent_sum += float(reconstructed_entropy(lp, C).sum())
            top1.update(np.asarray(cls[..., 0]).ravel().tolist())
        shards.append(row)

    most = sorted(top1.items(), key=lambda t: (-t[1], t[0]))[: max(0, top)]
    sums = dict(samples=n_samples, bad=n_bad, records=n_records, bytes=total_bytes, raw=total_raw, mass=mass_sum,
                entropy=ent_sum, distinct=distinct_sum)
    return summary_report(reader, order, shards, bad_list, complete_names, incomplete, missing, edited_views,
                          impossible, sums, most)


def summary_report(reader: CacheReader, order, shards, bad_list, complete_names, incomplete, missing, edited_views,
                   impossible, sums: dict, most) -> dict:
    """``summarize``'s report (docs/cli.md, ``inspect --json``) from its per-shard rows and sums."""
    man, names, C, n_records = reader.manifest, reader.class_names, reader.num_classes, sums["records"]
    sampled = reader.kind == "sample"
    totals = {
        "complete_only": True,
        "shards_total": len(order),
        "shards_complete": len(complete_names),
        "shards_incomplete": incomplete,
        "shards_missing": missing,
        "samples": sums["samples"],
        "bad_samples": sums["bad"],
        "records": n_records,
        "bytes": sums["bytes"],
        "raw_bytes": sums["raw"],
        "bytes_per_record": sums["bytes"] / n_records if n_records else None,
        "compression_ratio": sums["raw"] / sums["bytes"] if sums["bytes"] else None,
        "mean_topk_mass": sums["mass"] / n_records if n_records and not sampled else None,
        "mean_entropy": sums["entropy"] / n_records if n_records and not sampled else None,
        "mean_distinct_classes": sums["distinct"] / n_records if n_records and sampled else None,
        "max_entropy": math.log(C),
        "top1": [
            {"class": int(c), "name": _class_name(names, int(c)), "count": int(n), "fraction": n / n_records}
            for c, n in most
        ],
        "edited": edited_views,
        "impossible": impossible,
    }
    return {
        "schema": JSON_SCHEMA,
        "cache": reader.path,
        "format_version": man.get("format_version"),
        "kdcache_version": man.get("kdcache_version"),
        "teacher": man.get("teacher"),
        "members": teacher_members(man),
        "num_classes": C,
        "class_names": names,
        "views": reader.views,
        "topk": reader.topk,
        "targets": man.get("targets") or {"kind": "topk"},
        "encoding": man.get("encoding") or {"layout": "plain"},
        "seed": man.get("seed"),
        "augmentation": man.get("augmentation"),
        "resolution": man.get("resolution"),
        "render": man.get("render"),
        "shards": shards,
        "bad": bad_list,
        "totals": totals,
    }


# ---- one record --------------------------------------------------------------------------------


def _find_record(reader: CacheReader, shard: str, key: str) -> tuple[dict, int]:
    if not reader.has_shard(shard):
        have = reader.shard_names()
        raise KdcacheError(
            f"cache {reader.path} has no shard {shard!r} (it has {len(have)}: {', '.join(have[:5])}"
            f"{' ...' if len(have) > 5 else ''})"
        )
    data = reader.read_shard(shard)
    hits = np.flatnonzero(data["keys"] == key)
    if not len(hits):
        close = difflib.get_close_matches(key, data["keys"].tolist(), n=5)
        raise KdcacheError(
            f"shard {shard!r} of cache {reader.path} has no key {key!r} ({_count(len(data['keys']), 'key')}"
            + (f"; close ones: {', '.join(close)}" if close else "")
            + f"). List them with `kdcache inspect {reader.path} --keys --shard {shard}`")
    return data, int(hits[0])


def list_keys(cache, shard: str | None = None, storage_options: dict | None = None) -> dict[str, list[str]]:
    """The sample keys of one complete shard group (or of every one), in tar order."""
    reader = open_unchecked(cache, storage_options)
    names = [shard] if shard is not None else [n for n in reader.shard_names() if reader.is_complete(n)]
    if shard is not None and not reader.has_shard(shard):
        _find_record(reader, shard, "")  # raises the "no shard" error with the shards there are
    return {n: reader.keys(n).tolist() for n in names}


def find_key(cache, key: str, storage_options: dict | None = None) -> str:
    """The shard group that holds ``key`` (keys are unique within a shard, not across shards)."""
    found = list_keys(cache, storage_options=storage_options)
    holders = [n for n, keys in found.items() if key in keys]
    if len(holders) == 1:
        return holders[0]
    if holders:
        raise KdcacheError(f"key {key!r} is in {len(holders)} shard groups ({', '.join(holders[:5])}); "
                           "name one with --shard")
    close = difflib.get_close_matches(key, [k for keys in found.values() for k in keys], n=5)
    raise KdcacheError(f"no shard group of the cache holds key {key!r}"
                       + (f"; close ones: {', '.join(close)}" if close else "")
                       + ". List the keys with `kdcache inspect CACHE --keys [--shard SHARD]`")


def _count(n: int, noun: str) -> str:
    """'1 key', '3 keys'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _check_view(reader: CacheReader, view: int | None) -> None:
    if view is not None and not 0 <= view < reader.views:
        raise KdcacheError(f"view {view} is out of range; cache {reader.path} holds views 0..{reader.views - 1}")


def _topk_entries(lp: np.ndarray, cls: np.ndarray, names, counts=None) -> list[dict]:
    """Top-k entries; for sampled targets (``counts``) the used slots, ``prob`` being the weight count / N."""
    if counts is not None:
        return [{"class": int(c), "name": _class_name(names, int(c)), "count": int(n), "logprob": json_float(l),
                 "prob": float(np.exp(np.float64(l)))} for l, c, n in zip(lp, cls, counts) if n > 0]
    return [
        {"class": int(c), "name": _class_name(names, int(c)), "logprob": json_float(l), "prob": float(np.exp(np.float64(l)))}
        for l, c in zip(lp, cls)
    ]


def record_info(cache, shard: str, key: str, view: int | None = None, storage_options: dict | None = None) -> dict:
    """One record of one shard: geometry and teacher top-k per view (all views unless ``view``)."""
    reader = open_unchecked(cache, storage_options)
    _check_view(reader, view)
    data, i = _find_record(reader, shard, key)
    bad = dict(reader.shard_attrs(shard).get("bad") or {})
    names, C = reader.class_names, reader.num_classes
    keys = data["keys"]
    views = []
    for v in range(reader.views) if view is None else [view]:
        lp, cls = data["logprobs"][i, v], data["classes"][i, v]
        j = int(data["mix_with"][i, v])
        x, y, w, h = (int(t) for t in data["box"][i, v])
        entry = {
            "view": v,
            "box": {"x": x, "y": y, "w": w, "h": h},
            "flip": bool(data["flip"][i, v]),
            "mixed": j >= 0,
            "mix_with": j,
            "mix_key": str(keys[j]) if 0 <= j < len(keys) else None,
            "mix_lam": float(data["mix_lam"][i, v]),
            "topk": _topk_entries(lp, cls, names, data["counts"][i, v] if "counts" in data else None),
            "topk_mass": None,
            "tail_mass": None,
            "entropy": None,
        }
        if key not in bad and "counts" not in data:
            mass = float(topk_mass(lp))
            entry.update(topk_mass=mass, tail_mass=max(0.0, 1.0 - mass),
                         entropy=float(reconstructed_entropy(lp[None], C)[0]))
        views.append(entry)
    return {
        "schema": JSON_SCHEMA,
        "cache": reader.path,
        "shard": shard,
        "key": key,
        "index": i,
        "size": {"height": int(data["size"][i, 0]), "width": int(data["size"][i, 1])},
        "bad": bad.get(key),
        "num_classes": C,
        "resolution": int(reader.manifest["resolution"]),
        "targets": reader.manifest.get("targets") or {"kind": "topk"},
        "views": views,
    }


# ---- render ------------------------------------------------------------------------------------


def shard_urls(data) -> dict[str, str]:
    from ..data.shards import expand_urls, shard_name

    return {shard_name(u): u for u in expand_urls(data)}


def load_images(url: str, want: set[str], renderer=None) -> dict:
    """Stream one data shard once; decode only the samples whose key is in ``want``.

    Returns key → decoded image (``renderer``'s, default a PIL image), or key → the
    ``BadImageError`` message when it does not decode.
    """
    from ..errors import BadImageError
    from ..data.shards import decode_image, iter_samples

    out = {}
    if not want:
        return out
    stream = iter_samples(url)
    try:
        for sample in stream:
            if sample.key in want:
                try:
                    out[sample.key] = decode_image(sample, renderer)
                except BadImageError as e:
                    out[sample.key] = str(e)
                if len(out) == len(want):
                    break
    finally:
        stream.close()
    return out


def _draw_targets(ax, info: dict, v: dict) -> None:
    """The record's targets as bars: the teacher's top-k and the rest as one grey bar (or the draws)."""
    labels = [t["name"] or str(t["class"]) for t in v["topk"]]
    probs = [t["prob"] for t in v["topk"]]
    if info["num_classes"] > len(probs):
        labels.append(count(info["num_classes"] - len(probs), "other"))
        probs.append(v["tail_mass"] or 0.0)
    ypos = np.arange(len(probs))
    colors = ["tab:blue"] * len(v["topk"]) + ["tab:gray"] * (len(probs) - len(v["topk"]))
    ax.barh(ypos, probs, color=colors)
    ax.set_yticks(ypos, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    if v["topk_mass"] is None:  # sampled targets: the weights count / N
        ax.set_xlabel("target weight (draws / N)")
        ax.set_title(f"teacher sampled: {len(v['topk'])} classes drawn", fontsize=9)
    else:
        ax.set_xlabel("teacher probability")
        ax.set_title(f"teacher top-{len(v['topk'])} (mass {v['topk_mass']:.3f})", fontsize=9)


def render_record(
    cache, shard: str, key: str, data, out: str, view: int = 0, storage_options: dict | None = None
) -> dict:
    """Write a PNG (FIGSIZE at DPI: 1200x400 px) showing one record's view: the source image with the
    crop box, the partner image with its box (when mixed), the rendered view, and the top-k bars.

    Returns the record's ``record_info`` for that view plus ``png`` and ``warnings``.
    """
    import torch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from PIL import Image

    from ..data.views import ShardViews, View
    from ..data.render import crop_batch
    from ..data.render import image_hw, render_mismatch, renderer_for

    reader = open_unchecked(cache, storage_options)
    renderer = renderer_for(reader.manifest.get("render"))  # the backend that made the cache
    info = record_info(reader, shard, key, view, storage_options)
    if info["bad"] is not None:
        raise KdcacheError(f"record {key!r} of shard {shard!r} is a bad image ({info['bad']}); there is no view to render")
    urls = shard_urls(data)
    if shard not in urls:
        raise KdcacheError(f"the data pattern {data!r} has no shard named {shard!r} (found {count(len(urls), 'shard')})")
    v = info["views"][0]
    want = {key} | ({v["mix_key"]} if v["mixed"] else set())
    images = load_images(urls[shard], want, renderer)
    warnings = []
    for kk in sorted(want):
        if kk not in images:
            raise KdcacheError(f"data shard {urls[shard]} has no sample {kk!r}; the data differ from the cache's")
        if isinstance(images[kk], str):
            raise KdcacheError(images[kk])
    sd = reader.read_shard(shard)
    views = ShardViews(sd["box"], sd["flip"], sd["mix_with"], sd["mix_lam"])

    for kk, i in [(key, info["index"])] + ([(v["mix_key"], v["mix_with"])] if v["mixed"] else []):
        h, w = (int(t) for t in sd["size"][i])
        ih, iw = image_hw(images[kk])
        if (ih, iw) != (h, w):
            warnings.append(f"image {kk!r} is {size_text(iw, ih)} in the data but {size_text(w, h)} in the cache")

    mismatch = render_mismatch(reader.manifest.get("render"))
    if mismatch:
        warnings.append(mismatch)
    res = info["resolution"]
    own_view = views.view(info["index"], view)
    partner = images[v["mix_key"]] if v["mixed"] else None
    pview = views.view(v["mix_with"], view) if v["mixed"] else None
    by_row = {info["index"]: images[key]} | ({v["mix_with"]: partner} if v["mixed"] else {})
    pix = crop_batch([(by_row, views, info["index"], view)], res, renderer).pixels("cpu")[0]
    arr = (pix.permute(1, 2, 0).clamp(0, 1).mul(255).round().to(torch.uint8)).numpy()
    shown = Image.fromarray(arr).resize((DISPLAY_SIZE, DISPLAY_SIZE), Image.Resampling.NEAREST)

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [1, 1, 1, 1.3]})

    def draw_source(ax, im, vw: View, title):
        ax.imshow(im if isinstance(im, Image.Image) else im.permute(1, 2, 0).cpu().numpy())
        ax.add_patch(Rectangle((vw.x - 0.5, vw.y - 0.5), vw.w, vw.h, fill=False, edgecolor="red", linewidth=2))
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])

    draw_source(axes[0], images[key], own_view,
                f"{key}  ({size_text(image_hw(images[key])[1], image_hw(images[key])[0])})\nbox x,y,w,h {own_view.box}" + (" flip" if own_view.flip else ""))
    if v["mixed"]:
        draw_source(axes[1], partner, pview,
                    f"partner {v['mix_key']} (#{v['mix_with']})\nbox x,y,w,h {pview.box}" + (" flip" if pview.flip else ""))
    else:
        axes[1].axis("off")
        axes[1].text(0.5, 0.5, "not mixed", ha="center", va="center", transform=axes[1].transAxes)
    axes[2].imshow(shown)
    axes[2].set_xticks([])
    axes[2].set_yticks([])
    axes[2].set_title(f"view {view} at {res}px" + (f", mixed λ={v['mix_lam']:.3f}" if v["mixed"] else ""), fontsize=9)

    _draw_targets(axes[3], info, v)
    fig.suptitle(f"{shard} / {key} / view {view}", fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.14, top=0.82, wspace=0.35)
    with writing(out, "--render"):
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.lexists(folder):  # a missing folder is made; a file in the way is named by savefig
            os.makedirs(folder)
        fig.savefig(out, dpi=DPI, format="png")
    result = dict(info)
    result.update(png=str(out), warnings=warnings, width=int(FIGSIZE[0] * DPI), height=int(FIGSIZE[1] * DPI))
    return result


# ---- class relations ---------------------------------------------------------------------------

HEATMAP_MAX_CLASSES = 100  # beyond this many classes the picture is the ranked table of confused pairs


def related_order(relations: np.ndarray, entries: np.ndarray) -> tuple[list[int], str]:
    """An order of the classes that puts related ones side by side, and how it was found.

    Similarity of two classes = the teacher's mean probability of each on the other's records,
    averaged over both directions (the diagonal left out). With scipy: average-linkage clustering
    on distance = max similarity − similarity, leaves in optimal order. Without: a greedy chain that
    starts at the most confused pair and always appends the unplaced class most confused with
    the chain's last one. Classes without records go last, in index order."""
    C = len(relations)
    seen = [c for c in range(C) if entries[c] > 0]
    unseen = [c for c in range(C) if entries[c] == 0]
    if len(seen) < 3:
        return seen + unseen, "index"
    sim = (relations + relations.T)[np.ix_(seen, seen)] / 2
    np.fill_diagonal(sim, 0.0)
    try:
        from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
        from scipy.spatial.distance import squareform
    except ImportError:
        rest = set(range(len(seen)))
        a, b = np.unravel_index(np.argmax(sim), sim.shape)
        chain = [int(a), int(b)]
        rest -= set(chain)
        while rest:
            nxt = max(sorted(rest), key=lambda j: sim[chain[-1], j])
            chain.append(nxt)
            rest.remove(nxt)
        return [seen[i] for i in chain] + unseen, "greedy chain (scipy not installed)"
    dist = sim.max() - sim
    np.fill_diagonal(dist, 0.0)
    condensed = squareform(dist, checks=False)
    tree = optimal_leaf_ordering(linkage(condensed, method="average"), condensed)
    return [seen[int(i)] for i in leaves_list(tree)] + unseen, "average-linkage clustering, optimal leaf order (scipy)"


def relations(cache, data, out: str | None = None, tail: str = RELATIONS_TAIL, top: int = RELATIONS_TOP,
              storage_options: dict | None = None) -> dict:
    """The class-relation table of a cache over the data shards ``data`` (their ``cls`` labels), the
    numbers ``train --kd-signal relations`` trains on (``signals.cache_stats``), and a PNG at ``out``:
    the table as a heatmap with related classes side by side (C <= HEATMAP_MAX_CLASSES), else the
    ``top`` most confused class pairs as a ranked bar table."""
    from ..data.shards import expand_urls, load_class_names
    from ..learn.signals import cache_stats, relations_summary

    reader = open_unchecked(cache, storage_options)
    urls = expand_urls(data)
    if reader.kind == "sample" and tail != "uniform":
        raise KdcacheError(f"--tail does not apply to cache {reader.path}: it holds sampled targets, taken as they are")
    stats = cache_stats(reader, urls, "sampled" if reader.kind == "sample" else tail, what="--relations")
    names = reader.class_names or load_class_names(urls)
    out_d = relations_summary(stats, names, top)
    order, how = related_order(stats.relations, stats.class_entries)
    out_d.update(schema=JSON_SCHEMA, cache=reader.path, order=order, order_method=how,
                 layout="heatmap" if stats.num_classes <= HEATMAP_MAX_CLASSES else "pairs",
                 relations=stats.relations.tolist() if stats.num_classes <= HEATMAP_MAX_CLASSES else None, png=None)
    if out is not None:
        (_draw_heatmap if out_d["layout"] == "heatmap" else _draw_pairs)(out_d, stats.relations, out)
        out_d["png"] = str(out)
    return out_d


def _class_label(d: dict, c: int) -> str:
    names = d["class_names"]
    return str(names[c]) if names is not None and c < len(names) else str(c)


def _draw_heatmap(d: dict, table: np.ndarray, out: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    order = d["order"]
    C = len(order)
    m = table[np.ix_(order, order)]
    side = min(14.0, max(6.0, 0.32 * C + 3.0))
    fig = Figure(figsize=(side + 1.5, side), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    floor = max(float(m[m > 0].min()) if (m > 0).any() else 1e-6, 1e-6)
    im = ax.imshow(np.maximum(m, floor), cmap="viridis", norm=LogNorm(vmin=floor, vmax=1.0), interpolation="nearest")
    labels = [_class_label(d, c) for c in order]
    fs = 9 if C <= 20 else (7 if C <= 50 else 5)
    ax.set_xticks(range(C), labels, rotation=90, fontsize=fs)
    ax.set_yticks(range(C), [f"{lab} ({d['class_entries'][c]})" for lab, c in zip(labels, order)], fontsize=fs)
    if C <= 20:  # the values themselves, in percent
        for i in range(C):
            for j in range(C):
                v = 100 * m[i, j]
                ax.text(j, i, f"{v:.0f}" if v >= 9.5 else (f"{v:.1f}" if v >= 0.05 else "0"), ha="center",
                        va="center", fontsize=7, color="black" if m[i, j] > 0.1 else "white")
    ax.set_xlabel("class the teacher gives probability to")
    ax.set_ylabel("true class of the records (views averaged in the row)")
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label("mean teacher probability (log scale)")
    ax.set_title(f"Class relations: the teacher's mean distribution per true class"
                 + (" (cells in %)" if C <= 20 else "") + "\n"
                 f"ε = {d['epsilon']:.3f} off the true class, {d['entries']} views of {d['images']} images\n"
                 f"classes ordered by {d['order_method'].split(',')[0].split(' (')[0]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI, format="png")


def _draw_pairs(d: dict, table: np.ndarray, out: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pairs = d["confused_pairs"]
    n = max(1, len(pairs))
    fig = Figure(figsize=(10, 1.5 + 0.32 * n), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(pairs))
    ax.barh(y, [100 * p["p_b_on_a"] for p in pairs], color="tab:blue", label="p(b) on records of a")
    ax.barh(y, [100 * p["p_a_on_b"] for p in pairs], left=[100 * p["p_b_on_a"] for p in pairs], color="tab:orange",
            label="p(a) on records of b")
    ax.set_yticks(y, [f"{i + 1}. {p['a_name']}  ↔  {p['b_name']}" for i, p in enumerate(pairs)], fontsize=8)
    ax.invert_yaxis()
    for i, p in enumerate(pairs):
        ax.text(100 * (p["p_b_on_a"] + p["p_a_on_b"]), i, f"  mean {100 * p['mean']:.2f} %", va="center", fontsize=7)
    ax.set_xlim(0, 1.3 * max([200 * p["mean"] for p in pairs] + [1e-9]))
    ax.set_xlabel("mean teacher probability (%), both directions stacked")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"The {len(pairs)} most confused class pairs of {d['num_classes']} classes (too many for a heatmap)\n"
                 f"{d['entries']} views of {d['images']} images, ε = {d['epsilon']:.3f} off the true class",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI, format="png")


def format_relations(d: dict) -> str:
    """The text ``kdcache inspect CACHE --relations`` prints."""
    lines = [f"class relations of {d['cache']}: {d['entries']} views of {d['images']} images, "
             f"{d['num_classes']} classes, tail {d['tail']}",
             f"epsilon (mean teacher probability off the true class): {d['epsilon']:.4f}",
             f"class order ({d['order_method']}): {' '.join(_class_label(d, c) for c in d['order'])}"
             if d["layout"] == "heatmap" else f"{d['num_classes']} classes: the most confused pairs instead of a heatmap",
             "", "rank  class a  class b  p(b) on a  p(a) on b  mean"]
    for i, p in enumerate(d["confused_pairs"]):
        lines.append(f"{i + 1:>4}  {p['a_name']:>7}  {p['b_name']:>7}  {p['p_b_on_a']:9.4f}  {p['p_a_on_b']:9.4f}  "
                     f"{p['mean']:.4f}")
    if d["png"]:
        lines += ["", f"wrote {d['png']} ({'heatmap' if d['layout'] == 'heatmap' else 'ranked confused pairs'})"]
    return "\n".join(lines)


# ---- text --------------------------------------------------------------------------------------


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def teacher_members(man: dict) -> list[dict] | None:
    """The manifest's teacher as a list of members, each with its resolution (one for a single teacher)."""
    from ..cache.store import members_of

    t = man.get("teacher")
    return members_of(t, man.get("resolution")) if isinstance(t, dict) else None


def _teacher_lines(s: dict) -> list[str]:
    """The summary's teacher: one teacher in two lines, an ensemble as its averaging and one line per member."""
    t = s["teacher"] or {}

    def weights(m):
        sha = m.get("weights_sha256")
        return f"weights {m.get('weights') or '-'}  sha256 {sha[:16] + '…' if sha else '-'}"

    if "members" not in t:
        return [f"teacher       {t.get('spec')}  {weights(t)}",
                f"              {s['num_classes']} classes, mean {t.get('mean')}, std {t.get('std')}"]
    members = s.get("members") or []
    lines = [f"teacher       ensemble of {len(members)} ({t.get('ensemble')}: the mean of the members' probabilities), "
             f"{s['num_classes']} classes"]
    for n, m in enumerate(members, 1):
        lines.append(f"  member {n}    {m.get('spec')}  {weights(m)}")
        lines.append(f"              resolution {m.get('resolution')}, mean {m.get('mean')}, std {m.get('std')}")
    return lines


def _resolution_text(s: dict) -> str:
    members = s.get("members") or []
    if len(members) > 1:
        return "teacher resolutions " + ", ".join(str(m.get("resolution")) for m in members)
    return f"teacher resolution {s['resolution']}"


def format_summary(s: dict, max_shards: int = 50) -> str:
    from ..data.render import render_text

    aug = s["augmentation"] or {}
    rd = s["render"] or {}
    tot = s["totals"]
    lines = [
        f"cache         {s['cache']}  (format {s['format_version']}, written by kdcache {s['kdcache_version']})",
        *_teacher_lines(s),
        f"views V       {s['views']}    {_targets_text(s)}    seed {s['seed']}    {_resolution_text(s)}",
        f"layout        {_layout_text(s['encoding'])}",
        f"augmentation  {aug.get('name')} v{aug.get('version')}  scale {aug.get('scale')}  ratio "
        f"{[round(x, 4) for x in aug.get('ratio', [])]}  flip {aug.get('flip')}  mixup {aug.get('mixup')}",
        f"render        {render_text(rd)}",
        "",
        f"{'shard':24s} {'status':10s} {'samples':>8s} {'bad':>5s} {'bytes':>12s}",
    ]
    for row in s["shards"][:max_shards]:
        lines.append(
            f"{row['name']:24s} {row['status']:10s} {'-' if row['samples'] is None else row['samples']:>8} "
            f"{'-' if row['bad'] is None else row['bad']:>5} {_fmt_bytes(row['bytes']):>12s}"
        )
    if len(s["shards"]) > max_shards:
        lines.append(f"... {len(s['shards']) - max_shards} more shards (use --json for all)")
    lines.append("")
    skipped = len(tot["shards_incomplete"]) + len(tot["shards_missing"])
    lines.append(
        f"totals over the {tot['shards_complete']} complete shards of {tot['shards_total']}"
        + (f" ({len(tot['shards_incomplete'])} incomplete, {len(tot['shards_missing'])} missing: not counted)" if skipped else "")
    )
    lines.append(f"  samples {tot['samples']}, bad {tot['bad_samples']}, records {tot['records']} "
                 f"(good samples x {s['views']} views)")
    if tot["records"]:
        lines.append(f"  bytes on disk {_fmt_bytes(tot['bytes'])} ({tot['bytes_per_record']:.1f} per record), raw arrays "
                     f"{_fmt_bytes(tot['raw_bytes'])}, compression ratio {tot['compression_ratio']:.2f}x")
        if tot.get("mean_distinct_classes") is not None:
            lines.append(f"  mean distinct classes per record {tot['mean_distinct_classes']:.2f} of "
                         f"{s['targets']['samples']} draws")
        else:
            lines.append(f"  mean top-{s['topk']} probability mass {tot['mean_topk_mass']:.4f}; mean entropy of the "
                         f"reconstructed teacher {tot['mean_entropy']:.4f} nats (max log C = {tot['max_entropy']:.4f})")
        tops = ", ".join(
            f"{e['name'] + ' ' if e['name'] else ''}[{e['class']}] {e['count']} ({100 * e['fraction']:.1f}%)"
            for e in tot["top1"]
        )
        lines.append(f"  most frequent teacher top-1: {tops}")
    for e in tot.get("edited", []):
        lines.append(f"WARNING: shard {e['shard']} views {e['views']} no longer match the digest precompute recorded "
                     "(edited or damaged after precompute); train and verify refuse them")
    for e in tot.get("impossible", []):
        lines.append(f"WARNING: shard {e['shard']}: {count(e['records'], 'record')} with {e['what']}: values no "
                     "teacher can produce (a damaged or edited cache)")
    if s["bad"]:
        lines.append(f"bad records ({len(s['bad'])}):")
        for b in s["bad"][:20]:
            lines.append(f"  {b['shard']} {b['key']}: {b['reason']}")
        if len(s["bad"]) > 20:
            lines.append(f"  ... {len(s['bad']) - 20} more (use --json for all)")
    return "\n".join(lines)


def _targets_text(s: dict) -> str:
    t = s.get("targets") or {"kind": "topk"}
    if t.get("kind") == "sample":
        return f"sampled targets: {t['samples']} draws per record at temperature {t['temperature']:g}"
    return f"top-k {s['topk']}"


def _layout_text(e: dict | None) -> str:
    e = e or {"layout": "plain"}
    if e.get("layout") != "compact":
        return "plain (every array stored as it is)"
    parts = ["class ids against per-image class lists", "views re-derived from the seed"]
    if "logprob_step" in e:
        parts.insert(0, f"log-probs quantised to {e['logprob_step']:g} nat, top-k mass kept")
    return "compact (" + "; ".join(parts) + ")"


def format_record(r: dict) -> str:
    lines = [f"{r['shard']} / {r['key']}  (row {r['index']}, image {size_text(r['size']['width'], r['size']['height'])})"]
    if r["bad"] is not None:
        lines.append(f"  bad image, no teacher outputs: {r['bad']}")
    for v in r["views"]:
        b = v["box"]
        mix = (f"mixed with #{v['mix_with']} {v['mix_key']} (own weight λ={v['mix_lam']:.4f})" if v["mixed"]
               else "not mixed")
        lines.append(f"view {v['view']}: box x={b['x']} y={b['y']} w={b['w']} h={b['h']}, flip {v['flip']}, {mix}")
        if r["bad"] is None and (r.get("targets") or {}).get("kind") == "sample":
            n = r["targets"]["samples"]
            for t in v["topk"]:
                nm = f" {t['name']}" if t["name"] else ""
                lines.append(f"    class {t['class']:>5}{nm:16s}  drawn {t['count']:>3}/{n}  weight {t['prob']:.4f}")
        elif r["bad"] is None:
            for t in v["topk"]:
                nm = f" {t['name']}" if t["name"] else ""
                lines.append(f"    class {t['class']:>5}{nm:16s}  p={t['prob']:.4f}  log p={t['logprob']:.4f}")
            lines.append(f"    top-k mass {v['topk_mass']:.4f}, tail {v['tail_mass']:.4f}, entropy {v['entropy']:.4f} nats")
    return "\n".join(lines)
