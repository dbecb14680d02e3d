"""Cache format 3: the compact layout (quantised log-probs, per-image class lists, derived views) and
sampled targets (precompute --targets sample), on real shards; format 1 and 2 caches stay readable."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from conftest import NUM_CLASSES, TEACHER, precompute_config, sharp_teacher, snapshot, written_before_records
from kdcache.cache import encoding as enc
from kdcache.cli import cli
from kdcache.errors import KdcacheError
from kdcache.tools.precompute import precompute
from kdcache.cache.store import ARRAYS, FORMAT_VERSION, CacheReader, CacheWriter, encoding_record, make_manifest
from kdcache.cache.targets import check_draws, draw_batch, draw_record, log_weights, targets_record

GEOMETRY = ("box", "flip", "mix_with", "mix_lam")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def sharp_weights(tmp_path_factory):
    """A teacher whose outputs spread over several classes and move with the input."""
    path = tmp_path_factory.mktemp("w3") / "sharp.pt"
    torch.save(sharp_teacher(1, scale=25).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def caches(dataset, sharp_weights, tmp_path_factory):
    """The same data and teacher in four caches: plain and compact top-k (k = 3 of 5), plain and
    compact sampled targets (8 draws)."""
    root = tmp_path_factory.mktemp("f3")
    kinds = {"plain": {}, "compact": dict(compact=True), "sample": dict(targets="sample", samples=8),
             "sample_compact": dict(targets="sample", samples=8, compact=True)}
    for name, kw in kinds.items():
        precompute(precompute_config(dataset, root / f"{name}.zarr", sharp_weights, **kw))
    return {name: root / f"{name}.zarr" for name in kinds}


# ---- the compact layout ----------------------------------------------------------------------------


def test_compact_layout_arrays_and_manifest(caches):
    r = CacheReader(str(caches["compact"]))
    assert r.manifest["format_version"] == FORMAT_VERSION == 3
    assert r.manifest["targets"] == {"kind": "topk"}
    assert r.manifest["encoding"] == {"layout": "compact", "classes": "per_group", "geometry": "derived",
                                      "logprob_step": 1 / 16}
    g = zarr.open_group(str(caches["compact"] / "train-000000"), mode="r")
    assert g.attrs["class_coding"] == "image_list"  # (test_class_coding.py: when "direct" is chosen)
    assert sorted(g.array_keys()) == ["class_code", "class_list", "keys", "logprob_steps", "size", "topk_logmass"]
    n, V, k = 7, 3, 3
    assert g["logprob_steps"].shape == (n, V, k - 1) and g["logprob_steps"].dtype == np.uint8
    assert g["topk_logmass"].shape == (n, V) and g["topk_logmass"].dtype == np.float16
    assert g["class_code"].shape == (n, V, k) and g["class_code"].dtype == np.uint8
    assert g["class_list"].shape[0] == n and g["class_list"].dtype == np.int16
    for a in ("logprob_steps", "topk_logmass", "class_code"):
        assert g[a].chunks == (n, 1) + g[a].shape[2:] and g[a].shards == g[a].shape  # one chunk per view
    # every reader path returns the decoded arrays under the usual names
    d = r.read_shard("train-000000")
    assert set(ARRAYS) <= set(d) and d["logprobs"].shape == (n, V, k) and d["box"].shape == (n, V, 4)
    vr = r.read_view("train-000000", 2)
    for a in ("logprobs", "classes") + GEOMETRY:
        assert np.array_equal(getattr(vr, a), d[a][:, 2]), a


def test_compact_round_trip_against_plain(caches):
    """Classes and geometry exact; log-probs within the documented bound; the top-k mass (so the
    tail) within float16 precision of log Σ exp(l), tighter than the plain layout keeps it."""
    p, c = CacheReader(str(caches["plain"])), CacheReader(str(caches["compact"]))
    assert p.shard_names() == c.shard_names()
    for name in p.shard_names():
        a, b = p.read_shard(name), c.read_shard(name)
        assert a["keys"].tolist() == b["keys"].tolist() and np.array_equal(a["size"], b["size"])
        assert np.array_equal(a["classes"], b["classes"])
        for g in GEOMETRY:
            assert a[g].dtype == b[g].dtype and np.array_equal(a[g], b[g]), g
        la, lb = a["logprobs"].astype(np.float64), b["logprobs"].astype(np.float64)
        # the plain layout is itself float16: the bound below holds against the float32 truth, so
        # against plain it holds with one float16 rounding more
        bound = enc.LOGPROB_STEP + 2.0**-11 * np.abs(la).max() + 2.0**-10 * np.abs(la)
        assert (np.abs(la - lb) <= bound).all()
        assert np.abs(la - lb).max() > 1e-3  # quantised: not just a copy of the float16 values
        ma, mb = np.exp(la).sum(-1), np.exp(lb).sum(-1)
        assert np.abs(ma - mb).max() <= 3 * 2.0**-11  # the plain layout's own float16 rounding dominates
    assert c.digest_problems("train-000001") == []


def dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_compact_bytes_are_smaller(caches):
    assert dir_bytes(caches["compact"]) < 0.75 * dir_bytes(caches["plain"])
    assert dir_bytes(caches["sample_compact"]) < dir_bytes(caches["sample"])


def test_quantisation_error_bound():
    """|l̂ − l| ≤ step + float16 rounding of the top-k mass, for every uncapped entry; the top-k mass
    decodes to exp(logmass) exactly (float32); -inf entries, k = 1 and gaps beyond the cap."""
    rng = np.random.default_rng(0)
    for k, sharp in ((1, 1.0), (2, 3.0), (10, 1.0), (10, 6.0), (64, 2.0)):
        logits = rng.normal(0, sharp, (500, 1000))
        logits[:5, 0] += 60.0  # confident rows: the others are > 16 nats down (capped codes)
        lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        top = -np.sort(-lp, axis=1)[:, :k].astype(np.float32)
        steps, logmass = enc.quantise_logprobs(top)
        assert steps.shape == (500, k - 1) and steps.dtype == np.uint8 and (steps <= enc.MAX_STEP_CODE).all()
        back = enc.dequantise_logprobs(steps, logmass).astype(np.float64)
        t = top.astype(np.float64)
        true_mass = np.log(np.exp(t).sum(1))
        mass_err = np.abs(logmass.astype(np.float64) - true_mass)
        assert (mass_err <= 2.0**-11 * np.abs(true_mass) + 1e-7).all()
        uncapped = np.cumsum(np.concatenate([np.zeros((500, 1), bool), steps == enc.MAX_STEP_CODE], 1), 1) == 0
        err = np.abs(back - t)
        assert (err[uncapped] <= (enc.LOGPROB_STEP + mass_err[:, None] + 1e-6 * (1 + np.abs(t)))[uncapped]).all()
        if k > 1:
            assert err[uncapped].max() > enc.LOGPROB_STEP / 4  # the bound is not vacuous
            assert (~uncapped[:5]).any()  # the confident rows hit the cap
        # the decoded top-k mass is the stored one: the tail is kept
        np.testing.assert_allclose(np.log(np.exp(back).sum(1)), logmass.astype(np.float64), atol=1e-6)
    # a bad record's placeholder (-inf everywhere) and a -inf entry (no mass) survive
    top = np.array([[-0.1, -3.0, -np.inf], [-np.inf, -np.inf, -np.inf]], np.float32)
    back = enc.dequantise_logprobs(*enc.quantise_logprobs(top))
    assert np.isneginf(back[1]).all() and np.isfinite(back[0]).all() and back[0, 2] < -15


def test_class_codes_are_exact_for_any_input():
    rng = np.random.default_rng(1)
    cls = np.stack([np.stack([rng.permutation(40)[:7] for _ in range(5)]) for _ in range(30)])  # (30, 5, 7)
    cls[3, 2] = -1  # a bad record
    w = rng.random(cls.shape)
    lists = enc.pad_lists(enc.image_class_lists(cls, w), np.int16)
    codes = enc.encode_classes(cls, lists)
    assert np.array_equal(enc.decode_classes(codes, lists), cls)
    assert np.array_equal(enc.decode_classes(codes[:, 1:2], lists), cls[:, 1:2])  # one view alone
    # a record in its image's order codes as zeros
    ordered = lists[:, None, :7].repeat(5, 1)
    assert (enc.encode_classes(ordered, lists) == 0).all()


def test_class_codes_past_65534_list_entries_widen_instead_of_wrapping():
    """A class list longer than 65,534 entries (a teacher with that many classes and as many
    distinct entries over an image's views) needs codes past uint16: they used to wrap."""
    lists = np.arange(70_000, dtype=np.int32)[None]  # one image, 70,000 distinct classes
    cls = np.array([[[69_999, 5, 65_536, 65_534, -1]]])
    codes = enc.encode_classes(cls, lists)
    assert codes.dtype == np.uint32 and codes[0, 0, -1] == enc.missing_code(np.uint32) == 2**32 - 2
    assert np.array_equal(enc.decode_classes(codes, lists), cls)
    assert enc.code_dtype(254) == np.uint8 and enc.code_dtype(255) == np.uint16
    assert enc.code_dtype(65_534) == np.uint16 and enc.code_dtype(65_535) == np.uint32
    assert enc.missing_code(np.uint8) == 254 and enc.missing_code(np.uint16) == 65_534  # docs/format.md


def test_draws_refuse_more_samples_than_a_count_holds():
    """Counts are bytes (255 is the fill value): the API refuses more than 254 draws instead of
    wrapping (300 draws of one class used to come back as 44, 256 as no class at all)."""
    from kdcache.cache.store import MAX_COUNT
    from kdcache.cache.targets import MAX_SAMPLES

    assert MAX_SAMPLES == MAX_COUNT == 254
    onehot = np.array([0.0, -np.inf, -np.inf], np.float32)
    for n in (255, 256, 300, 0):
        with pytest.raises(ValueError, match=r"samples must be in 1\.\.254"):
            draw_batch(onehot[None], ["k"], [0], 0, n)
        with pytest.raises(ValueError, match=r"samples must be in 1\.\.254"):
            draw_record(onehot, 0, "k", 0, n)
    cls, cnt = draw_batch(onehot[None], ["k"], [0], 0, 254)
    assert cls[0, 0] == 0 and cnt[0, 0] == 254 and cnt.sum() == 254


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_draws_refuse_nan_and_plus_inf_log_probs(bad):
    """A +inf log-prob is not "probability 0", and a NaN row is not a one-hot of class 0."""
    logp = np.log(np.array([[0.2, 0.3, 0.5], [0.5, 0.25, 0.25]], np.float32))
    logp[1, 1] = bad
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        draw_batch(logp, ["a", "b"], [0, 0], 0, 8)
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        draw_record(logp[1], 0, "b", 0, 8)
    assert draw_record(logp[0], 0, "a", 0, 8)[1].sum() == 8


def test_compact_writer_refuses_views_the_sampler_does_not_draw(tmp_path):
    from kdcache.data.render import render_backend
    from kdcache.data.views import AugSpec, sample_shard_views

    m = make_manifest(teacher={"spec": "x", "num_classes": 10}, augmentation=AugSpec().to_dict(), seed=4, views=2,
                      topk=3, resolution=32, render=render_backend(), shards=["s0"], sources=["/d/s0.tar"],
                      encoding=encoding_record("compact", "topk"))
    keys, size = ["a", "b", "c"], np.array([[40, 50], [30, 30], [60, 20]], np.int32)
    sv = sample_shard_views(4, "s0", keys, size, 2, AugSpec())
    rec = dict(keys=keys, size=size, logprobs=np.log(np.tile([0.5, 0.3, 0.1], (3, 2, 1))).astype(np.float32),
               classes=np.tile([1, 2, 3], (3, 2, 1)), box=sv.box.copy(), flip=sv.flip, mix_with=sv.mix_with,
               mix_lam=sv.mix_lam)
    rec["box"][1, 0, 0] += 1
    w = CacheWriter(str(tmp_path / "c.zarr"), m)
    with pytest.raises(KdcacheError, match="the given box differs from the views the seeded sampler draws"):
        w.write_shard("s0", source="/d/s0.tar", **rec)
    rec["box"] = sv.box
    w.write_shard("s0", source="/d/s0.tar", **rec)
    d = CacheReader(str(tmp_path / "c.zarr")).read_shard("s0")
    assert np.array_equal(d["box"], sv.box) and np.array_equal(d["classes"], rec["classes"])


def test_compact_digest_covers_codes_and_derived_views(caches, tmp_path, monkeypatch):
    c = tmp_path / "c.zarr"
    shutil.copytree(caches["compact"], c)
    arr = zarr.open_array(str(c / "train-000001" / "logprob_steps"), mode="r+")
    steps = arr[:]
    steps[4, 1, 0] += 1
    arr[:] = steps
    r = CacheReader(str(c))
    assert r.digest_problems("train-000001") == [1]
    with pytest.raises(KdcacheError, match="view 1 does not match the digest"):
        r.read_view("train-000001", 1)
    assert len(r.read_view("train-000001", 0)) == 7  # the other views are intact
    # a sampler that no longer draws the stored views (a later kdcache) is refused by name, not
    # silently replayed
    import kdcache.data.views

    monkeypatch.setattr(kdcache.data.views, "SAMPLER_VERSION", 2)
    with pytest.raises(KdcacheError, match="drawn by view sampler version 1 and this kdcache has version 2.* "
                                           "cannot re-derive them"):
        CacheReader(str(c)).read_view("train-000000", 0)
    monkeypatch.undo()
    # and a manifest edited to claim another sampler is named as an edit
    meta = json.loads((c / "zarr.json").read_text())
    meta["attributes"]["kdcache"]["augmentation"]["version"] = 99
    (c / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(KdcacheError, match="manifest field augmentation.version was edited"):
        CacheReader(str(c)).read_view("train-000000", 0)


def test_plain_zarr_and_tensorstore_decode_the_compact_layout(caches):
    """What docs/format.md shows: any Zarr v3 reader gets every array of a compact (and a sampled)
    cache, and the documented decoding gives the reader's values."""
    ts = pytest.importorskip("tensorstore")

    def ts_read(path):
        return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}).result().read().result()

    for which in ("compact", "sample", "sample_compact"):
        r = CacheReader(str(caches[which]))
        root = zarr.open_group(str(caches[which]), mode="r")
        for name, g in sorted(root.groups()):
            for a in g.array_keys():
                assert np.array_equal(ts_read(caches[which] / name / a), g[a][:]), (which, name, a)
    # the docs' decoding, by hand from plain arrays, for view 1
    r = CacheReader(str(caches["compact"]))
    step = r.manifest["encoding"]["logprob_step"]
    for name in r.shard_names():
        g = zarr.open_group(str(caches["compact"] / name), mode="r")
        steps = ts_read(caches["compact"] / name / "logprob_steps")[:, 1].astype(np.float64)
        logmass = g["topk_logmass"][:, 1].astype(np.float64)
        x = np.concatenate([np.zeros((len(steps), 1)), np.cumsum(steps, 1)], 1) * step
        logp = logmass[:, None] - x - np.log(np.exp(-x).sum(1, keepdims=True))
        lst, code = g["class_list"][:].astype(np.int64), g["class_code"][:, 1].astype(np.int64)
        avail = np.ones(lst.shape, bool)
        cls = np.empty(code.shape, np.int64)
        for j in range(code.shape[1]):
            hit = avail & (np.cumsum(avail, 1) - 1 == code[:, j : j + 1])
            at = hit.argmax(1)
            cls[:, j] = lst[np.arange(len(lst)), at]
            avail[np.arange(len(lst)), at] = False
        vr = r.read_view(name, 1)
        np.testing.assert_allclose(logp, vr.logprobs, rtol=0, atol=1e-6)
        assert np.array_equal(cls, vr.classes)


# ---- sampled targets -------------------------------------------------------------------------------


def test_draws_are_a_function_of_seed_key_view():
    logp = torch.log_softmax(torch.randn(50) * 2, 0).numpy()
    a = draw_record(logp, 3, "key", 1, 12)
    assert all(np.array_equal(x, y) for x, y in zip(a, draw_record(logp, 3, "key", 1, 12)))
    others = [draw_record(logp, *args, 12) for args in ((4, "key", 1), (3, "kez", 1), (3, "key", 2))]
    assert all(not np.array_equal(a[1], o[1]) or not np.array_equal(a[0], o[0]) for o in others)
    cls, cnt = a
    assert cnt.sum() == 12 and (np.diff(cnt.astype(int)) <= 0).all() and ((cls >= 0) == (cnt > 0)).all()
    # a batch draws each record as alone
    b = draw_batch(np.stack([logp, logp]), ["key", "other"], [1, 1], 3, 12)
    assert np.array_equal(b[0][0], cls) and np.array_equal(b[1][0], cnt)


def test_uniforms_are_the_seeded_generators_doubles():
    """draw_uniforms reads the bit generator directly; the doubles are Generator(PCG64).random's,
    the definition docs/format.md gives."""
    from kdcache.cache.targets import draw_uniforms
    from kdcache.data.views import stable_seed

    for seed, key, view, n in ((0, "a", 0, 1), (7, "img_000123", 5, 16), (2**40, "ü/é", 63, 255)):
        want = np.random.Generator(np.random.PCG64(stable_seed("targets", seed, key, view))).random(n)
        assert np.array_equal(draw_uniforms(seed, key, view, n), want)


def test_a_batch_draws_what_each_record_draws_alone(monkeypatch):
    """draw_batch (the distribution built for many rows at once, the counting vectorised) against
    draw_record row by row: ties, classes of probability 0, fewer classes than draws, temperatures,
    and blocks of rows that split the batch unevenly."""
    import kdcache.cache.targets as targets

    monkeypatch.setattr(targets, "_CDF_ELEMENTS", 64)  # blocks of a few rows
    rng = np.random.default_rng(0)
    for trial in range(120):
        B, C = int(rng.integers(1, 20)), int(rng.choice([1, 2, 3, 7, 17, 100]))
        N, T = int(rng.choice([1, 2, 9, 16, 254])), float(rng.choice([0.5, 1.0, 3.0]))
        z = rng.normal(size=(B, C)) * rng.choice([0.1, 3.0, 30.0])
        if trial % 3 == 0:
            z = np.round(z)  # equal probabilities
        logp = torch.log_softmax(torch.tensor(z, dtype=torch.float32), -1).numpy()
        if trial % 4 == 0 and C > 2:
            logp[:, : C // 2] = -np.inf
        keys, views = [f"k{trial}_{i}" for i in range(B)], rng.integers(0, 50, B).tolist()
        cls, cnt = draw_batch(logp, keys, views, trial, N, T)
        assert cls.shape == cnt.shape == (B, min(N, C)) and cnt.dtype == np.uint8
        for r in range(B):
            c, n = draw_record(logp[r], trial, keys[r], views[r], N, T, min(N, C))
            assert np.array_equal(cls[r], c) and np.array_equal(cnt[r], n), (trial, r)
    with pytest.raises(ValueError, match="3 rows of log-probs but 2 keys"):
        draw_batch(np.zeros((3, 4), np.float32), ["a", "b"], [0, 0, 0], 0, 4)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_sampled_weights_are_unbiased(T):
    """The mean of many records' weights count/N approaches the teacher's distribution at the
    sampling temperature, and the mean KD gradient T·(s − w) approaches full distillation's."""
    C, N, R = 20, 12, 4000
    logp = torch.log_softmax(torch.randn(C, generator=torch.Generator().manual_seed(0)) * 2.5, 0).numpy()
    p_T = torch.softmax(torch.from_numpy(logp).double() / T, 0).numpy()
    cls, cnt = draw_batch(np.repeat(logp[None], R, 0), [f"k{i}" for i in range(R)], [0] * R, 5, N, T)
    w = np.zeros((R, C))
    np.add.at(w, (np.arange(R)[:, None].repeat(cls.shape[1], 1), np.maximum(cls, 0)), cnt / N)
    mean = w.mean(0)
    se = np.sqrt(p_T * (1 - p_T) / (N * R))  # the standard error of the mean weight
    assert (np.abs(mean - p_T) <= 5 * se + 1e-12).all()
    assert np.abs(mean - p_T).max() > 0  # a real estimate, not a copy
    # the loss's gradient, averaged over the draws, is full KD's at T
    from kdcache.learn.losses import sparse_kd_loss_reference

    z = torch.randn(1, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64).repeat(400, 1)
    z.requires_grad_()
    loss = sparse_kd_loss_reference(z, torch.from_numpy(log_weights(cnt[:400], N)).double(),
                                    torch.from_numpy(cls[:400]), T, "sampled", reduction="sum")
    (g,) = torch.autograd.grad(loss, z)
    full = T * (torch.softmax(z[0].detach() / T, 0).numpy() - p_T)
    assert np.abs(g.mean(0).numpy() - full).max() < 5 * T * se.max() * np.sqrt(R / 400)


def test_sampled_cache_layout_and_reproducibility(caches, dataset, sharp_weights, tmp_path):
    r = CacheReader(str(caches["sample"]))
    assert r.manifest["targets"] == {"kind": "sample", "samples": 8, "temperature": 1.0, "version": 1}
    assert r.manifest["topk"] == min(8, NUM_CLASSES) == 5 and r.samples == 8
    g = zarr.open_group(str(caches["sample"] / "train-000000"), mode="r")
    assert sorted(g.array_keys()) == sorted(["keys", "size", "classes", "counts"] + list(GEOMETRY))
    assert g["counts"].dtype == np.uint8 and g["counts"].shape == (7, 3, 5)
    d = r.read_shard("train-000000")
    assert (d["counts"].astype(int).sum(-1) == 8).all()
    assert ((d["classes"] >= 0) == (d["counts"] > 0)).all()
    np.testing.assert_array_equal(d["logprobs"], log_weights(d["counts"], 8))
    vr = r.read_view("train-000000", 1)
    assert np.array_equal(vr.counts, d["counts"][:, 1]) and np.array_equal(vr.classes, d["classes"][:, 1])
    # the same command again gives the same draws; the compact layout holds the same
    precompute(precompute_config(dataset, tmp_path / "again.zarr", sharp_weights, targets="sample", samples=8))
    again, cmp_ = CacheReader(str(tmp_path / "again.zarr")), CacheReader(str(caches["sample_compact"]))
    for name in r.shard_names():
        a, b, c = r.read_shard(name), again.read_shard(name), cmp_.read_shard(name)
        for arr in ("classes", "counts") + GEOMETRY:
            assert np.array_equal(a[arr], b[arr]) and np.array_equal(a[arr], c[arr]), arr
    assert r.view_digests("train-000002") == again.view_digests("train-000002")
    # the draws follow the teacher: the most drawn class is mostly the teacher's top-1
    top = CacheReader(str(caches["plain"]))
    agree = np.mean([np.mean(top.read_shard(n)["classes"][..., 0] == r.read_shard(n)["classes"][..., 0])
                     for n in r.shard_names()])
    assert agree > 0.6


def test_sampled_settings_are_matched_on_resume(caches, dataset, sharp_weights):
    with pytest.raises(KdcacheError, match="targets.samples: cache has 8, this run has 9"):
        precompute(precompute_config(dataset, caches["sample"], sharp_weights, targets="sample", samples=9))
    with pytest.raises(KdcacheError, match="encoding.layout: cache has 'plain', this run has 'compact'"):
        precompute(precompute_config(dataset, caches["sample"], sharp_weights, targets="sample", samples=8,
                                     compact=True))
    with pytest.raises(KdcacheError, match="targets.kind: cache has 'sample', this run has 'topk'"):
        precompute(precompute_config(dataset, caches["sample"], sharp_weights, topk=5))


def _verify(cache, dataset, weights):
    res = run("verify", cache, "--data", dataset, "--teacher", TEACHER, "--teacher-weights", weights, "--device", "cpu",
              "--samples", 1000, "--json")
    return res.exit_code, json.loads(res.stdout)


@pytest.mark.parametrize("which", ["sample", "sample_compact"])
def test_verify_sampled_cache_passes_and_catches_an_edited_count(caches, dataset, sharp_weights, tmp_path, which):
    before = snapshot(caches[which])
    code, r = _verify(caches[which], dataset, sharp_weights)
    assert code == 0 and r["ok"], r
    assert r["compared"] == 63 and r["draws_exact"] == 1.0 and r["targets"]["kind"] == "sample"
    assert r["top1_agreement"] is None and r["max_abs_delta_logprob"] is None
    assert snapshot(caches[which]) == before
    # move one draw from one class to another: the counts still add up to N
    c = tmp_path / "edited.zarr"
    shutil.copytree(caches[which], c)
    arr = zarr.open_array(str(c / "train-000002" / "counts"), mode="r+")
    counts = arr[:]
    i, v = np.argwhere((counts[..., 0] >= 2) & (counts[..., 1] >= 1))[0]
    counts[i, v, 0] -= 1
    counts[i, v, 1] += 1
    arr[:] = counts
    code, r = _verify(c, dataset, sharp_weights)
    assert code == 1 and not r["ok"]
    assert any("no longer match the digests" in p for p in r["problems"])
    fail = [f for f in r["failures"] if (f["shard"], f["index"], f["view"]) == ("train-000002", i, v)]
    assert fail and "the re-run teacher's distribution puts it in class" in " ".join(fail[0]["reasons"])
    with pytest.raises(KdcacheError, match="does not match the digest"):
        CacheReader(str(c)).read_view("train-000002", int(v))


def test_check_draws_tolerance():
    """A draw that lies on a class boundary may flip with a re-run's last bits; one far from it may not."""
    logp = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    cls, cnt = draw_record(logp, 1, "k", 0, 10)
    assert check_draws(cls, cnt, logp, 1, "k", 0, 10, 1.0, 1e-4, 2.0**-10)["exact"]
    moved = logp + np.float32([0.0, 1e-5, -1e-5])  # within tolerance
    r = check_draws(cls, cnt, moved, 1, "k", 0, 10, 1.0, 1e-4, 2.0**-10)
    assert r["reasons"] == []
    far = np.log(np.array([0.2, 0.3, 0.5], np.float32))
    assert check_draws(cls, cnt, far, 1, "k", 0, 10, 1.0, 1e-4, 2.0**-10)["reasons"]


def test_verify_compact_cache(caches, dataset, sharp_weights):
    code, r = _verify(caches["compact"], dataset, sharp_weights)
    assert code == 0 and r["ok"], r
    assert r["tolerance"]["logprob_step"] == 1 / 16 and r["encoding"]["layout"] == "compact"
    assert r["max_abs_delta_logprob"] <= 1 / 16 + 2e-3 and r["top1_agreement"] == 1.0
    assert r["max_abs_delta_tail_mass"] < 2e-3


def test_train_reads_the_target_kind_from_the_cache(caches, dataset, tmp_path):
    from kdcache.learn.trainer import TrainConfig, train

    base = dict(data=str(dataset), student="py:kdcache.models.zoo:tiny_cnn", epochs=1, batch_size=8, workers=0,
                device="cpu", progress=False, res=32)
    s = train(TrainConfig(out=str(tmp_path / "sampled"), cache=str(caches["sample_compact"]), **base))
    cfg = json.loads((tmp_path / "sampled" / "config.json").read_text())
    assert cfg["resolved"]["tail"] == "sampled" and cfg["resolved"]["targets"]["kind"] == "sample"
    assert s["steps"] > 0
    with pytest.raises(KdcacheError, match="sampled targets drawn at temperature 1: .* --temperature 2"):
        train(TrainConfig(out=str(tmp_path / "t2"), cache=str(caches["sample"]), temperature=2.0, **base))
    train(TrainConfig(out=str(tmp_path / "compact"), cache=str(caches["compact"]), **base))
    cfg = json.loads((tmp_path / "compact" / "config.json").read_text())
    assert cfg["resolved"]["tail"] == "uniform" and cfg["resolved"]["targets"] == {"kind": "topk"}


def test_inspect_sampled_and_compact(caches):
    res = run("inspect", caches["sample_compact"])
    assert res.exit_code == 0, res.output
    assert "sampled targets: 8 draws per record at temperature 1" in res.output
    assert "layout        compact (class ids against per-image class lists; views re-derived from the seed)" in res.output
    assert "mean distinct classes per record" in res.output and "WARNING" not in res.output
    res = run("inspect", caches["sample"], "--shard", "train-000001", "--key", "train1_0003", "--view", 2)
    assert res.exit_code == 0 and "drawn" in res.output and "/8  weight" in res.output
    res = run("inspect", caches["compact"], "--json")
    s = json.loads(res.stdout)
    assert s["encoding"]["layout"] == "compact" and s["totals"]["impossible"] == [] and s["totals"]["edited"] == []


# ---- older formats ---------------------------------------------------------------------------------


def test_format_2_cache_is_read_and_never_written(caches, tmp_path, dataset, sharp_weights):
    """A format-2 cache is format 3's plain top-k layout without the manifest's targets and
    encoding (and the same digests): it reads as before, and is refused for writing."""
    v2 = tmp_path / "v2.zarr"
    shutil.copytree(caches["plain"], v2)
    written_before_records(v2)
    meta = json.loads((v2 / "zarr.json").read_text())
    m = meta["attributes"]["kdcache"]
    m.update(format_version=2, kdcache_version="0.2.0")
    del m["targets"], m["encoding"]
    (v2 / "zarr.json").write_text(json.dumps(meta))
    r2, r3 = CacheReader(str(v2)), CacheReader(str(caches["plain"]))
    assert (r2.format_version, r2.kind, r2.layout) == (2, "topk", "plain")
    for name in r3.shard_names():
        a, b = r2.read_shard(name), r3.read_shard(name)  # digests checked: the same formula
        assert sorted(a) == sorted(b) == sorted(ARRAYS)
        for arr in ARRAYS:
            assert a[arr].dtype == b[arr].dtype and np.array_equal(a[arr], b[arr]), arr
    before = snapshot(v2)
    with pytest.raises(KdcacheError, match=r"made by an older kdcache \(0.2.0, cache format 2\)"):
        precompute(precompute_config(dataset, v2, sharp_weights))
    assert snapshot(v2) == before
    code, rep = _verify(v2, dataset, sharp_weights)
    assert code == 0 and rep["ok"]
