"""The store, format v2 (DESIGN §2, docs/format.md): arrays, dtypes, layout, manifest, validation;
format v1 caches (string keys) stay readable; tensorstore reads every array."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from conftest import NUM_CLASSES, TEACHER, snapshot
from kdcache import __version__
from kdcache.errors import KdcacheError
from kdcache.cache.store import (
    ARRAYS,
    FORMAT_VERSION,
    CacheReader,
    CacheWriter,
    box_dtype,
    class_dtype,
    make_manifest,
    manifest_differences,
)
from kdcache.data.render import render_backend

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
    assert m["format_version"] == FORMAT_VERSION == 3 and m["kdcache_version"] == __version__
    assert m["targets"] == {"kind": "topk"} and m["encoding"] == {"layout": "plain"}  # the defaults
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
        codec, crc = arr.compressors  # Blosc, then a CRC-32C of the compressed chunk
        assert isinstance(codec, BloscCodec) and codec.cname.value == "zstd" and isinstance(crc, Crc32cCodec)
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
    # keys: (N, L) uint8 rows of zero-padded UTF-8, decoded as docs/format.md shows
    assert g["keys"].attrs["encoding"] == "utf-8, zero-padded"
    keys = [bytes(row).rstrip(b"\0").decode("utf-8") for row in g["keys"][:]]
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
    for bad in (99, 0, "2", None):
        _set_root_attr(cache_copy, lambda m: m.update(format_version=bad))
        with pytest.raises(KdcacheError, match=f"uses cache format version {bad!r}; this kdcache .* reads versions 1 and 2"):
            CacheReader(str(cache_copy))
    _set_root_attr(cache_copy, lambda m: (m.update(format_version=2), m.pop("topk")))
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


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_write_shard_refuses_log_probs_no_teacher_gives(tmp_path, value):
    """NaN or +inf top-k log-probs of a good record never reach the store (a bad record's -inf
    placeholder and a -inf entry are fine); the group is not written at all."""
    w = CacheWriter(str(tmp_path / "c.zarr"), _manifest())
    rec = _records(3)
    rec["logprobs"][2, 1, 0] = value
    with pytest.raises(KdcacheError, match=r"key 'k2' view 1 hold NaN or \+inf: not a teacher's output"):
        w.write_shard("s0", source="/d/s0.tar", **rec)
    assert not CacheReader(str(tmp_path / "c.zarr")).has_shard("s0")
    rec["logprobs"][2, 1, 0] = -1e-3
    rec["logprobs"][1, 0, 2] = -np.inf
    w.write_shard("s0", source="/d/s0.tar", **rec)
    assert np.isneginf(CacheReader(str(tmp_path / "c.zarr")).read_view("s0", 0).logprobs[1, 2])


@pytest.mark.parametrize(
    "change,expect",
    [
        (dict(seed=1), "seed: cache has 0, this run has 1"),
        (dict(topk=5), "topk: cache has 3, this run has 5"),
        (dict(resolution=64), "resolution: cache has 32, this run has 64"),
        (dict(teacher={"spec": "y", "weights": None, "weights_sha256": None, "num_classes": 10, "mean": [0, 0, 0], "std": [1, 1, 1]}),
         "teacher.spec: cache has 'x', this run has 'y'"),
        (dict(augmentation={"scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "flip": True, "mixup": True, "name": "inception_crop", "version": 1}),
         "augmentation.mixup: cache has False, this run has True"),
        (dict(shards=["s0", "s1"]), "shards: cache covers 1 shards, this run 2"),
        # a format-2 cache that recorded no teacher compute settings vs a run that does
        (dict(compute={"batch_size": 8, "device": "cpu", "precision": "fp32"}),
         "compute: cache has None, this run has {'batch_size': 8, 'device': 'cpu', 'precision': 'fp32'}"),
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


def test_writer_grows_to_more_views_and_refuses_fewer(tmp_path):
    """More views than the cache's start a growth (growth.py): the manifest takes the new V and says
    where it grows from; fewer are refused naming both numbers."""
    path = str(tmp_path / "c.zarr")
    CacheWriter(path, _manifest())
    with pytest.raises(KdcacheError, match="holds 2 views per image and this run asks for 1"):
        CacheWriter(path, _manifest(views=1))
    w = CacheWriter(path, _manifest(views=4))
    assert w.growing == 2 and not w.finish_growth()  # its group is not written yet
    m = zarr.open_group(path, mode="r").attrs["kdcache"]
    assert (m["views"], m["growing"]) == (4, {"from": 2})
    with pytest.raises(KdcacheError, match="holds 4 views per image and this run asks for 3"):
        CacheWriter(path, _manifest(views=3))


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


# ---- format 2: keys as zero-padded UTF-8 bytes; tensorstore reads everything -------------------

MIXED_KEYS = ["a", "café_ü_1", "bad_one", "k3_longer_name", "日本語", ""]


def _mixed_cache(path, keys=MIXED_KEYS, V=2, k=3):
    """A cache written by CacheWriter: keys of different lengths (non-ASCII, one empty), one bad
    record with the placeholder values precompute writes, and an empty shard (N = 0)."""
    m = _manifest(shards=["s0", "s1"], sources=["/d/s0.tar", "/d/s1.tar"],
                  compute={"batch_size": 8, "device": "cpu", "precision": "fp32"})
    w = CacheWriter(str(path), m)
    rec = _records(len(keys), V=V, k=k)
    rec["keys"] = list(keys)
    b = keys.index("bad_one")
    rec["size"][b] = -1
    rec["logprobs"][b] = -np.inf
    rec["classes"][b] = -1
    rec["box"][b] = 0
    rec["mix_with"][[0, 1], 0] = [1, 0]
    rec["mix_lam"][[0, 1], 0] = 0.75
    w.write_shard("s0", source="/d/s0.tar", bad={"bad_one": "OSError: truncated"}, **rec)
    w.write_shard("s1", source="/d/s1.tar", **_records(0, V=V, k=k))
    return rec


def _ts_read(path):
    ts = pytest.importorskip("tensorstore")
    arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}).result()
    return arr, arr.read().result()


def test_tensorstore_reads_every_array(tmp_path):
    """DESIGN §2: any Zarr v3 reader reads the store. Format 1's string keys made tensorstore fail
    ("string data type is not one of the supported data types"). Zero-size arrays (the N = 0
    shard) open and read fine in tensorstore, so they are checked too."""
    path = tmp_path / "c.zarr"
    rec = _mixed_cache(path)
    r = CacheReader(str(path))
    root = zarr.open_group(str(path), mode="r")
    checked = {}
    for name, g in sorted(root.groups()):
        full = r.read_shard(name)
        n = int(g.attrs["num_samples"])
        for a in sorted(g.array_keys()):
            arr, data = _ts_read(path / name / a)
            assert tuple(arr.shape) == g[a].shape and data.dtype == np.dtype(g[a].dtype), (name, a)
            assert np.array_equal(data, g[a][:]), (name, a)
            if a == "keys":
                assert data.dtype == np.uint8 and data.ndim == 2 and data.shape[0] == n and data.shape[1] >= 1
                decoded = [bytes(row).rstrip(b"\0").decode("utf-8") for row in data]
                assert decoded == r.keys(name).tolist() == full["keys"].tolist()
            else:
                assert np.array_equal(data, full[a]), (name, a)
            checked[(name, a)] = data.shape
    assert sorted(checked) == sorted((s, a) for s in ("s0", "s1") for a in ARRAYS)
    assert checked[("s0", "keys")] == (6, len("k3_longer_name")) and checked[("s1", "keys")] == (0, 1)
    assert checked[("s1", "logprobs")] == (0, 2, 3)
    assert r.keys("s0").tolist() == MIXED_KEYS and r.keys("s1").tolist() == []
    # the bad record's placeholders survive, as read by tensorstore
    _, lp = _ts_read(path / "s0" / "logprobs")
    assert np.isneginf(lp[2]).all() and np.array_equal(_ts_read(path / "s0" / "size")[1][2], [-1, -1])
    assert np.array_equal(lp, rec["logprobs"].astype(np.float16))


def test_tensorstore_reads_the_precomputed_cache(cache):
    r = CacheReader(str(cache))
    for name in r.shard_names():
        full = r.read_shard(name)
        for a in ARRAYS:
            _, data = _ts_read(cache / name / a)
            if a == "keys":
                assert [bytes(row).rstrip(b"\0").decode() for row in data] == full["keys"].tolist()
            else:
                assert np.array_equal(data, full[a]), (name, a)


def test_keys_layout(tmp_path):
    path = tmp_path / "c.zarr"
    _mixed_cache(path)
    g = zarr.open_group(str(path / "s0"), mode="r")
    keys = g["keys"]
    width = max(len(k.encode("utf-8")) for k in MIXED_KEYS)
    assert width == len("k3_longer_name") and len("日本語".encode()) == 9
    assert keys.shape == (6, width) and keys.dtype == np.uint8 and keys.attrs.asdict() == {"encoding": "utf-8, zero-padded"}
    rows = keys[:]
    for row, k in zip(rows, MIXED_KEYS):
        b = k.encode("utf-8")
        assert bytes(row) == b + b"\0" * (width - len(b))
    # chunked like `size`: one chunk, not sharded, integer Blosc
    assert keys.chunks == (6, width) and keys.shards is None
    codec, crc = keys.compressors
    assert isinstance(codec, BloscCodec) and codec.cname.value == "zstd" and codec.shuffle.value == "bitshuffle"
    assert isinstance(crc, Crc32cCodec)
    # empty shard: L is still 1; keys that are all empty: L = 1 as well
    assert zarr.open_array(str(path / "s1" / "keys"), mode="r").shape == (0, 1)
    w = CacheWriter(str(path), _manifest(shards=["s0", "s1"], sources=["/d/s0.tar", "/d/s1.tar"],
                                          compute={"batch_size": 8, "device": "cpu", "precision": "fp32"}))
    rec = _records(2)
    rec["keys"] = ["", ""]
    shutil.rmtree(path / "s1")  # a complete group is never overwritten: delete it to redo it
    w.write_shard("s1", source="/d/s1.tar", **rec)
    assert zarr.open_array(str(path / "s1" / "keys"), mode="r").shape == (2, 1)
    r = CacheReader(str(path))
    assert r.keys("s1").tolist() == ["", ""] and r.read_view("s1", 0).keys.tolist() == ["", ""]
    # read paths agree and give plain numpy str arrays
    assert r.keys("s0").dtype.kind == "U" and r.read_view("s0", 1).keys.tolist() == MIXED_KEYS
    assert r.read_shard("s0")["keys"].tolist() == MIXED_KEYS
    # nbytes_raw: keys count N * L bytes, like any uint8 array
    assert r.nbytes_raw("s0") >= 6 * width


def test_nul_key_refused(tmp_path):
    w = CacheWriter(str(tmp_path / "c.zarr"), _manifest())
    rec = _records(3)
    rec["keys"] = ["ok", "a\x00b", "ok2"]
    with pytest.raises(KdcacheError, match=r"sample key 'a\\x00b' contains a NUL character.*cannot store it"):
        w.write_shard("s0", source="/d/s0.tar", **rec)
    assert not CacheReader(str(tmp_path / "c.zarr")).has_shard("s0")  # nothing written
    rec["keys"] = ["ok", "trailing\x00", "ok2"]  # would silently read back as "trailing"
    with pytest.raises(KdcacheError, match="NUL character"):
        w.write_shard("s0", source="/d/s0.tar", **rec)


# ---- format 1 caches: still read, never written ------------------------------------------------


def _write_v1_cache(path, groups: dict, V=2, k=3, num_classes=10):
    """A format-1 cache, built with plain zarr exactly as kdcache's format-1 CacheWriter wrote it:
    manifest without "compute", `keys` a (N,) Zarr string array, the other arrays as today."""
    from zarr.codecs import BloscShuffle

    flt = BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle)
    itg = BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.bitshuffle)
    manifest = _manifest(shards=sorted(groups), sources=[f"/d/{s}.tar" for s in sorted(groups)])
    manifest.update(format_version=1, kdcache_version="0.1.0")
    manifest.pop("compute")
    root = zarr.open_group(str(path), mode="w-", zarr_format=3, attributes={"kdcache": manifest})
    for name, (rec, bad) in groups.items():
        n = len(rec["keys"])
        g = root.create_group(name, overwrite=True)
        g.attrs.update({"source": f"/d/{name}.tar", "num_samples": n, "complete": False})
        rows = max(n, 1)
        max_side = int(rec["size"].max()) if n else 0

        def put(aname, data, dtype, codec):
            shape = data.shape
            per_view = len(shape) >= 2 and aname not in ("size",)
            chunks = (rows, 1) + shape[2:] if per_view else (rows,) + shape[1:]
            shards = (rows,) + shape[1:] if per_view else None
            arr = g.create_array(aname, shape=shape, chunks=chunks, shards=shards, dtype=dtype, compressors=codec)
            if n:
                arr[...] = data.astype(dtype, copy=False)

        keys_arr = g.create_array("keys", shape=(n,), chunks=(rows,), dtype=str)
        if n:
            keys_arr[:] = np.asarray(list(rec["keys"]), dtype=str)
        put("size", np.asarray(rec["size"]), np.int32, itg)
        put("logprobs", np.asarray(rec["logprobs"]), np.float16, flt)
        put("classes", np.asarray(rec["classes"]), class_dtype(num_classes), itg)
        put("box", np.asarray(rec["box"]), box_dtype(max_side), itg)
        put("flip", np.asarray(rec["flip"]), np.bool_, itg)
        put("mix_with", np.asarray(rec["mix_with"]), np.int32, itg)
        put("mix_lam", np.asarray(rec["mix_lam"]), np.float16, flt)
        g.attrs.update({"bad": bad, "render": manifest["render"], "complete": True})
    return manifest


def test_format_1_cache_is_read_like_a_current_one(tmp_path):
    v2 = tmp_path / "v2.zarr"
    rec = _mixed_cache(v2)
    v1 = tmp_path / "v1.zarr"
    _write_v1_cache(v1, {"s0": (rec, {"bad_one": "OSError: truncated"}), "s1": (_records(0), {})})
    assert zarr.open_array(str(v1 / "s0" / "keys"), mode="r").dtype.kind == "T"  # really the old layout
    r1, r2 = CacheReader(str(v1)), CacheReader(str(v2))
    assert (r1.format_version, r2.format_version) == (1, 3)
    for name in ("s0", "s1"):
        k1, k2 = r1.keys(name), r2.keys(name)
        assert k1.tolist() == k2.tolist() and k1.dtype == k2.dtype and k1.dtype.kind == "U"
        d1, d2 = r1.read_shard(name), r2.read_shard(name)
        assert sorted(d1) == sorted(d2) == sorted(ARRAYS)
        for a in ARRAYS:
            assert d1[a].dtype == d2[a].dtype and np.array_equal(d1[a], d2[a]), (name, a)
        for v in range(2):
            vr1, vr2 = r1.read_view(name, v), r2.read_view(name, v)
            assert vr1.keys.dtype == vr2.keys.dtype and vr1.keys.tolist() == vr2.keys.tolist()
            assert vr1.bad == vr2.bad and np.array_equal(vr1.logprobs, vr2.logprobs)
    assert r1.keys("s0").tolist() == MIXED_KEYS and r1.read_view("s0", 1).keys.tolist() == MIXED_KEYS
    # nbytes_raw: format 1 counts the keys' UTF-8 bytes, format 2 the padded rows; other arrays equal
    other = r2.nbytes_raw("s0") - 6 * len("k3_longer_name")
    assert r1.nbytes_raw("s0") == other + sum(len(k.encode("utf-8")) for k in MIXED_KEYS)
    assert r1.nbytes_raw("s1") == r2.nbytes_raw("s1")  # N = 0: no key bytes either way
    # a format-2 cache whose keys are strings (or the reverse) is damaged, not silently misread
    _set_root_attr(v1, lambda m: m.update(format_version=2))
    with pytest.raises(KdcacheError, match="array 'keys' is .*, expected uint8 \\(cache format 2\\)"):
        CacheReader(str(v1)).keys("s0")
    _set_root_attr(v1, lambda m: m.update(format_version=1))
    # a current cache records the manifest it was written with: the edit is named as one
    _set_root_attr(v2, lambda m: m.update(format_version=1))
    with pytest.raises(KdcacheError, match="manifest field format_version was edited after precompute: the "
                                           "manifest says 1, shard group 's0' was written with 3"):
        CacheReader(str(v2)).read_view("s0", 0)


def test_format_1_cache_is_refused_for_writing(tmp_path):
    v1 = tmp_path / "v1.zarr"
    rec = _records(3)
    _write_v1_cache(v1, {"s0": (rec, {})})
    before = snapshot(v1)
    with pytest.raises(KdcacheError) as ei:
        CacheWriter(str(v1), _manifest(shards=["s0"], compute={"batch_size": 8, "device": "cpu", "precision": "fp32"}))
    msg = str(ei.value)
    assert "made by an older kdcache (0.1.0, cache format 1)" in msg
    assert "Finish it with the kdcache release that started it (0.1.0), or precompute into a new --out path" in msg
    assert "made with other settings" not in msg
    assert snapshot(v1) == before  # untouched
    assert CacheReader(str(v1)).read_shard("s0")["keys"].tolist() == ["k0", "k1", "k2"]  # still readable
    # the writer never writes format 1 either
    old = _manifest()
    old["format_version"] = 1
    with pytest.raises(KdcacheError, match="CacheWriter writes cache format 3 only"):
        CacheWriter(str(tmp_path / "new.zarr"), old)
    assert not (tmp_path / "new.zarr").exists()


# ---- the teacher's compute settings ------------------------------------------------------------

CPU = {"batch_size": 8, "device": "cpu", "precision": "fp32"}


@pytest.mark.parametrize(
    "change,expect",
    [
        (dict(batch_size=16), "compute.batch_size: cache has 8, this run has 16"),
        (dict(device="cuda"), "compute.device: cache has 'cpu', this run has 'cuda'"),
        (dict(precision="bf16"), "compute.precision: cache has 'fp32', this run has 'bf16'"),
    ],
)
def test_compute_recorded_and_matched(tmp_path, change, expect):
    path = str(tmp_path / "c.zarr")
    CacheWriter(path, _manifest(compute=CPU))
    assert CacheReader(path).manifest["compute"] == CPU
    with pytest.raises(KdcacheError) as ei:
        CacheWriter(path, _manifest(compute=dict(CPU, **change)))
    assert "made with other settings" in str(ei.value) and expect in str(ei.value)
    CacheWriter(path, _manifest(compute=dict(CPU)))  # the same settings resume
    assert _manifest()["compute"] is None  # not given: recorded as null


def test_compute_missing_from_old_manifest(tmp_path):
    new = _manifest(compute=CPU)
    old2 = _manifest()  # format 2 without compute settings: a difference
    assert manifest_differences(old2, new) == [f"compute: cache has None, this run has {CPU!r}"]
    del old2["compute"]
    assert manifest_differences(old2, new) == [f"compute: cache has None, this run has {CPU!r}"]
    old1 = dict(old2, format_version=1)  # format 1 never recorded it: not a difference
    assert manifest_differences(old1, new) == []
