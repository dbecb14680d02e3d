"""The teacher stage end to end on real shards: determinism, replay exactness, resume, shard groups,
bad images."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import NUM_CLASSES, corrupt_jpeg, encode, make_image, precompute_config, sharp_teacher, write_dataset
from kdcache.errors import KdcacheError
from kdcache.models.factory import create_model, normalize
from kdcache.tools.precompute import my_shards, precompute, teacher_batches
from kdcache.data.shards import decode_image, iter_samples
from kdcache.cache.store import ARRAYS, CacheReader
from kdcache.data.views import AugSpec, View, mixup_pairs, sample_view
from kdcache.data.render import render
from kdcache.models.zoo import tiny_cnn

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def assert_same_cache(a, b, shards=None, exact=True):
    ra, rb = CacheReader(str(a)), CacheReader(str(b))
    names = shards or ra.shard_names()
    assert set(names) <= set(rb.shard_names())
    for name in names:
        assert ra.is_complete(name) and rb.is_complete(name), name
        da, db = ra.read_shard(name), rb.read_shard(name)
        assert set(ARRAYS) <= set(da) and sorted(da) == sorted(db)  # sampled/compact caches hold more
        for arr in sorted(da):
            assert da[arr].dtype == db[arr].dtype, (name, arr)
            np.testing.assert_array_equal(da[arr], db[arr], err_msg=f"{name}/{arr}")
        assert ra.shard_attrs(name)["bad"] == rb.shard_attrs(name)["bad"]
        assert ra.view_digests(name) == rb.view_digests(name)


def complete_groups(path: Path) -> dict[str, bool]:
    """Shard groups of a store and their complete flag, read straight from the JSON (cheap to poll)."""
    out = {}
    if not path.is_dir():
        return out
    for d in path.iterdir():
        meta = d / "zarr.json"
        if d.is_dir() and meta.is_file():
            try:
                out[d.name] = bool(json.loads(meta.read_text())["attributes"].get("complete", False))
            except (json.JSONDecodeError, KeyError):
                out[d.name] = False  # being written
    return out


# ---- determinism -------------------------------------------------------------------------------


def test_worker_count_does_not_change_the_cache(cache, dataset, teacher_weights, tmp_path):
    """The session cache ran with workers=0; two workers (each owning whole shards) give the same arrays."""
    summary = precompute(precompute_config(dataset, tmp_path / "w2.zarr", teacher_weights, workers=2))
    assert summary["shards_written"] == 3 and summary["images"] == 21 and summary["records"] == 63
    assert_same_cache(cache, tmp_path / "w2.zarr")
    # and batch size does not change them either (beyond float16 rounding of the same numbers)
    precompute(precompute_config(dataset, tmp_path / "b3.zarr", teacher_weights, batch_size=3))
    a, b = CacheReader(str(cache)).read_shard("train-000000"), CacheReader(str(tmp_path / "b3.zarr")).read_shard("train-000000")
    assert np.array_equal(a["classes"], b["classes"]) and np.array_equal(a["box"], b["box"])
    np.testing.assert_allclose(a["logprobs"].astype(np.float32), b["logprobs"].astype(np.float32), atol=2e-3)


def test_stored_views_are_the_seeded_views(cache, dataset):
    r = CacheReader(str(cache))
    m = r.manifest
    for name in r.shard_names():
        d = r.read_shard(name)
        n = len(d["keys"])
        for i, key in enumerate(d["keys"]):
            h, w = d["size"][i]
            for v in range(m["views"]):
                ref = sample_view(m["seed"], str(key), v, int(w), int(h), AugSpec.from_dict(m["augmentation"]))
                assert tuple(int(t) for t in d["box"][i, v]) == ref.box and bool(d["flip"][i, v]) == ref.flip
        for v in range(m["views"]):
            mw, lam = mixup_pairs(m["seed"], name, v, n)
            assert np.array_equal(d["mix_with"][:, v], mw) and np.array_equal(d["mix_lam"][:, v], lam)
        # sizes are the decoded images' (height, width)
        ims = [decode_image(s) for s in iter_samples(r.shard_attrs(name)["source"])]
        assert d["size"].tolist() == [[im.height, im.width] for im in ims]


# ---- replay exactness --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharp_weights(tmp_path_factory):
    """A tiny teacher with a scaled-up head: confident, so its top-k reacts to every pixel change."""
    model = sharp_teacher(3)
    path = tmp_path_factory.mktemp("sharp") / "sharp.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _replay(reader, name, weights, flip_xor=False, drop_partner=False):
    """Render every stored view of shard ``name`` from the stored geometry and run the teacher again."""
    m = reader.manifest
    d = reader.read_shard(name)
    ims = [decode_image(s) for s in iter_samples(reader.shard_attrs(name)["source"])]
    info = create_model(m["teacher"]["spec"], num_classes=m["teacher"]["num_classes"], weights=str(weights),
                        resolution=m["resolution"])
    model = info.model.eval()

    def view(i, v):
        x, y, w, h = (int(t) for t in d["box"][i, v])
        return View(x, y, w, h, bool(d["flip"][i, v]), int(d["mix_with"][i, v]), float(d["mix_lam"][i, v]))

    pix = []
    for i in range(len(ims)):
        for v in range(m["views"]):
            own = view(i, v)
            if flip_xor:
                own = View(*own.box, not own.flip, own.mix_with, own.mix_lam)
            if drop_partner:
                own = View(*own.box, own.flip)
            partner = (ims[own.mix_with], view(own.mix_with, v)) if own.mixed else (None, None)
            pix.append(render(ims[i], own, m["resolution"], *partner))
    with torch.no_grad():
        logits = model(normalize(torch.stack(pix), m["teacher"]["mean"], m["teacher"]["std"]))
    vals, ids = torch.log_softmax(logits.float(), -1).topk(m["topk"], -1)
    shape = (len(ims), m["views"], m["topk"])
    return d, vals.numpy().reshape(shape), ids.numpy().reshape(shape)


def test_replay_reproduces_stored_topk(dataset, sharp_weights, tmp_path):
    out = tmp_path / "sharp.zarr"
    precompute(precompute_config(dataset, out, sharp_weights, views=4, topk=3, res=40, batch_size=16))
    r = CacheReader(str(out))
    assert r.manifest["teacher"]["weights"] == "sharp.safetensors"
    flip_changed = partner_changed = 0
    for name in r.shard_names():
        d, vals, ids = _replay(r, name, sharp_weights)
        stored = d["logprobs"].astype(np.float32)
        assert (d["mix_with"] >= 0).any()  # mixed views are part of what is replayed
        np.testing.assert_array_equal(ids, d["classes"])
        # within float16 rounding of the stored value (one ulp at its magnitude, plus float32 noise)
        tol = np.spacing(np.abs(d["logprobs"])).astype(np.float32) + 1e-4
        assert (np.abs(vals - stored) <= tol).all(), np.abs(vals - stored).max()
        # the check has teeth: a wrong flip or a forgotten mixup partner does not reproduce the cache
        _, fv, fi = _replay(r, name, sharp_weights, flip_xor=True)
        flip_changed += int(((np.abs(fv - stored) > tol).any(-1) | (fi != d["classes"]).any(-1)).sum())
        _, pv, pi = _replay(r, name, sharp_weights, drop_partner=True)
        mixed = d["mix_with"] >= 0
        partner_changed += int((((np.abs(pv - stored) > tol).any(-1) | (pi != d["classes"]).any(-1)) & mixed).sum())
        total_mixed = int(mixed.sum())
    assert flip_changed >= 0.8 * 21 * 4
    assert partner_changed >= 0.8 * total_mixed


# ---- resume ------------------------------------------------------------------------------------


def test_rerun_skips_complete_and_redoes_incomplete(cache, dataset, teacher_weights, tmp_path):
    out = tmp_path / "c.zarr"
    shutil.copytree(cache, out)
    root = zarr.open_group(str(out), mode="r+")
    # simulate a group interrupted mid-write: flagged incomplete, its arrays half-written garbage
    g = root["train-000001"]
    g.attrs["complete"] = False
    g["logprobs"][...] = 0
    g["classes"][...] = 0
    mtimes = {s: (out / s / "logprobs" / "zarr.json").stat().st_mtime_ns for s in ("train-000000", "train-000002")}
    summary = precompute(precompute_config(dataset, out, teacher_weights))
    assert summary["shards_skipped"] == 2 and summary["shards_written"] == 1
    assert_same_cache(cache, out)
    assert mtimes == {s: (out / s / "logprobs" / "zarr.json").stat().st_mtime_ns for s in mtimes}
    # a group that never got created is written too; a complete cache is a no-op
    del root["train-000002"]
    assert precompute(precompute_config(dataset, out, teacher_weights))["shards_written"] == 1
    again = precompute(precompute_config(dataset, out, teacher_weights))
    assert again["shards_written"] == 0 and again["shards_skipped"] == 3
    assert_same_cache(cache, out)


@pytest.mark.parametrize(
    "change,expect",
    [
        (dict(seed=8), "seed: cache has 7, this run has 8"),
        (dict(topk=2), "topk: cache has 3, this run has 2"),
        (dict(mixup=False), "augmentation.mixup: cache has True, this run has False"),
        (dict(scale=(0.2, 1.0)), "augmentation.scale: cache has [0.08, 1.0], this run has [0.2, 1.0]"),
        (dict(res=48), "resolution: cache has 32, this run has 48"),
        (dict(mean=(0.5, 0.5, 0.5)), "teacher.mean: cache has [0.485, 0.456, 0.406], this run has [0.5, 0.5, 0.5]"),
        ("weights", "teacher.weights_sha256: cache has"),
        (dict(batch_size=16), "compute.batch_size: cache has 8, this run has 16"),
    ],
)
def test_other_settings_are_refused(cache, dataset, teacher_weights, tmp_path, change, expect):
    out = tmp_path / "c.zarr"
    shutil.copytree(cache, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    weights = teacher_weights
    if change == "weights":
        torch.manual_seed(99)
        weights = tmp_path / "teacher.pt"  # same file name, other weights
        torch.save(tiny_cnn(NUM_CLASSES).state_dict(), weights)
        change = {}
    with pytest.raises(KdcacheError) as ei:
        precompute(precompute_config(dataset, out, weights, **change))
    assert "made with other settings" in str(ei.value) and expect in str(ei.value)
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*")}  # nothing touched


def test_teacher_batches_are_a_function_of_the_shard():
    """Records in tar order with all their views, bad records left out, cut every batch_size."""
    valid = np.array([True, False, True, True])
    batches = teacher_batches(valid, 2, 4)
    assert [b.tolist() for b in batches] == [[[0, 0], [0, 1], [2, 0], [2, 1]], [[3, 0], [3, 1]]]
    assert all(b.dtype == np.int64 for b in batches)
    assert teacher_batches(np.zeros(3, dtype=bool), 2, 4) == []
    # a group grown from 1 view to 3: only views 1 and 2 of each record
    grown = teacher_batches(np.array([True, False, True]), 3, 3, first=1)
    assert [b.tolist() for b in grown] == [[[0, 1], [0, 2], [2, 1]], [[2, 2]]]
    assert [len(b) for b in teacher_batches(np.ones(5, dtype=bool), 3, 4)] == [4, 4, 4, 3]


def test_manifest_records_how_the_teacher_ran(cache):
    assert CacheReader(str(cache)).manifest["compute"] == {"batch_size": 8, "device": "cpu", "precision": "fp32"}


def test_teacher_sees_the_same_batches_however_the_run_is_split(dataset, teacher_weights, tmp_path, monkeypatch):
    """Whatever the worker count and whichever shards a previous run finished, every teacher call
    gets the batch ``teacher_batches`` defines for its shard, never a mix of shards."""
    import kdcache.tools.precompute as pc

    seen = []
    real = pc.raise_if_error  # the main process's first look at every item a worker sends

    def spy(item):
        if isinstance(item, pc.RecordBatch):
            seen.append((item.name, item.index.tolist(), item.view.tolist()))
        return real(item)

    monkeypatch.setattr(pc, "raise_if_error", spy)
    runs = {}
    for label, workers in (("one pass", 0), ("2 workers", 2), ("resumed", 0)):
        out = tmp_path / f"{label}.zarr"
        if label == "resumed":  # a previous run that finished only train-000001
            precompute(precompute_config(dataset, out, teacher_weights, workers=workers))
            for name in ("train-000000", "train-000002"):
                zarr.open_group(str(out), mode="r+")[name].attrs["complete"] = False
        seen.clear()
        precompute(precompute_config(dataset, out, teacher_weights, workers=workers))
        runs[label] = sorted(seen)
    reader = CacheReader(str(tmp_path / "one pass.zarr"))
    expect = []
    for name in reader.shard_names():
        valid = reader.sizes(name)[:, 0] >= 0
        expect += [(name, b[:, 0].tolist(), b[:, 1].tolist()) for b in teacher_batches(valid, reader.views, 8)]
    assert runs["one pass"] == runs["2 workers"] == sorted(expect)
    assert runs["resumed"] == sorted(e for e in expect if e[0] != "train-000001")
    for label in ("2 workers", "resumed"):
        assert_same_cache(tmp_path / "one pass.zarr", tmp_path / f"{label}.zarr")


# ---- shard groups and ranks --------------------------------------------------------------------


def test_shard_groups_are_disjoint_and_cover_everything(cache, dataset, teacher_weights, tmp_path):
    out = tmp_path / "g.zarr"
    s0 = precompute(precompute_config(dataset, out, teacher_weights, shard_index=0, num_shard_groups=2))
    assert s0["shards_mine"] == 2 and s0["shards_written"] == 2
    assert sorted(n for n, c in complete_groups(out).items() if c) == ["train-000000", "train-000002"]
    s1 = precompute(precompute_config(dataset, out, teacher_weights, shard_index=1, num_shard_groups=2))
    assert s1["shards_mine"] == 1 and s1["shards_written"] == 1
    assert_same_cache(cache, out)
    with pytest.raises(KdcacheError, match=r"--shard-index must be in \[0, --num-shard-groups\); got 2 of 2"):
        precompute(precompute_config(dataset, out, teacher_weights, shard_index=2, num_shard_groups=2))


def test_my_shards_partition():
    urls = [f"s{i}" for i in range(11)]
    for groups in (1, 2, 3):
        for world in (1, 2, 4):
            parts = [my_shards(urls, g, groups, r, world) for g in range(groups) for r in range(world)]
            flat = [u for p in parts for u in p]
            assert sorted(flat) == sorted(urls) and len(flat) == len(set(flat))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


# ---- bad images --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory):
    """Two shards; in the first, record 2 of 7 is a truncated JPEG."""
    root = tmp_path_factory.mktemp("bad") / "train"
    write_dataset(root, shards=2, per_shard=7, seed=5)
    import webdataset as wds

    samples = list(iter_samples(str(root / "train-000000.tar")))
    with wds.TarWriter(str(root / "train-000000.tar")) as w:
        for i, s in enumerate(samples):
            w.write({"__key__": s.key, "jpg" if i == 2 else s.ext: corrupt_jpeg() if i == 2 else s.image,
                     "cls": str(s.cls).encode()})
    return root


def test_bad_image_stops_the_run(bad_dataset, teacher_weights, tmp_path):
    out = tmp_path / "c.zarr"
    with pytest.raises(KdcacheError) as ei:
        precompute(precompute_config(bad_dataset, out, teacher_weights))
    msg = str(ei.value)
    assert "'train0_0002'" in msg and "train-000000.tar" in msg and "truncated" in msg and "--skip-bad" in msg
    assert not any(complete_groups(out).values())


def test_skip_bad_keeps_arrays_aligned(bad_dataset, teacher_weights, tmp_path):
    out = tmp_path / "c.zarr"
    summary = precompute(precompute_config(bad_dataset, out, teacher_weights, skip_bad=True, views=4))
    assert summary["bad"] == 1 and summary["images"] == 13 and summary["records"] == 13 * 4
    r = CacheReader(str(out))
    d = r.read_shard("train-000000")
    attrs = r.shard_attrs("train-000000")
    assert list(attrs["bad"]) == ["train0_0002"] and "truncated" in attrs["bad"]["train0_0002"]
    assert r.read_view("train-000000", 0).bad == frozenset({"train0_0002"})
    assert r.shard_attrs("train-000001")["bad"] == {}
    # keys still in tar order, one row per sample
    assert d["keys"].tolist() == [s.key for s in iter_samples(str(bad_dataset / "train-000000.tar"))]
    assert all(d[a].shape[0] == 7 for a in ARRAYS)
    b = 2
    assert d["size"][b].tolist() == [-1, -1]
    assert (d["classes"][b] == -1).all() and np.isneginf(d["logprobs"][b]).all()
    assert (d["box"][b] == 0).all() and not d["flip"][b].any()
    assert (d["mix_with"][b] == -1).all() and (d["mix_lam"][b] == 1.0).all()
    # nobody mixes with the bad record: its would-be partner stays unmixed; the other pairs are untouched
    for v in range(4):
        mw, lam = mixup_pairs(7, "train-000000", v, 7)
        partner = mw[b]
        expect_mw, expect_lam = mw.copy(), lam.copy()
        expect_mw[[b]] = -1
        expect_lam[[b]] = 1.0
        if partner >= 0:
            expect_mw[partner], expect_lam[partner] = -1, 1.0
        assert np.array_equal(d["mix_with"][:, v], expect_mw) and np.array_equal(d["mix_lam"][:, v], expect_lam)
    assert not (d["mix_with"] == b).any()
    # good records are ordinary: valid top-k from the teacher
    good = np.arange(7) != b
    assert ((d["classes"][good] >= 0) & (d["classes"][good] < NUM_CLASSES)).all()
    assert np.isfinite(d["logprobs"][good].astype(np.float32)).all()


def test_empty_shard_and_all_bad_shard(teacher_weights, tmp_path):
    from conftest import write_tar

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    write_tar(data / "a-0.tar", [])
    write_tar(data / "a-1.tar", [("x.jpg", corrupt_jpeg()), ("y.png", b"\x89PNG broken")])
    write_tar(data / "a-2.tar", [("z.jpg", encode(make_image(rng, 30, 30, 0), "jpg"))])
    out = tmp_path / "c.zarr"
    summary = precompute(precompute_config(data, out, teacher_weights, skip_bad=True))
    assert summary["shards_written"] == 3 and summary["images"] == 1 and summary["bad"] == 2
    r = CacheReader(str(out))
    assert len(r.read_view("a-0", 0)) == 0 and set(r.shard_attrs("a-1")["bad"]) == {"x", "y"}
    assert (r.read_shard("a-1")["classes"] == -1).all()


# ---- the real process: killed mid-run, resumed; concurrent shard groups --------------------------


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    write_dataset(root / "train", shards=10, per_shard=4, seed=3)
    torch.manual_seed(1)
    torch.save(tiny_cnn(NUM_CLASSES).state_dict(), root / "slow.pt")
    return root


def _cli_args(data, out, weights, *extra):
    return [sys.executable, "-m", "kdcache", "precompute", "--data", str(data), "--teacher", "py:testmodels:slow_cnn",
            "--teacher-weights", str(weights), "--num-classes", str(NUM_CLASSES), "--out", str(out), "-V", "2",
            "-k", "3", "--seed", "5", "--res", "32", "--mixup", "-b", "8", "--workers", "0", "--device", "cpu",
            "--no-progress", *extra]


def _env(delay):
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]), KD_TEST_DELAY=str(delay))


@pytest.fixture(scope="module")
def many_reference(many_shards):
    """The uninterrupted run, in-process (the teacher's sleep is off: it does not change the outputs)."""
    out = many_shards / "reference.zarr"
    cfg = precompute_config(many_shards / "train", out, many_shards / "slow.pt", teacher="py:testmodels:slow_cnn",
                            views=2, topk=3, seed=5, res=32, mixup=True, batch_size=8)
    assert precompute(cfg)["shards_written"] == 10
    return out


def kill_after_some_groups(args, out) -> None:
    """Run precompute (slowed down) and SIGKILL it once 1 to 7 of its 10 groups are complete."""
    proc = subprocess.Popen(args, env=_env(0.3), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if 1 <= sum(complete_groups(out).values()) <= 7:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]


def test_killed_run_resumes_to_the_same_cache(many_shards, many_reference, tmp_path):
    out = tmp_path / "killed.zarr"
    args = _cli_args(many_shards / "train", out, many_shards / "slow.pt")
    kill_after_some_groups(args, out)
    at_kill = complete_groups(out)
    finished = sorted(n for n, c in at_kill.items() if c)
    assert 1 <= len(finished) < 10 and len(at_kill) - len(finished) + (10 - len(at_kill)) >= 2
    mtimes = {n: (out / n / "zarr.json").stat().st_mtime_ns for n in finished}
    # the same command again finishes the job: complete groups are skipped, the rest (re)done
    res = subprocess.run(args, env=_env(0), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["shards_skipped"] == len(finished) and summary["shards_written"] == 10 - len(finished)
    assert mtimes == {n: (out / n / "zarr.json").stat().st_mtime_ns for n in finished}
    assert all(complete_groups(out).values()) and len(complete_groups(out)) == 10
    assert_same_cache(many_reference, out)


@pytest.fixture(scope="module")
def many_reference_sampled(many_shards):
    """The uninterrupted run with sampled targets in the compact layout."""
    out = many_shards / "reference-sampled.zarr"
    cfg = precompute_config(many_shards / "train", out, many_shards / "slow.pt", teacher="py:testmodels:slow_cnn",
                            views=2, topk=3, seed=5, res=32, mixup=True, batch_size=8, targets="sample", samples=6,
                            compact=True)
    assert precompute(cfg)["shards_written"] == 10
    return out


def test_killed_sampled_run_resumes_to_the_same_cache(many_shards, many_reference_sampled, tmp_path):
    """Sampled targets are drawn per record from (seed, key, view): a run killed mid-way and resumed
    holds the draws (and the digests) of an uninterrupted run, bit for bit."""
    out = tmp_path / "killed-sampled.zarr"
    args = _cli_args(many_shards / "train", out, many_shards / "slow.pt", "--targets", "sample", "--samples", "6",
                     "--compact")
    kill_after_some_groups(args, out)
    finished = sorted(n for n, c in complete_groups(out).items() if c)
    assert 1 <= len(finished) < 10
    res = subprocess.run(args, env=_env(0), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["shards_skipped"] == len(finished)
    assert_same_cache(many_reference_sampled, out)
    r = CacheReader(str(out))
    assert r.kind == "sample" and r.layout == "compact" and "counts" in r.read_shard("train-000003")


@pytest.mark.slow
def test_concurrent_shard_groups_via_cli(many_shards, many_reference, tmp_path):
    """Two processes started together, --shard-index 0 and 1 of 2, into one new store."""
    out = tmp_path / "groups.zarr"
    procs = [subprocess.Popen(_cli_args(many_shards / "train", out, many_shards / "slow.pt", "--shard-index", str(i),
                                        "--num-shard-groups", "2"), env=_env(0), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, results):
        assert p.returncode == 0, e[-2000:]
    summaries = [json.loads(o.strip().splitlines()[-1]) for o, _ in results]
    assert [s["shards_written"] for s in summaries] == [5, 5]
    assert CacheReader(str(out)).shard_names() == [f"train-{i:06d}" for i in range(10)]
    assert_same_cache(many_reference, out)


@pytest.mark.slow
def test_torchrun_ranks_write_disjoint_shards(many_shards, many_reference, tmp_path):
    out = tmp_path / "ranks.zarr"
    torchrun = Path(sys.executable).with_name("torchrun")
    args = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m"] + _cli_args(many_shards / "train", out,
                                                                                        many_shards / "slow.pt")[2:]
    res = subprocess.run(args, env=_env(0), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summaries = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert sorted(s["shards_written"] for s in summaries) == [5, 5]
    assert_same_cache(many_reference, out)
