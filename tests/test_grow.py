"""Growing a cache's views in place (docs/cli.md, "Growing a cache"; cache/store/growth.py).

Real shards (``dataset``: 3 shards x 7 images), a real tiny teacher, real Zarr stores: a cache made
at V = 2 and grown to 4 must equal, array by array and attribute by attribute, the cache made at
V = 4 in one go, in every layout and target kind; its first two views keep their bytes and
digests; fewer views are refused; a cache whose growth is unfinished is refused by every reader.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr

from conftest import TEACHER, NUM_CLASSES, cli_in_process as _cli, error_lines as _errors, precompute_config, stored

VARIANTS = {
    "plain": {},
    "compact": {"compact": True},
    "sample": {"targets": "sample", "samples": 12},
    "compact-sample": {"targets": "sample", "samples": 12, "compact": True},
}


def _precompute(data, out, weights, views: int, **kw) -> dict:
    from kdcache.tools.precompute import precompute

    return precompute(precompute_config(data, out, weights, views=views, **VARIANTS[kw.pop("variant", "plain")], **kw))


@pytest.fixture(scope="module")
def caches(dataset, teacher_weights, tmp_path_factory):
    """Per variant: the cache at V = 2, the same grown to V = 4 (with the run's summary), and the
    cache made at V = 4 in one go."""
    tmp = tmp_path_factory.mktemp("grow")
    out = {}
    for v in VARIANTS:
        base, grown, onego = tmp / f"{v}-2.zarr", tmp / f"{v}-grown.zarr", tmp / f"{v}-4.zarr"
        _precompute(dataset, base, teacher_weights, 2, variant=v)
        shutil.copytree(base, grown)
        summary = _precompute(dataset, grown, teacher_weights, 4, variant=v)
        _precompute(dataset, onego, teacher_weights, 4, variant=v)
        out[v] = {"base": base, "grown": grown, "onego": onego, "summary": summary}
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_grown_cache_equals_the_one_go_cache_bitwise(caches, variant):
    c = caches[variant]
    grown, onego = stored(c["grown"]), stored(c["onego"])
    assert grown.keys() == onego.keys()
    assert "growing" not in grown["manifest"] and grown["manifest"]["views"] == 4
    for name in grown:
        assert grown[name] == onego[name], name
    s = c["summary"]
    assert (s["shards_written"], s["shards_grown"], s["growth_finished"]) == (3, 3, True)
    assert s["records"] == s["images"] * 2  # only the two new views of each image were computed


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_growing_keeps_the_stored_views_and_their_digests(caches, variant):
    from kdcache.cache.store import CacheReader

    c = caches[variant]
    before, after = CacheReader(str(c["base"])), CacheReader(str(c["grown"]))
    for name in before.shard_names():
        assert after.view_digests(name)[:2] == before.view_digests(name)
        assert after.shard_attrs(name)["views"] == 4 and before.shard_attrs(name)["views"] == 2
        for v in range(2):
            a, b = before.read_view(name, v), after.read_view(name, v)
            for field in ("keys", "size", "logprobs", "classes", "box", "flip", "mix_with", "mix_lam"):
                x, y = np.asarray(getattr(a, field)), np.asarray(getattr(b, field))
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (name, v, field)


def test_the_group_record_leaves_v_out_and_the_group_says_it(caches):
    from kdcache.cache.store import RECORD_ATTR

    g = zarr.open_group(str(caches["plain"]["grown"]), mode="r")["train-000000"]
    assert "views" not in json.loads(g.attrs[RECORD_ATTR]) and g.attrs["views"] == 4


def test_fewer_views_are_refused(caches, dataset, teacher_weights, tmp_path):
    c = tmp_path / "c.zarr"
    shutil.copytree(caches["plain"]["base"], c)
    before = stored(c)
    code, text = _cli("precompute", "--data", dataset, "--teacher", TEACHER, "--teacher-weights", teacher_weights,
                      "--num-classes", NUM_CLASSES, "--out", c, "-V", 1, "-k", 3, "--seed", 7, "--res", 32, "--mixup",
                      "-b", 8, "--workers", 0, "--device", "cpu", "--no-progress")
    err = _errors(text)
    assert code == 2 and len(err) == 1 and "Traceback" not in text, text
    assert str(c) in err[0] and "holds 2 views" in err[0] and "asks for 1" in err[0], err[0]
    assert stored(c) == before


def _three_readers(cache, data, weights, out):
    return {
        "train": _cli("train", "--data", data, "--cache", cache, "--student", TEACHER, "--out", out, "--epochs", 1,
                      "-b", 4, "--workers", 0, "--device", "cpu", "--no-progress"),
        "inspect": _cli("inspect", cache),
        "verify": _cli("verify", cache, "--data", data, "--teacher", TEACHER, "--teacher-weights", weights, "-n", 8,
                       "--device", "cpu"),
    }


@pytest.mark.parametrize("variant", ["plain", "compact"])
def test_an_unfinished_growth_is_refused_by_readers_and_finished_by_the_same_command(
        caches, dataset, teacher_weights, tmp_path, variant):
    """One --shard-index of three grows its group: the manifest says growing, train, inspect and
    verify refuse the cache naming the command to finish; the other indices finish it, and the
    cache equals the one-go cache."""
    c = tmp_path / "c.zarr"
    shutil.copytree(caches[variant]["base"], c)
    s = _precompute(dataset, c, teacher_weights, 4, variant=variant, shard_index=0, num_shard_groups=3)
    assert (s["shards_grown"], s["growth_finished"]) == (1, False)
    assert zarr.open_group(str(c), mode="r").attrs["kdcache"]["growing"] == {"from": 2}
    for cmd, (code, text) in _three_readers(c, dataset, teacher_weights, tmp_path / "run").items():
        err = _errors(text)
        assert code == 2 and len(err) == 1 and "Traceback" not in text, (cmd, text)
        assert "is being grown from 2 to 4 views" in err[0] and "--views 4" in err[0], (cmd, err[0])
    assert not (tmp_path / "run" / "model.pt").exists()
    for i in (1, 2):
        s = _precompute(dataset, c, teacher_weights, 4, variant=variant, shard_index=i, num_shard_groups=3)
    assert s["growth_finished"]
    grown, onego = stored(c), stored(caches[variant]["onego"])
    assert grown == onego


def test_verify_and_inspect_pass_on_a_grown_cache(caches, dataset, teacher_weights):
    for v in ("plain", "compact"):
        c = caches[v]["grown"]
        code, text = _cli("verify", c, "--data", dataset, "--teacher", TEACHER, "--teacher-weights", teacher_weights,
                          "-n", 40, "--device", "cpu")
        assert code == 0, text
        code, text = _cli("inspect", c)
        assert code == 0, text


def test_groups_written_before_groups_recorded_their_views_cannot_grow(caches, dataset, teacher_weights, tmp_path):
    """A group without its own `views` attribute (an earlier kdcache wrote it) has V in its digests:
    growth is refused before anything changes."""
    c = tmp_path / "c.zarr"
    shutil.copytree(caches["plain"]["base"], c)
    meta = c / "train-000001" / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["views"]
    meta.write_text(json.dumps(doc))
    before = stored(c)
    from kdcache.errors import KdcacheError

    with pytest.raises(KdcacheError, match="cannot grow its views: 1 of its groups \\(train-000001\\)"):
        _precompute(dataset, c, teacher_weights, 4)
    assert stored(c) == before


def test_a_group_whose_shard_changed_is_not_grown(caches, dataset, teacher_weights, tmp_path):
    """The views a group holds must come back unchanged: a shard whose images changed size since
    the group was written stops the growth of that group before anything of it is rewritten."""
    from kdcache.errors import KdcacheError

    c = tmp_path / "c.zarr"
    shutil.copytree(caches["plain"]["base"], c)
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    shutil.copy(data / "train-000001.tar", data / "train-000000.tar")  # other keys, other images
    before = stored(c)["train-000000"]
    with pytest.raises(KdcacheError, match="cannot grow shard group 'train-000000'"):
        _precompute(data, c, teacher_weights, 4, shard_index=0, num_shard_groups=3)
    assert stored(c)["train-000000"] == before


def test_the_index_prefers_the_entry_with_more_views(tmp_path):
    """Two segments hold the same group (its writer grew it later): whichever order the segments are
    read in, the entry with more views is the one returned."""
    import fsspec

    from kdcache.cache.store.index import INDEX_DIR, read_index, segment_bytes

    fs = fsspec.filesystem("file")
    entry = {v: {"attrs": {"complete": True, "views": v}, "arrays": {}, "files": {"a/c": v}} for v in (2, 4)}
    for first, second in ((2, 4), (4, 2)):
        base = tmp_path / f"c{first}"
        (base / INDEX_DIR).mkdir(parents=True)
        (base / INDEX_DIR / "a-0.json").write_bytes(segment_bytes({"g": entry[first]}))
        (base / INDEX_DIR / "b-0.json").write_bytes(segment_bytes({"g": entry[second]}))
        assert read_index(fs, str(base))["g"]["attrs"]["views"] == 4
