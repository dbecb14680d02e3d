"""The store, format v1 (DESIGN §2, docs/format.md): arrays, dtypes, layout, manifest, validation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec

from conftest import NUM_CLASSES, TEACHER
from kdcache import __version__
from kdcache.errors import KdcacheError
from kdcache.store import (
    ARRAYS,
    FORMAT_VERSION,
    CacheReader,
    CacheWriter,
    make_manifest,
    manifest_differences,
)
from kdcache.views import render_backend

SHARDS = ["train-000000", "train-000001", "train-000002"]
DTYPES = {
    "size": np.int32, "logprobs": np.float16, "classes": np.int16, "box": np.uint16, "flip": np.bool_,
    "mix_with": np.int32, "mix_lam": np.float16,
}


def test_cache_arrays_and_dtypes(cache):
    r = CacheReader(str(cache))
    assert r.shard_names() == SHARDS and all(r.is_complete(s) for s in SHARDS)
    for name in SHARDS:
        d = r.read_shard(name)
        n = 7
        assert d["keys"].tolist() == [f"train{name[-1]}_{i:04d}" for i in range(n)]
        for a, dt in DTYPES.items():
            assert d[a].dtype == dt, a
        assert d["size"].shape == (n, 2) and d["logprobs"].shape == (n, 3, 3) and d["classes"].shape == (n, 3, 3)
        assert d["box"].shape == (n, 3, 4) and d["flip"].shape == d["mix_with"].shape == d["mix_lam"].shape == (n, 3)
        # values: log-probs of a distribution, sorted descending, distinct valid class ids per view
        lp = d["logprobs"].astype(np.float32)
        assert (lp <= 0).all() and (np.diff(lp, axis=-1) <= 0).all()
        assert (np.exp(lp).sum(-1) <= 1.0 + 3e-3).all()
        c = d["classes"]
        assert ((c >= 0) & (c < NUM_CLASSES)).all()
        assert all(len(set(row)) == 3 for row in c.reshape(-1, 3).tolist())
        # boxes inside the source image (size is height, width)
        h, w = d["size"][:, None, 0], d["size"][:, None, 1]
        x, y, bw, bh = (d["box"][..., i].astype(int) for i in range(4))
        assert (bw >= 1).all() and (bh >= 1).all() and (x + bw <= w).all() and (y + bh <= h).all()
        # mixup on: pairs inside the shard, symmetric, one λ >= 0.5 per pair; 7 records -> one unmixed per view
        mw, lam = d["mix_with"], d["mix_lam"]
        for v in range(3):
            m = mw[:, v]
            idx = np.flatnonzero(m >= 0)
            assert len(idx) == 6 and (m[m[idx]] == idx).all()
            assert (lam[idx, v] >= 0.5).all() and (lam[idx, v] == lam[m[idx], v]).all()
            assert (lam[m < 0, v] == 1.0).all()
        attrs = r.shard_attrs(name)
        assert attrs["complete"] is True and attrs["num_samples"] == n and attrs["bad"] == {}
        assert attrs["source"].endswith(f"{name}.tar") and attrs["render"] == render_backend()


def test_manifest_fields(cache, dataset):
    m = CacheReader(str(cache)).manifest
    assert m["format_version"] == FORMAT_VERSION == 1 and m["kdcache_version"] == __version__
    assert m["teacher"]["spec"] == TEACHER and m["teacher"]["num_classes"] == NUM_CLASSES
    assert m["teacher"]["weights"] == "teacher.pt" and len(m["teacher"]["weights_sha256"]) == 64
    assert m["teacher"]["mean"] == [0.485, 0.456, 0.406] and m["teacher"]["std"] == [0.229, 0.224, 0.225]
    assert m["augmentation"] == {"scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "flip": True, "mixup": True,
                                 "name": "inception_crop", "version": 1}
    assert (m["seed"], m["views"], m["topk"], m["resolution"]) == (7, 3, 3, 32)
    assert m["render"] == render_backend() and m["render"]["resample"] == "bilinear"
    assert m["render"]["pil"] in ("Pillow", "Pillow-SIMD")
    assert m["shards"] == SHARDS and m["sources"] == [str(dataset / f"{s}.tar") for s in SHARDS]
    assert m["class_names"] == [f"class_{c}" for c in range(NUM_CLASSES)]
    # plain JSON in zarr.json, nothing pickled
    raw = json.loads((cache / "zarr.json").read_text())
    assert raw["zarr_format"] == 3 and raw["node_type"] == "group" and raw["attributes"]["kdcache"] == m


def test_layout_one_chunk_per_view_sharded_and_blosc(cache):
    g = zarr.open_group(str(cache / "train-000000"), mode="r")
    for a in ("logprobs", "classes", "box", "flip", "mix_with", "mix_lam"):
        arr = g[a]
        assert arr.chunks == (7, 1) + arr.shape[2:], a  # one chunk per (shard, view)
        assert arr.shards == arr.shape, a  # all views of the array in one file
        (codec,) = arr.compressors
        assert isinstance(codec, BloscCodec) and codec.cname.value == "zstd"
        want = "shuffle" if a in ("logprobs", "mix_lam") else "bitshuffle"
        assert codec.shuffle.value == want, a
    # a shard group is a handful of files
    files = [p for p in (cache / "train-000000").rglob("*") if p.is_file()]
    assert len(files) <= 2 * len(ARRAYS) + 1


def test_read_view(cache):
    r = CacheReader(str(cache))
    full = r.read_shard("train-000001")
    for v in range(3):
        vr = r.read_view("train-000001", v)
        assert len(vr) == 7 and vr.view == v and vr.bad == frozenset()
        for a in ("logprobs", "classes", "box", "flip", "mix_with", "mix_lam"):
            assert np.array_equal(getattr(vr, a), full[a][:, v]), a
    with pytest.raises(KdcacheError, match="view 3 is out of range; cache .* holds views 0..2"):
        r.read_view("train-000001", 3)
    with pytest.raises(KdcacheError, match="has no shard group 'nope'"):
        r.read_view("nope", 0)


def test_plain_zarr_reads_the_store(cache):
    """What docs/format.md shows: no kdcache needed to read a cache."""
    root = zarr.open_group(str(cache), mode="r")
    manifest = root.attrs["kdcache"]
    g = root["train-000002"]
    assert g.attrs["complete"]
    keys = [str(k) for k in g["keys"][:]]
    lp, cl = g["logprobs"][:, 1], g["classes"][:, 1]
    ref = CacheReader(str(cache)).read_view("train-000002", 1)
    assert keys == ref.keys.tolist() and np.array_equal(lp, ref.logprobs) and np.array_equal(cl, ref.classes)
    assert manifest["views"] == 3
    reader = CacheReader(str(cache))
    assert reader.keys("train-000002").tolist() == keys
    assert np.array_equal(reader.sizes("train-000002"), g["size"][:]) and reader.sizes("train-000002").shape == (7, 2)


# ---- opening: validation -----------------------------------------------------------------------


@pytest.fixture
def cache_copy(cache, tmp_path):
    dst = tmp_path / "copy.zarr"
    shutil.copytree(cache, dst)
    return dst


def _set_root_attr(path, fn):
    meta = json.loads((path / "zarr.json").read_text())
    fn(meta["attributes"]["kdcache"])
    (path / "zarr.json").write_text(json.dumps(meta))


def test_open_rejects_non_stores(tmp_path):
    with pytest.raises(KdcacheError, match="the path does not exist"):
        CacheReader(str(tmp_path / "none.zarr"))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.txt").write_text("x")
    with pytest.raises(KdcacheError, match="is not a kdcache store: it has no zarr.json"):
        CacheReader(str(tmp_path / "dir"))
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=3)
    with pytest.raises(KdcacheError, match="not a kdcache store: it has no 'kdcache' manifest"):
        CacheReader(str(tmp_path / "plain.zarr"))
    (tmp_path / "bad.zarr").mkdir()
    (tmp_path / "bad.zarr" / "zarr.json").write_text("{ not json")
    with pytest.raises(KdcacheError, match="is not a kdcache store: cannot open it as a Zarr v3 group"):
        CacheReader(str(tmp_path / "bad.zarr"))


def test_open_checks_format_version_and_manifest(cache_copy):
    _set_root_attr(cache_copy, lambda m: m.update(format_version=2))
    with pytest.raises(KdcacheError, match="uses cache format version 2; this kdcache .* reads version 1"):
        CacheReader(str(cache_copy))
    _set_root_attr(cache_copy, lambda m: (m.update(format_version=1), m.pop("topk")))
    with pytest.raises(KdcacheError, match="the manifest lacks 'topk'"):
        CacheReader(str(cache_copy))


def test_damaged_or_incomplete_shard_groups(cache_copy):
    root = zarr.open_group(str(cache_copy), mode="r+")
    # an interrupted group
    root["train-000000"].attrs["complete"] = False
    # an array of the wrong shape
    g = root["train-000001"]
    g.create_array("mix_lam", shape=(7, 2), dtype="float16", overwrite=True)
    # a missing array
    del root["train-000002"]["flip"]
    r = CacheReader(str(cache_copy))
    assert not r.is_complete("train-000000") and r.is_complete("train-000001")
    with pytest.raises(KdcacheError, match="shard 'train-000000' .* is incomplete .* re-run the same `kdcache precompute`"):
        r.read_view("train-000000", 0)
    with pytest.raises(KdcacheError, match=r"array 'mix_lam' has shape \(7, 2\), expected \(7, 3\)"):
        r.read_shard("train-000001")
    with pytest.raises(KdcacheError, match=r"lacks arrays \['flip'\]"):
        r.read_view("train-000002", 0)


# ---- writing: dtype rules, refusals ------------------------------------------------------------


def _manifest(**over):
    base = dict(
        teacher={"spec": "x", "weights": None, "weights_sha256": None, "num_classes": 10, "mean": [0, 0, 0], "std": [1, 1, 1]},
        augmentation={"scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "flip": True, "mixup": False, "name": "inception_crop", "version": 1},
        seed=0, views=2, topk=3, resolution=32, render=render_backend(), shards=["s0"], sources=["/d/s0.tar"],
    )
    base.update(over)
    return make_manifest(**base)


def _records(n, V=2, k=3, side=100, num_classes=10):
    rng = np.random.default_rng(0)
    return dict(
        keys=[f"k{i}" for i in range(n)], size=np.full((n, 2), side, np.int32),
        logprobs=-np.sort(rng.random((n, V, k)), -1), classes=rng.integers(0, num_classes, (n, V, k)),
        box=np.tile(np.array([0, 0, side, side]), (n, V, 1)), flip=np.zeros((n, V), bool),
        mix_with=np.full((n, V), -1, np.int32), mix_lam=np.ones((n, V), np.float16),
    )


@pytest.mark.parametrize(
    "num_classes,side,classes_dt,box_dt",
    [(10, 100, np.int16, np.uint16), (32767, 65535, np.int16, np.uint16), (32768, 65536, np.int32, np.int32),
     (50000, 100, np.int32, np.uint16)],
)
def test_dtype_rules(tmp_path, num_classes, side, classes_dt, box_dt):
    m = _manifest(teacher={"spec": "x", "num_classes": num_classes})
    w = CacheWriter(str(tmp_path / "c.zarr"), m)
    rec = _records(4, side=side, num_classes=num_classes)
    rec["classes"][0, 0, 0] = num_classes - 1
    rec["box"][1, 1] = [side - 1, side - 1, 1, 1]
    w.write_shard("s0", source="/d/s0.tar", **rec)
    d = CacheReader(str(tmp_path / "c.zarr")).read_shard("s0")
    assert d["classes"].dtype == classes_dt and d["box"].dtype == box_dt
    assert d["classes"][0, 0, 0] == num_classes - 1  # the largest id survives the cast
    assert d["box"][1, 1].tolist() == [side - 1, side - 1, 1, 1]
    assert np.array_equal(d["logprobs"], rec["logprobs"].astype(np.float16))


def test_empty_shard_group(tmp_path):
    w = CacheWriter(str(tmp_path / "c.zarr"), _manifest())
    w.write_shard("s0", source="/d/s0.tar", **_records(0))
    r = CacheReader(str(tmp_path / "c.zarr"))
    assert r.is_complete("s0") and len(r.read_view("s0", 1)) == 0


def test_write_shard_checks_shapes(tmp_path):
    w = CacheWriter(str(tmp_path / "c.zarr"), _manifest())
    rec = _records(3)
    rec["flip"] = np.zeros((3, 5), bool)
    with pytest.raises(ValueError, match=r"flip has shape \(3, 5\), expected \(3, 2\)"):
        w.write_shard("s0", source="/d/s0.tar", **rec)
    assert not CacheReader(str(tmp_path / "c.zarr")).has_shard("s0")


@pytest.mark.parametrize(
    "change,expect",
    [
        (dict(seed=1), "seed: cache has 0, this run has 1"),
        (dict(views=4), "views: cache has 2, this run has 4"),
        (dict(topk=5), "topk: cache has 3, this run has 5"),
        (dict(resolution=64), "resolution: cache has 32, this run has 64"),
        (dict(teacher={"spec": "y", "weights": None, "weights_sha256": None, "num_classes": 10, "mean": [0, 0, 0], "std": [1, 1, 1]}),
         "teacher.spec: cache has 'x', this run has 'y'"),
        (dict(augmentation={"scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "flip": True, "mixup": True, "name": "inception_crop", "version": 1}),
         "augmentation.mixup: cache has False, this run has True"),
        (dict(shards=["s0", "s1"]), "shards: cache covers 1 shards, this run 2"),
    ],
)
def test_writer_refuses_other_settings(tmp_path, change, expect):
    path = str(tmp_path / "c.zarr")
    CacheWriter(path, _manifest())
    with pytest.raises(KdcacheError) as ei:
        CacheWriter(path, _manifest(**change))
    assert "made with other settings" in str(ei.value) and expect in str(ei.value)
    assert manifest_differences(_manifest(), _manifest(**change)) != []
    # settings that may change between runs: sources (shards moved), the render backend, class names
    CacheWriter(path, _manifest(sources=["/elsewhere/s0.tar"], render={"pil": "other"}, class_names=["a"]))


def test_writer_refuses_non_stores(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(KdcacheError, match="is a file, not a kdcache store"):
        CacheWriter(str(tmp_path / "file"), _manifest())
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "notes.txt").write_text("x")
    with pytest.raises(KdcacheError, match="refusing to write into .*dir: .*no zarr.json"):
        CacheWriter(str(tmp_path / "dir"), _manifest())
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["notes.txt"]
    # an empty directory is fine
    (tmp_path / "empty").mkdir()
    CacheWriter(str(tmp_path / "empty"), _manifest())
    assert CacheReader(str(tmp_path / "empty")).manifest["views"] == 2
