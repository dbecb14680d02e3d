"""The replay stream: exact views, targets joined by key, mixing, coverage, resume skipping, ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import NUM_CLASSES, TEACHER
from kdcache.errors import KdcacheError
from kdcache.models.factory import create_model
from kdcache.models.teacher import Teacher, topk_tensors
from kdcache.learn.replay import (
    EpochPlan, ReplayStream, ShardInfo, StreamConfig, epoch_batches, prepare_shards,
)
from kdcache.data.shards import decode_shard, expand_urls, iter_samples, scan_keys, shard_name
from kdcache.cache.store import CacheReader
from kdcache.data.views import AugSpec, sample_shard_views
from kdcache.data.render import render

RES = 32  # the conftest cache's teacher resolution


def make_stream(dataset, cache=None, *, batch_size=4, res=RES, workers=0, rank=0, world=1, **kw) -> ReplayStream:
    urls = expand_urls(str(dataset))
    reader = CacheReader(str(cache)) if cache is not None else None
    shards = prepare_shards(urls, reader, need_labels=True)
    return ReplayStream(shards, StreamConfig(
        batch_size=batch_size, res=res, cache=str(cache) if cache is not None else None, workers=workers,
        rank=rank, world=world, need_labels=True, num_classes=NUM_CLASSES, shuffle_buffer=kw.pop("shuffle_buffer", 8), **kw,
    ))


def pairs(batches):
    return [(k, b.view) for b in batches for k in b.keys]


def test_prepare_shards_counts_and_scan(dataset, cache):
    urls = expand_urls(str(dataset))
    shards = prepare_shards(urls, CacheReader(str(cache)), need_labels=True)
    assert [s.count for s in shards] == [7, 7, 7]
    keys, has_cls = scan_keys(urls[0])
    assert keys == [s.key for s in iter_samples(urls[0])]
    assert all(has_cls)


def test_coverage_independent_of_workers(dataset, cache):
    all_keys = {s.key for u in expand_urls(str(dataset)) for s in iter_samples(u)}
    covered = {}
    for workers in (0, 2):
        st = make_stream(dataset, cache, workers=workers)
        for epoch in (0, 1, 4):
            bs = list(epoch_batches(st, epoch))
            assert len(bs) == st.plan(epoch).steps == 6  # ceil(21 / 4)
            assert all(b.view == epoch % 3 for b in bs)  # epoch e replays view e mod V
            got = pairs(bs)
            assert len(got) == len(set(got)) == 21  # every record exactly once
            assert {k for k, _ in got} == all_keys
            covered.setdefault(epoch, set(got))
            assert set(got) == covered[epoch]
    # the order differs between epochs (seeded per epoch)
    st = make_stream(dataset, cache)
    assert pairs(epoch_batches(st, 0)) != pairs(epoch_batches(st, 3))
    # deterministic for a given seed and epoch
    assert [k for k, _ in pairs(epoch_batches(st, 1))] == [k for k, _ in pairs(epoch_batches(st, 1))]


def test_cached_targets_equal_teacher_on_batch_images(dataset, cache, teacher_weights):
    reader = CacheReader(str(cache))
    info = create_model(TEACHER, num_classes=NUM_CLASSES, weights=str(teacher_weights), resolution=RES)
    model = info.model.eval()
    cached = list(epoch_batches(make_stream(dataset, cache, batch_size=8), 1))
    live = list(epoch_batches(make_stream(dataset, cache, batch_size=8, with_targets=False), 1))
    for cb, lb in zip(cached, live):
        # the live stream replays the same views: same records, same pixels
        assert cb.keys == lb.keys and lb.logprobs is None
        assert torch.equal(cb.pixels("cpu"), lb.pixels("cpu"))
        with torch.no_grad():
            teacher = Teacher(model, info.mean, info.std, torch.device("cpu"), NUM_CLASSES)
            vals, ids = (t.numpy() for t in topk_tensors(teacher, lb.pixels("cpu"), reader.topk))
        assert np.array_equal(ids, cb.classes.numpy())
        np.testing.assert_array_equal(vals, cb.logprobs.numpy())
        assert cb.logprobs.dtype == torch.float16


def test_mixed_records_render_as_precompute(dataset, cache):
    reader = CacheReader(str(cache))
    urls = {shard_name(u): u for u in expand_urls(str(dataset))}
    decoded = {n: decode_shard(u) for n, u in urls.items()}
    arrays = {n: reader.read_shard(n) for n in urls}
    labels = {n: [s.cls for s in iter_samples(u)] for n, u in urls.items()}
    epoch = 2
    seen_mixed = 0
    for b in epoch_batches(make_stream(dataset, cache, batch_size=5), epoch):
        pix = b.pixels("cpu")
        soft = b.label_targets(NUM_CLASSES, "cpu")
        for j in range(len(b)):
            name, i = b.shards[j], int(b.index[j])
            a = arrays[name]
            images = decoded[name].images
            assert a["keys"][i] == b.keys[j]
            from kdcache.data.views import ShardViews

            sv = ShardViews(a["box"], a["flip"], a["mix_with"], a["mix_lam"])
            view = sv.view(i, b.view)
            partner = int(a["mix_with"][i, b.view])
            if partner >= 0:
                seen_mixed += 1
                expect = render(images[i], view, RES, images[partner], sv.view(partner, b.view))
                lam = float(a["mix_lam"][i, b.view])
                assert lam == pytest.approx(float(b.lam[j]))
                row = torch.zeros(NUM_CLASSES)
                row[labels[name][i]] += lam
                row[labels[name][partner]] += 1 - lam
                assert torch.allclose(soft[j], row)
            else:
                expect = render(images[i], view, RES)
            assert torch.equal(pix[j], expect), b.keys[j]
    assert seen_mixed > 10


def test_views_without_cache_equal_cached_views(dataset, cache):
    """Labels-only / live without a cache draws the views precompute drew (same seed, aug, V)."""
    reader = CacheReader(str(cache))
    aug = AugSpec.from_dict(reader.manifest["augmentation"])
    with_cache = make_stream(dataset, cache, with_targets=False)
    no_cache = make_stream(dataset, None, views=reader.views, view_seed=reader.manifest["seed"], aug=aug)
    for epoch in (0, 4):
        a = {k: p for b in epoch_batches(with_cache, epoch) for k, p in zip(b.keys, b.pixels("cpu"))}
        b = {k: p for b in epoch_batches(no_cache, epoch) for k, p in zip(b.keys, b.pixels("cpu"))}
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    # one view drawn alone is exactly the per-view slice of what precompute stores
    name = reader.shard_names()[0]
    arr = reader.read_shard(name)
    valid = np.ones(len(arr["keys"]), dtype=bool)
    for v in range(reader.views):
        one = sample_shard_views(reader.manifest["seed"], name, list(arr["keys"]), arr["size"], [v], aug, valid=valid)
        box, flip, mw, ml = one.box[:, 0], one.flip[:, 0], one.mix_with[:, 0], one.mix_lam[:, 0]
        assert np.array_equal(box, arr["box"][:, v]) and np.array_equal(flip, arr["flip"][:, v])
        assert np.array_equal(mw, arr["mix_with"][:, v]) and np.array_equal(ml, arr["mix_lam"][:, v])
    # without V, every epoch gets a fresh view index
    fresh = make_stream(dataset, None, views=None, view_seed=7, aug=aug)
    assert [fresh.view_index(e) for e in (0, 3, 5)] == [0, 3, 5]


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_batches_reproduces_the_rest_of_the_epoch(dataset, cache, workers):
    st = make_stream(dataset, cache, batch_size=3, workers=workers)
    full = list(epoch_batches(st, 1))
    for skip in (1, 4):
        rest = list(epoch_batches(st, 1, skip_batches=skip))
        assert [b.keys for b in rest] == [b.keys for b in full[skip:]]
        assert all(torch.equal(x.own, y.own) and torch.equal(x.logprobs, y.logprobs) for x, y in zip(rest, full[skip:]))


def test_ranks_split_records_and_run_equal_steps(dataset, cache):
    """Two ranks (simulated in-process): equal step counts, disjoint records, union = all (no drop)."""
    for workers in (0, 2):
        got, steps = [], []
        for rank in range(2):
            st = make_stream(dataset, cache, batch_size=2, workers=workers, rank=rank, world=2)
            bs = list(epoch_batches(st, 0))
            steps.append(len(bs))
            got += pairs(bs)
        assert steps[0] == steps[1]
        plan = st.plan(0)
        # 3 shards of 7 over 2 ranks: 14 and 7 records; both stop at ceil(7 / 2) = 4 steps
        assert sorted(plan.rank_counts) == [7, 14] and plan.steps == 4 and plan.dropped == 14 - 8
        assert len(got) == len(set(got)) == 21 - plan.dropped


def test_plan_balances_and_is_a_pure_function():
    shards = [ShardInfo(f"s{i}.tar", f"s{i}", n) for i, n in enumerate([10, 10, 10, 10, 9, 11])]
    st = ReplayStream(shards, StreamConfig(batch_size=4, res=8, world=2, rank=0, workers=3))
    p = st.plan(5)
    assert isinstance(p, EpochPlan) and p == st.plan(5)
    assert sorted(p.rank_counts) == [30, 30] and p.dropped == 0
    assert sorted(i for r in p.rank_shards for i in r) == list(range(6))
    assert sum(p.worker_counts) == p.rank_counts[0]
    # every worker's chunks come back round-robin; the skip counts cover whole chunks only
    order = p.chunk_order()
    assert sum(n for _, n in order) == p.rank_counts[0]
    assert p.skip_chunks(0) == [0, 0, 0] and sum(p.skip_chunks(p.steps)) == len(order)
    with pytest.raises(KdcacheError, match="cannot feed 8 ranks"):
        ReplayStream(shards, StreamConfig(batch_size=4, res=8, world=8)).plan(0)


def test_key_and_size_mismatch_name_shard_and_key(dataset, cache, tmp_path):
    import webdataset as wds

    from conftest import make_image, encode

    urls = expand_urls(str(dataset))
    # same shard names and keys, one image of another size
    other = tmp_path / "other"
    other.mkdir()
    rng = np.random.default_rng(5)
    for u in urls:
        with wds.TarWriter(str(other / (shard_name(u) + ".tar"))) as w:
            for j, s in enumerate(iter_samples(u)):
                data = s.image if not (j == 3 and u == urls[1]) else encode(make_image(rng, 61, 17, 0), "png")
                w.write({"__key__": s.key, ("png" if j == 3 and u == urls[1] else s.ext): data, "cls": str(s.cls).encode()})
    st = make_stream(other, cache)
    with pytest.raises(KdcacheError, match=r"'train1_0003' in shard .*train-000001.tar is 61x17 px \(WxH\)"):
        list(epoch_batches(st, 0))
    # a renamed key: caught before training by the header scan
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for u in urls:
        with wds.TarWriter(str(renamed / (shard_name(u) + ".tar"))) as w:
            for j, s in enumerate(iter_samples(u)):
                key = "zz_renamed" if (j == 2 and u == urls[2]) else s.key
                w.write({"__key__": key, s.ext: s.image, "cls": str(s.cls).encode()})
    with pytest.raises(KdcacheError, match=r"train-000002.tar does not match .* record 2 \(data has 'zz_renamed', cache has 'train2_0002'"):
        prepare_shards(expand_urls(str(renamed)), CacheReader(str(cache)), need_labels=False)


def test_bad_records_are_skipped(tmp_path, teacher_weights):
    """A record precompute marked bad (undecodable) is left out; counts come from the cache attrs."""
    import webdataset as wds

    from conftest import encode, make_image, precompute_config
    from kdcache.tools.precompute import precompute

    rng = np.random.default_rng(3)
    data = tmp_path / "data"
    data.mkdir()
    for s in range(2):
        with wds.TarWriter(str(data / f"part-{s:06d}.tar")) as w:
            for i in range(5):
                img = encode(make_image(rng, 40, 30, i % NUM_CLASSES), "jpg")
                if (s, i) == (1, 2):
                    img = img[: len(img) // 2]  # header opens, pixels do not decode
                w.write({"__key__": f"p{s}_{i}", "jpg": img, "cls": str(i % NUM_CLASSES).encode()})
    cache = tmp_path / "c.zarr"
    precompute(precompute_config(data, cache, teacher_weights, skip_bad=True))
    reader = CacheReader(str(cache))
    assert "p1_2" in reader.shard_attrs("part-000001")["bad"]
    shards = prepare_shards(expand_urls(str(data)), reader, need_labels=True)
    assert [s.count for s in shards] == [5, 4]
    assert shards[0].bad == {} and list(shards[1].bad) == ["p1_2"]  # the cache's list, as the trainer reports it
    for workers in (0, 2):
        st = ReplayStream(shards, StreamConfig(batch_size=4, res=RES, cache=str(cache), workers=workers,
                                               need_labels=True, num_classes=NUM_CLASSES))
        got = pairs(epoch_batches(st, 0))
        assert len(got) == 9 and "p1_2" not in {k for k, _ in got}


# ---- --skip-bad without a cache ----------------------------------------------------------------

BAD_KEY = "train0_0002"


@pytest.fixture(scope="module")
def bad_data(dataset, tmp_path_factory):
    """The dataset (3 shards x 7) with record 2 of train-000000 replaced by a truncated JPEG."""
    import webdataset as wds

    from conftest import corrupt_jpeg

    root = tmp_path_factory.mktemp("replay_bad") / "train"
    root.mkdir(parents=True)
    for u in expand_urls(str(dataset)):
        with wds.TarWriter(str(root / (shard_name(u) + ".tar"))) as w:
            for j, s in enumerate(iter_samples(u)):
                bad = j == 2 and shard_name(u) == "train-000000"
                w.write({"__key__": s.key, ("jpg" if bad else s.ext): (corrupt_jpeg() if bad else s.image),
                         "cls": str(s.cls).encode()})
    return root


def test_skip_bad_without_cache_counts_skips_and_never_mixes_the_bad_record(bad_data, teacher_weights, tmp_path):
    from kdcache.tools.precompute import precompute
    from kdcache.data.views import mixup_pairs

    from conftest import precompute_config

    urls = expand_urls(str(bad_data))
    aug = AugSpec(mixup=True)
    # without skip_bad the header scan counts 7 and the stream stops at the bad image, naming it
    plain = make_stream(bad_data, None, views=3, view_seed=7, aug=aug)
    assert [s.count for s in plain.shards] == [7, 7, 7]
    with pytest.raises(KdcacheError, match=rf"'{BAD_KEY}' in shard .*train-000000.tar.*--skip-bad"):
        list(epoch_batches(plain, 0))
    # skip_bad: every image is decoded once before training; the bad one is recorded and not counted
    shards = prepare_shards(urls, None, need_labels=True, skip_bad=True)
    assert [s.count for s in shards] == [6, 7, 7]
    assert list(shards[0].bad) == [BAD_KEY] and shards[1].bad == shards[2].bad == {}
    # (the bad record has a mixup partner in some view, so the partner rule is exercised below)
    assert any(mixup_pairs(7, "train-000000", v, 7)[0][2] >= 0 for v in range(3))
    # precompute --skip-bad on the same data with the same seed, aug and V: the same views, pixel for pixel
    cache = tmp_path / "c.zarr"
    precompute(precompute_config(bad_data, cache, teacher_weights, skip_bad=True))  # seed 7, V=3, mixup
    assert AugSpec.from_dict(CacheReader(str(cache)).manifest["augmentation"]) == aug
    cached = make_stream(bad_data, cache, with_targets=False)
    for workers in (0, 2):
        st = ReplayStream(shards, StreamConfig(
            batch_size=4, res=RES, workers=workers, need_labels=True, num_classes=NUM_CLASSES, shuffle_buffer=8,
            views=3, view_seed=7, aug=aug, skip_bad=True,
        ))
        for epoch in (0, 1, 2):
            bs = list(epoch_batches(st, epoch))
            assert len(bs) == st.plan(epoch).steps == 5  # ceil(20 / 4)
            keys = [k for b in bs for k in b.keys]
            assert len(keys) == len(set(keys)) == 20 and BAD_KEY not in keys
            # the precompute rule: a record whose partner is bad stays unmixed, the other pairs are untouched
            mw, lam = mixup_pairs(7, "train-000000", epoch, 7)
            expect_lam = lam.astype(np.float32)
            expect_lam[2] = 1.0
            if mw[2] >= 0:
                expect_lam[mw[2]] = 1.0
            got_lam = {int(i): float(l) for b in bs for s, i, l in zip(b.shards, b.index, b.lam) if s == "train-000000"}
            assert got_lam == {i: float(expect_lam[i]) for i in range(7) if i != 2}
            a = {k: p for b in bs for k, p in zip(b.keys, b.pixels("cpu"))}
            c = {k: p for b in epoch_batches(cached, epoch) for k, p in zip(b.keys, b.pixels("cpu"))}
            assert a.keys() == c.keys() and all(torch.equal(a[k], c[k]) for k in a)


def test_skip_bad_stream_refuses_data_that_changed(dataset, bad_data):
    from dataclasses import replace

    cfg = dict(batch_size=4, res=RES, need_labels=True, num_classes=NUM_CLASSES, skip_bad=True)
    good = prepare_shards(expand_urls(str(dataset)), None, need_labels=True, skip_bad=True)
    bad = prepare_shards(expand_urls(str(bad_data)), None, need_labels=True, skip_bad=True)
    assert [s.bad for s in good] == [{}, {}, {}]
    # an image that decoded before training fails now
    swapped = [replace(g, url=b.url) for g, b in zip(good, bad)]
    with pytest.raises(KdcacheError, match=rf"'{BAD_KEY}' in shard .*train-000000.tar.*changed during the run"):
        list(epoch_batches(ReplayStream(swapped, StreamConfig(**cfg)), 0))
    # an image listed as bad decodes now
    swapped = [replace(b, url=g.url) for g, b in zip(good, bad)]
    with pytest.raises(KdcacheError, match=rf"'{BAD_KEY}' in shard .*train-000000.tar.*changed during the run"):
        list(epoch_batches(ReplayStream(swapped, StreamConfig(**cfg)), 0))
