"""Proving that a cache replays exactly (`kdcache verify`). Read-only.

Read top to bottom; each phase is one function:

1. ``identity``   the teacher's spec and weights hash, the render backend (PIL flavour; the torch
                  backend's device type and torchvision) and the device and precision the
                  teacher ran with, against the manifest. The picks are rendered with the
                  cache's backend (``render.renderer_for``); a group rendered with another backend
                  than the manifest's is a problem.
2. ``coverage``   the cache's shard groups against the data's shards. A group the manifest lists but
                  the store lacks, an incomplete group, or a data shard the cache never covered is a
                  problem: training on that data would stop there.
3. ``sample``     ``samples`` (shard, record, view) picks, uniform over the usable records of the
                  complete groups that are in the data.
4. ``check_shard`` per sampled shard: stream the data shard once and decode what the picks need
                  (their images, their mixup partners, and the other records of their teacher
                  batches); check keys and image sizes; check the stored geometry against the seeded
                  sampler; re-run the teacher on each pick's batch *as precompute composed it*
                  (``precompute.teacher_batches`` with the cache's batch size, rendered by
                  ``precompute.render_batch``, run by ``teacher.batch_topk``) and compare the top-k
                  log-probs and the tail mass; for sampled targets (``precompute --targets sample``)
                  re-draw each pick's classes from the re-run distribution with the same seed
                  (``targets.check_draws``) and compare the counts.

Because the batches are the ones precompute ran, the same device type and the same render backend
give back the stored float16 values exactly; the default tolerance allows one float16 step plus a
float32 summation-order margin (a machine with other CPU kernels or thread counts), nothing more.
Format-1 caches did not record the batch size; their picks run in batches of ``--batch-size``.
A compact cache's log-probs are quantised (``encoding.LOGPROB_STEP``): each may differ from the
re-run by that step more, its top-k mass (and so the tail) may not.

``verify`` returns a plain dict (fields in docs/cli.md); ``format_verify`` is the CLI's text.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import KdcacheError, size_text
from .inspection import JSON_SCHEMA, json_float, open_unchecked, valid_records, load_images, shard_urls
from ..cache.agreement import compare_record
from ..cache.store import CacheReader
from .config import VerifyConfig


@dataclass
class Pick:
    shard: str
    index: int
    view: int


@dataclass
class Tally:
    """Counters over the picks (and their mixup partners), reported in the result."""

    keys_checked: int = 0
    keys_found: int = 0
    sizes_match: int = 0
    geometry_checked: int = 0
    geometry_match: int = 0
    compared: int = 0
    top1_exact: int = 0
    topk_exact: int = 0
    max_delta: float = 0.0
    max_tail_delta: float = 0.0
    draws_exact: int = 0  # sampled targets: records whose re-draw gives the stored counts exactly
    max_cdf_gap: float = 0.0  # sampled targets: how far a stored draw lies outside its class's interval
    exact_batches: int = 0
    failures: dict = field(default_factory=dict)

    def fail(self, p: Pick, key: str, reason: str) -> None:
        entry = self.failures.setdefault(
            (p.shard, p.index, p.view), {"shard": p.shard, "key": key, "index": p.index, "view": p.view, "reasons": []})
        entry["reasons"].append(reason)


# ---- 1. identity -------------------------------------------------------------------------------


def identity(manifest: dict, teacher, teacher_weights, device_type: str,
             allow_teacher_mismatch: bool) -> tuple[dict, list[str], list[str]]:
    """The identity checks. Returns (report fields, problems, warnings). ``teacher`` and
    ``teacher_weights`` are one spec and file, or one per member of an ensemble cache, in order."""
    from ..data.render import render_mismatch, renderer_for

    problems, warnings = [], []
    checks = []
    members = cache_members(manifest)
    for n, (m, spec, weights) in enumerate(zip(members, *given_members(manifest, teacher, teacher_weights)), 1):
        who = f"teacher {n} " if len(members) > 1 else "teacher "
        check = member_identity(m, spec, weights)
        for ok, what in ((check["spec_matches"], f"{who}spec {spec!r} differs from the cache's {m.get('spec')!r}"),
                         (check["weights_match"], f"{who}weights sha256 {check['weights_sha256']} differs from the "
                                                  f"cache's {m.get('weights_sha256')}")):
            if not ok:
                (warnings if allow_teacher_mismatch else problems).append(what)
        checks.append(check)
    if len(checks) == 1:
        teacher_report = checks[0]
    else:
        teacher_report = {"members": checks, "spec_matches": all(c["spec_matches"] for c in checks),
                          "weights_match": all(c["weights_match"] for c in checks)}
    there = manifest.get("render") or {}
    renderer = renderer_for(there)  # the cache's backend; an unknown one is an error
    here = renderer.describe()
    mismatch = render_mismatch(there, renderer)
    render_ok = mismatch is None
    if not render_ok and renderer.backend == "pil":
        warnings.append(
            f"this machine renders with {here.get('pil')} {here.get('pil_version')} ({here.get('resample')}), the cache "
            f"was made with {there.get('pil')} {there.get('pil_version')} ({there.get('resample')}); "
            "resampling may differ slightly")
    elif not render_ok:
        warnings.append(mismatch)
    compute = manifest.get("compute") or {}
    if compute.get("device") and compute["device"] != device_type:
        warnings.append(
            f"the teacher ran on {compute['device']} ({compute.get('precision')}) for this cache and runs on "
            f"{device_type} here; other kernels and precision can move log-probs beyond the tolerance. "
            f"Verify on a {compute['device']} device (--device), or widen --atol")
    report = {
        "teacher": teacher_report,
        "render": {"here": here, "cache": there, "matches": render_ok},
    }
    return report, problems, warnings


def cache_members(manifest: dict) -> list[dict]:
    """The cache's teachers: one member entry each (with its resolution)."""
    from ..cache.store import members_of

    return members_of(manifest["teacher"], int(manifest["resolution"]))


def given_members(manifest: dict, teacher, teacher_weights) -> tuple[list, list]:
    """The specs and weights files given to verify, one per member of the cache's teacher (refused
    when their counts differ from the cache's members)."""
    from ..models.ensemble import per_member

    members = cache_members(manifest)
    specs = per_member(teacher, None, "--teacher", None)
    if len(specs) != len(members):
        raise KdcacheError(
            f"the cache's teacher has {len(members)} member(s) ({', '.join(str(m.get('spec')) for m in members)}) and "
            f"{len(specs)} --teacher were given: pass --teacher (and --teacher-weights) once per member, in the "
            "cache's order")
    return specs, per_member(teacher_weights, len(specs), "--teacher-weights", None)


def member_identity(member: dict, spec: str, weights: str | None) -> dict:
    """One teacher's spec and weights file against the cache's entry for it."""
    from ..models.factory import file_sha256

    if weights and not os.path.isfile(weights):
        raise KdcacheError(f"weights file {weights} does not exist")
    sha = file_sha256(weights) if weights else None
    return {"spec": spec, "cache_spec": member.get("spec"), "spec_matches": spec == member.get("spec"),
            "weights_sha256": sha, "cache_weights_sha256": member.get("weights_sha256"),
            "weights_match": sha == member.get("weights_sha256")}


# ---- 2. coverage -------------------------------------------------------------------------------


def coverage(reader: CacheReader, urls: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """Groups checked against data shards. Returns (groups usable for sampling, problems, warnings)."""
    from ..data.render import backend_conflict

    problems, warnings, usable = [], [], []
    present = set(reader.shard_names())
    listed = list(reader.manifest.get("shards") or [])
    for name in listed:
        if name not in present:
            problems.append(f"shard group {name!r} is listed in the cache's manifest but missing from the store; "
                            "re-run the precompute command to write it")
    for name in sorted(present):
        if not reader.is_complete(name):
            problems.append(f"shard group {name!r} is incomplete (precompute was interrupted or is running); "
                            "re-run the same precompute command to finish it")
        elif name not in urls:
            warnings.append(f"shard {name!r} is not in the data pattern; not checked")
        elif conflict := backend_conflict(reader.manifest.get("render"), reader.shard_attrs(name).get("render"), name,
                                          reader.path):
            problems.append(conflict)
        else:
            usable.append(name)
    for name, url in sorted(urls.items()):
        if name not in present:
            problems.append(f"data shard {url} has no group in the cache (the cache never covered it): training "
                            "on this data would stop there; precompute it into the cache or leave it out of --data")
    return usable, problems, warnings


# ---- 3. sample ---------------------------------------------------------------------------------


def sample(reader: CacheReader, names: list[str], samples: int, seed: int) -> tuple[list[Pick], int]:
    """``samples`` (shard, record, view) picks, uniform over the usable records. Returns (picks, population)."""
    V = reader.views
    pool, counts, rows = [], [], {}
    for name, (keys, size) in zip(names, reader.read_ahead(names, lambda n: (reader.keys(n), reader.sizes(n)))):
        valid = np.flatnonzero(valid_records(keys, size, dict(reader.shard_attrs(name).get("bad") or {})))
        if len(valid):
            pool.append(name)
            counts.append(len(valid) * V)
            rows[name] = valid
    total = int(sum(counts))
    if not total:
        return [], 0
    rng = np.random.default_rng(seed)
    flat = np.arange(total) if samples >= total else np.sort(rng.choice(total, size=samples, replace=False))
    bounds = np.cumsum([0] + counts)
    picks = []
    for f in flat.tolist():
        s = int(np.searchsorted(bounds, f, side="right") - 1)
        r = f - int(bounds[s])
        picks.append(Pick(pool[s], int(rows[pool[s]][r // V]), r % V))
    return picks, total


# ---- 4. one shard ------------------------------------------------------------------------------


def check_shard(reader: CacheReader, name: str, url: str, picks: list[Pick], teacher, tally: Tally,
                atol: float, rtol: float, fallback_batch: int, progress=None) -> None:
    """Keys, sizes, geometry and teacher outputs of the picks of one shard (see the module doc)."""
    import torch

    from .precompute import render_batch
    from ..cache.targets import check_draws
    from ..models.ensemble import ensemble_batch_logprobs, ensemble_batch_topk
    from ..models.teacher import NonFiniteTeacherOutput
    from ..data.views import ShardViews
    from ..data.render import image_hw, renderer_for

    man = reader.manifest
    sd = reader.read_shard(name)
    keys, n = sd["keys"], len(sd["keys"])
    valid = valid_records(keys, sd["size"], dict(reader.shard_attrs(name).get("bad") or {}))
    stored = ShardViews(sd["box"], sd["flip"], sd["mix_with"], sd["mix_lam"])

    batch_size = (man.get("compute") or {}).get("batch_size")
    batches = batches_to_run(man, valid, picks, fallback_batch)
    picked = {(p.index, p.view): p for p in picks}

    # Rows to decode: every record of those batches and its mixup partner.
    rows = {int(i) for b in batches for i in b[:, 0]}
    rows |= {int(stored.mix_with[i, v]) for b in batches for i, v in b.tolist()} - {-1}
    rows = {i for i in rows if 0 <= i < n}
    need = {p.index for p in picks} | {int(stored.mix_with[p.index, p.view]) for p in picks} - {-1}
    renderer = renderer_for(man.get("render"))  # the cache's backend, as replay uses it
    loaded = load_images(url, {str(keys[i]) for i in rows}, renderer)
    images: list = [None] * n
    unusable: dict[int, str] = {}
    for i in sorted(rows):
        key = str(keys[i])
        im = loaded.get(key)
        h, w = (int(t) for t in sd["size"][i])
        if im is None:
            unusable[i] = f"key {key!r} (row {i}) is not in data shard {url}"
        elif isinstance(im, str):
            unusable[i] = im
        elif image_hw(im) != (h, w):
            unusable[i] = (f"image {key!r} is {size_text(image_hw(im)[1], image_hw(im)[0])} in the data, "
                           f"{size_text(w, h)} in the cache")
        if i in need:
            tally.keys_checked += 1
            tally.keys_found += im is not None
            tally.sizes_match += i not in unusable
        # An unusable row still fills its place in the batch (black pixels of the stored size), so the
        # other records of the batch run exactly as precompute ran them.
        images[i] = renderer.blank(h, w) if i in unusable else im

    check_geometry(man, name, sd, stored, valid, picks, unusable, tally)

    C = teacher.num_classes
    sampled = reader.kind == "sample"
    step = reader.logprob_step
    for pairs in batches:
        if (stored.mix_with[pairs[:, 0], pairs[:, 1]] >= n).any():
            pairs = pairs[stored.mix_with[pairs[:, 0], pairs[:, 1]] < n]  # cannot render; failed above
        with torch.inference_mode():
            crops = render_batch(name, images, stored, pairs, teacher.sizes, renderer).at()
            try:
                if sampled:
                    logp = ensemble_batch_logprobs(teacher, crops)
                    vals = ids = logp
                else:
                    vals, ids = ensemble_batch_topk(teacher, crops, C)
            except NonFiniteTeacherOutput as e:
                raise e.at(f" on shard {url}", [f"key {str(keys[i])!r} view {v}" for i, v in pairs.tolist()],
                           "verify cannot compare the cache with it") from None
        tally.exact_batches += bool(batch_size)
        for (i, v), vv, ii in zip(pairs.tolist(), vals, ids):
            p = picked.get((i, v))
            if p is None or (p.shard, p.index, p.view) in tally.failures:
                continue  # a batch-mate, or a pick whose inputs already failed
            if sampled:
                t = man["targets"]
                r = check_draws(sd["classes"][i, v], sd["counts"][i, v], vv, int(man["seed"]), str(keys[i]), v,
                                int(t["samples"]), float(t["temperature"]), atol, rtol)
                tally.compared += 1
                tally.draws_exact += r["exact"]
                tally.max_cdf_gap = max(tally.max_cdf_gap, r["max_cdf_gap"])
                for why in r["reasons"]:
                    tally.fail(p, str(keys[i]), why)
                continue
            r = compare_record(sd["logprobs"][i, v], sd["classes"][i, v], vv, ii, atol, rtol, step)
            tally.compared += 1
            tally.top1_exact += r["top1_exact"]
            tally.topk_exact += r["topk_exact"]
            tally.max_delta = max(tally.max_delta, math.inf if r["max_delta"] is None else r["max_delta"])
            tally.max_tail_delta = max(tally.max_tail_delta, r["tail_delta"] if r["tail_delta"] is not None else math.inf)
            for why in r["reasons"]:
                tally.fail(p, str(keys[i]), why)
        if progress is not None:
            progress(sum((i, v) in picked for i, v in pairs.tolist()))


def batches_to_run(man: dict, valid, picks: list[Pick], fallback_batch: int) -> list:
    """Which teacher batches to run: the ones precompute ran (when the cache says how), else the
    picks cut into batches of ``fallback_batch``. Each is an (n, 2) array of (record, view)."""
    from .precompute import teacher_batches

    batch_size = (man.get("compute") or {}).get("batch_size")
    if batch_size:
        plan = teacher_batches(valid, int(man["views"]), int(batch_size))
        where = {(int(i), int(v)): b for b, pairs in enumerate(plan) for i, v in pairs}
        return [plan[b] for b in sorted({where[(p.index, p.view)] for p in picks})]
    pairs = np.array([(p.index, p.view) for p in picks], dtype=np.int64).reshape(-1, 2)
    return [pairs[i : i + fallback_batch] for i in range(0, len(pairs), fallback_batch)]


def check_geometry(man: dict, name: str, sd: dict, stored, valid, picks: list[Pick], unusable: dict[int, str],
                   tally: Tally) -> None:
    """Each pick's stored view against the one the seeded sampler draws (when this kdcache has the
    cache's sampler), its partner inside the shard, and its images usable."""
    from ..data.views import SAMPLER_VERSION, AugSpec, sample_shard_views

    keys, n = sd["keys"], len(sd["keys"])
    aug = AugSpec.from_dict(man["augmentation"])
    drawn = None
    if aug.version == SAMPLER_VERSION:
        drawn = sample_shard_views(int(man["seed"]), name, keys, np.asarray(sd["size"]), int(man["views"]), aug,
                                   valid=valid)
    for p in picks:
        key = str(keys[p.index])
        if drawn is not None:
            tally.geometry_checked += 1
            got, want = stored.view(p.index, p.view), drawn.view(p.index, p.view)
            if got == want:
                tally.geometry_match += 1
            else:
                tally.fail(p, key, f"geometry: stored box {got.box} flip {got.flip} mix_with {got.mix_with} "
                                   f"λ {got.mix_lam:.4f}, the seeded sampler draws box {want.box} flip {want.flip} "
                                   f"mix_with {want.mix_with} λ {want.mix_lam:.4f}")
        j = int(stored.mix_with[p.index, p.view])
        if j >= n:
            tally.fail(p, key, f"mixup partner index {j} is outside the shard's {n} records")
        for i in [p.index] + ([j] if 0 <= j < n else []):
            if i in unusable:
                tally.fail(p, key, ("" if i == p.index else "mixup partner: ") + unusable[i])


# ---- the whole check ---------------------------------------------------------------------------


def verify(cache, data, teacher: str, **options) -> dict:
    """Re-run the teacher on ``samples`` randomly chosen (record, view) pairs and compare.

    ``options`` are ``VerifyConfig``'s fields (samples, device, seed, batch_size, atol, rtol,
    teacher_weights, ...; their defaults are there). ``ok`` is True when nothing disagrees and nothing
    is missing (docs/cli.md lists the fields). ``batch_size`` is only used for format-1 caches, which
    did not record precompute's. ``progress``: True shows a bar over the sampled records on stderr; a
    function is called with each batch's count.
    """
    from ..runtime import resolve_device

    cfg = VerifyConfig(cache, data, teacher, **options)
    reader = open_unchecked(cfg.cache, cfg.storage_options)
    man = reader.manifest
    if cfg.num_classes is not None and cfg.num_classes != reader.num_classes:
        raise KdcacheError(f"--num-classes {cfg.num_classes} disagrees with the cache, whose teacher has "
                           f"{reader.num_classes} classes")
    urls = shard_urls(cfg.data)
    dev = resolve_device(cfg.device)
    ident, problems, warnings = identity(man, cfg.teacher, cfg.teacher_weights, dev.type, cfg.allow_teacher_mismatch)
    names, more_problems, more_warnings = coverage(reader, urls)
    problems += more_problems
    warnings += more_warnings
    if not names and (mixed := [p for p in problems if "mixes two" in p]):
        raise KdcacheError(mixed[0] + (f" ({len(mixed) - 1} more groups alike)" if len(mixed) > 1 else ""))
    if not names:
        raise KdcacheError(
            f"no complete cache shard of {reader.path} is in the data {cfg.data!r}: "
            f"cache shards {reader.shard_names()[:5]}, data shards {sorted(urls)[:5]}"
        )
    problems += edited_groups(reader, names)
    picks, population = sample(reader, names, cfg.samples, cfg.seed)
    warnings += format_warnings(man, cfg.batch_size)
    teacher_model = rebuild_teacher(cfg, man, dev, ident, problems)  # only once the inputs are known usable
    tally = Tally()
    by_shard: dict[str, list[Pick]] = {}
    for p in picks:
        by_shard.setdefault(p.shard, []).append(p)
    progress, bar = cfg.progress, None
    if progress is True:  # the bar over the sampled records, as precompute and train show theirs
        from tqdm.auto import tqdm

        bar = tqdm(total=len(picks), unit="sample", desc="verify", dynamic_ncols=True)
        progress = bar.update
    try:
        for name, plist in by_shard.items():
            check_shard(reader, name, urls[name], plist, teacher_model, tally, cfg.atol, cfg.rtol, cfg.batch_size,
                        progress or None)
    finally:
        if bar is not None:
            bar.close()
    return report(cfg, reader, names, picks, population, by_shard, ident, tally, warnings, problems)


def edited_groups(reader: CacheReader, names: list[str]) -> list[str]:
    """One problem line per group whose views no longer match their digests (edited or damaged
    after precompute). Targets no teacher output has (NaN, +inf) left by an older kdcache are
    refused outright (exit 2)."""
    problems = []
    # not checked: this reader reports edits instead of refusing them
    for name, data in zip(names, reader.read_ahead(names, reader.read_shard)):
        if views := reader.digest_problems(name, data):
            problems.append(f"shard group {name!r}: views {views} no longer match the digests precompute recorded: "
                            "the cache was edited or damaged after precompute")
        else:
            reader.check_finite(name, data)
    return problems


def format_warnings(man: dict, batch_size: int) -> list[str]:
    """What a cache of an older format cannot promise verify."""
    warnings = []
    if (man.get("augmentation") or {}).get("version") != _sampler_version():
        warnings.append(f"the cache's views were drawn by sampler version {man['augmentation'].get('version')}, "
                        f"this kdcache has {_sampler_version()}; stored geometry is replayed but not re-drawn")
    if not (man.get("compute") or {}).get("batch_size"):
        warnings.append("the cache does not record precompute's teacher batches (format 1); the picks run in "
                        f"batches of --batch-size {batch_size}, so the last bits may differ")
    return warnings


def rebuild_teacher(cfg: VerifyConfig, man: dict, dev, ident: dict, problems: list[str]):
    """The cache's teacher (an ``ensemble.Ensemble``; one member for a single teacher), built as
    precompute built it: each member's normalisation and resolution, and its seeded random init when
    it had one, then checked parameter for parameter."""
    from ..models.ensemble import MemberSpec, load_ensemble
    from ..models.factory import state_sha256

    members = cache_members(man)
    specs, weights = given_members(man, cfg.teacher, cfg.teacher_weights)
    asked = [MemberSpec(spec, w, int(m["resolution"]), m.get("mean"), m.get("std"),
                        m.get("random_init_seed") if w is None and not cfg.pretrained else None)
             for m, spec, w in zip(members, specs, weights)]
    try:
        ens = load_ensemble(asked, dev, num_classes=int(man["teacher"]["num_classes"]), pretrained=cfg.pretrained)
    except KdcacheError as e:
        if "has random weights" not in str(e):
            raise
        raise KdcacheError(
            f"{e}. This cache records no teacher weights file and no random-init seed, so its teacher cannot be "
            "rebuilt and verify cannot check it; precompute a new cache with --teacher-weights (or --random-init "
            "SEED)") from None
    checks = ident["teacher"].get("members") or [ident["teacher"]]
    for n, (a, m, t, check) in enumerate(zip(asked, members, ens.teachers, checks), 1):
        if a.random_init is None:
            continue
        check["state_matches"] = state_sha256(t.model) == m.get("state_sha256")
        if not check["state_matches"]:
            who = f"teacher {n}" if len(members) > 1 else "the teacher"
            problems.append(f"{who} rebuilt with the cache's random-init seed {a.random_init} has other parameters "
                            "than the one that made the cache (another torch or model version?)")
    return ens


def report(cfg: VerifyConfig, reader: CacheReader, names, picks, population, by_shard, ident, tally: Tally,
           warnings: list[str], problems: list[str]) -> dict:
    """verify's report (docs/cli.md, ``verify --json``)."""
    from ..data.render import render_mismatch

    man = reader.manifest
    fails = sorted(tally.failures.values(), key=lambda e: (e["shard"], e["index"], e["view"]))
    hints = [f"{h}; then verify again" for h in [render_mismatch(man.get("render"))] if h and fails]
    n_cmp = tally.compared
    topk, drawn = n_cmp and reader.kind == "topk", n_cmp and reader.kind == "sample"
    return {
        "schema": JSON_SCHEMA,
        "ok": not fails and not problems,
        "cache": reader.path,
        "data": cfg.data if isinstance(cfg.data, str) else list(cfg.data),
        "seed": cfg.seed,
        "samples_requested": cfg.samples,
        "samples_checked": len(picks),
        "population": population,
        "shards_checked": sorted(by_shard),
        "tolerance": {"atol": cfg.atol, "rtol": cfg.rtol, "logprob_step": reader.logprob_step},
        "exact_batches": bool((man.get("compute") or {}).get("batch_size")),
        "groups_digest_checked": sum(reader.view_digests(n) is not None for n in names),
        **ident,
        "keys_checked": tally.keys_checked,
        "keys_found": tally.keys_found,
        "sizes_match": tally.sizes_match,
        "geometry_checked": tally.geometry_checked,
        "geometry_match": tally.geometry_match,
        "compared": n_cmp,
        "top1_agreement": tally.top1_exact / n_cmp if topk else None,
        "topk_set_agreement": tally.topk_exact / n_cmp if topk else None,
        "max_abs_delta_logprob": json_float(tally.max_delta) if topk else None,
        "max_abs_delta_tail_mass": json_float(tally.max_tail_delta) if topk else None,
        "targets": man.get("targets") or {"kind": "topk"},
        "encoding": man.get("encoding") or {"layout": "plain"},
        "draws_exact": tally.draws_exact / n_cmp if drawn else None,
        "max_cdf_gap": tally.max_cdf_gap if drawn else None,
        "warnings": warnings,
        "problems": problems,
        "hints": hints,
        "failures": fails,
    }


def _sampler_version() -> int:
    from ..data.views import SAMPLER_VERSION

    return SAMPLER_VERSION


# ---- text --------------------------------------------------------------------------------------


def format_verify(r: dict, max_failures: int = 50) -> str:
    from ..data.render import render_text

    t = r["teacher"]
    tol = r["tolerance"]
    lines = [
        f"verify {r['cache']} against {r['data']}",
        f"  sampled {r['samples_checked']} of {r['population']} (record, view) pairs in {len(r['shards_checked'])} "
        f"shards (seed {r['seed']})" + ("; teacher batches as precompute ran them" if r["exact_batches"] else ""),
        *[f"  {who}spec {'matches' if m['spec_matches'] else 'DIFFERS'}, weights sha256 "
          f"{'matches' if m['weights_match'] else 'DIFFERS'}"
          for who, m in ([("teacher ", t)] if "members" not in t else
                         [(f"teacher {n} ({m['spec']}) ", m) for n, m in enumerate(t["members"], 1)])],
        f"  render: here {render_text(r['render']['here'])}, cache {render_text(r['render']['cache'])}"
        f"{'' if r['render']['matches'] else ' (DIFFERENT)'}",
        f"  keys found {r['keys_found']}/{r['keys_checked']}, image sizes match {r['sizes_match']}/{r['keys_checked']}, "
        f"geometry matches the seeded sampler {r['geometry_match']}/{r['geometry_checked']}",
    ]
    if r["compared"] and r.get("draws_exact") is not None:
        t = r["targets"]
        lines.append(
            f"  sampled targets ({t['samples']} draws per record at temperature {t['temperature']:g}): re-drawn from the "
            f"teacher now, {100 * r['draws_exact']:.1f}% of {r['compared']} views give the stored counts exactly; the "
            f"rest lie within tolerance of their classes' intervals (largest gap {r['max_cdf_gap']:.2g})")
    elif r["compared"]:
        fmt = lambda x, spec: "inf" if x is None else format(x, spec)  # noqa: E731
        lines.append(
            f"  top-1 agreement {100 * r['top1_agreement']:.1f}%, top-k set agreement {100 * r['topk_set_agreement']:.1f}% "
            f"over {r['compared']} views; max |Δ log-prob| {fmt(r['max_abs_delta_logprob'], '.4g')}"
            f" (tolerance {tol['atol']:g} + {tol['rtol']:.3g}·|stored|"
            + (f" + the compact layout's step {tol['logprob_step']:g}" if tol.get("logprob_step") else "")
            + "), max |Δ tail mass| "
            f"{fmt(r['max_abs_delta_tail_mass'], '.3g')}"
        )
    for w in r["warnings"]:
        lines.append(f"warning: {w}")
    for p in r["problems"]:
        lines.append(f"problem: {p}")
    if r["failures"]:
        lines.append(f"{len(r['failures'])} records disagree:")
        for f in r["failures"][:max_failures]:
            lines.append(f"  {f['shard']} {f['key']} view {f['view']}: " + "; ".join(f["reasons"]))
        if len(r["failures"]) > max_failures:
            lines.append(f"  ... {len(r['failures']) - max_failures} more (use --json for all)")
    for h in r["hints"]:
        lines.append(f"hint: {h}")
    lines.append("OK: the cache replays exactly within tolerance" if r["ok"] else "FAILED: the cache does not replay as stored")
    return "\n".join(lines)
