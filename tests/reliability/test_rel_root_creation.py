"""Fault: the process creating a cache dies while the root zarr.json is being written.

zarr-python 3.1's LocalStore writes every key to ``<dir>/<stem>.<uuid hex>.partial`` and then
renames it into place (``zarr/storage/_local.py: _atomic_write``), so a kill at that moment leaves
``OUT/zarr.<32 hex>.partial`` and no zarr.json; a store that writes in place (fsspec, a copy
tool, a crash without fsync) can leave an empty or half-written zarr.json. Either used to block
every later run ("refusing to write into OUT: not a kdcache store: it has no zarr.json"). A later
run must create the cache again; anything else in the directory is still refused, untouched.
"""

from __future__ import annotations

import json
import uuid

import pytest

from conftest import snapshot
from kdcache.errors import KdcacheError
from kdcache.cache.store import CacheReader, CacheWriter
from relhelpers import manifest, records, spawn


def _partial_name() -> str:
    return f"zarr.{uuid.uuid4().hex}.partial"


def _half_json() -> bytes:
    full = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"kdcache": manifest(["s0"])}}).encode()
    return full[: len(full) // 2]


def _resumes(out):
    w = CacheWriter(str(out), manifest(["s0"]))
    w.write_shard("s0", source="/d/s0.tar", claim=w.claim("s0"), **records(4, 1))
    r = CacheReader(str(out))
    assert r.manifest["shards"] == ["s0"] and r.read_view("s0", 1).keys.tolist() == [f"s1_k{i}" for i in range(4)]
    # zarr's and kdcache's temporary files are gone; nothing else was added at the top level
    assert sorted(p.name for p in out.iterdir()) == ["s0", "zarr.json"]


def test_killed_while_publishing_root_metadata_resumes(tmp_path):
    """A real process, SIGKILLed at the instant the root zarr.json gets its name."""
    out = tmp_path / "cache.zarr"
    p = spawn("kill-on-publish", out)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == -9, (p.returncode, stdout, stderr)
    left = sorted(q.name for q in out.iterdir())
    assert "zarr.json" not in left and left, left  # it died with only a temporary file written
    _resumes(out)


@pytest.mark.parametrize(
    "leftover",
    ["zarr_partial", "zarr_partial_half", "two_partials", "empty_zarr_json", "half_zarr_json", "garbage_zarr_json",
     "partial_and_empty_zarr_json", "kdcache_tmp"],
)
def test_what_a_killed_root_write_leaves_is_created_again(tmp_path, leftover):
    out = tmp_path / "cache.zarr"
    out.mkdir()
    if leftover == "zarr_partial":
        (out / _partial_name()).write_bytes(b"")
    elif leftover == "zarr_partial_half":
        (out / _partial_name()).write_bytes(_half_json())
    elif leftover == "two_partials":
        (out / _partial_name()).write_bytes(_half_json())
        (out / _partial_name()).write_bytes(b"{")
    elif leftover == "empty_zarr_json":
        (out / "zarr.json").write_bytes(b"")
    elif leftover == "half_zarr_json":
        (out / "zarr.json").write_bytes(_half_json())
    elif leftover == "garbage_zarr_json":
        (out / "zarr.json").write_bytes(b"\0" * 300)
    elif leftover == "partial_and_empty_zarr_json":
        (out / _partial_name()).write_bytes(_half_json())
        (out / "zarr.json").write_bytes(b"")
    elif leftover == "kdcache_tmp":
        (out / f".kdcache-root.{uuid.uuid4().hex}.tmp").write_bytes(_half_json())
    _resumes(out)


@pytest.mark.parametrize(
    "setup",
    ["user_file_and_partial", "damaged_root_with_groups", "other_partial_name", "user_dir", "valid_foreign_json"],
)
def test_anything_else_is_still_refused_untouched(tmp_path, setup):
    out = tmp_path / "cache.zarr"
    out.mkdir()
    if setup == "user_file_and_partial":
        (out / _partial_name()).write_bytes(b"")
        (out / "notes.txt").write_text("mine")
    elif setup == "damaged_root_with_groups":  # shard groups were written: not a fresh start
        (out / "zarr.json").write_bytes(b"")
        (out / "s0").mkdir()
        (out / "s0" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    elif setup == "other_partial_name":
        (out / "results.partial").write_text("mine")
    elif setup == "user_dir":
        (out / _partial_name()).write_bytes(b"")
        (out / "photos").mkdir()
    elif setup == "valid_foreign_json":
        (out / "zarr.json").write_text('{"hello": "world"}')
    before = snapshot(out)
    with pytest.raises(KdcacheError, match="refusing to write into"):
        CacheWriter(str(out), manifest(["s0"]))
    assert snapshot(out) == before


def test_precompute_resumes_after_a_killed_root_write(tmp_path, dataset, teacher_weights):
    """The command that used to refuse: the same precompute, into a directory holding exactly what
    zarr's killed root write leaves."""
    from conftest import precompute_config
    from kdcache.tools.precompute import precompute

    out = tmp_path / "cache.zarr"
    out.mkdir()
    (out / _partial_name()).write_bytes(_half_json())
    s = precompute(precompute_config(dataset, out, teacher_weights))
    assert s["shards_written"] == 3
    r = CacheReader(str(out))
    assert all(r.is_complete(n) for n in r.shard_names()) and len(r.shard_names()) == 3


def test_concurrent_creators_agree(tmp_path):
    """Four processes start on the same new path at once: one creates it, the others open it."""
    import time

    out = tmp_path / "cache.zarr"
    start = time.time() + 1.5
    ps = [spawn("race", out, w, "g0,g1,g2", start, "claim") for w in range(4)]
    for p in ps:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
    assert CacheReader(str(out)).manifest["shards"] == ["g0", "g1", "g2"]
    assert sorted(q.name for q in out.iterdir()) == ["g0", "g1", "g2", "zarr.json"]


def test_remote_root_written_in_place_and_cut_is_created_again():
    """fsspec stores write zarr.json in place: a killed writer leaves it empty or cut. (memory://
    stands in for s3:// and the like.)"""
    import fsspec

    base = f"memory://kdcache-rel-root-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"{base}/a.zarr/zarr.json", _half_json())
    w = CacheWriter(f"{base}/a.zarr", manifest(["s0"]))
    w.write_shard("s0", source="/d/s0.tar", claim=w.claim("s0"), **records(3, 1))
    assert CacheReader(f"{base}/a.zarr").read_view("s0", 0).keys.tolist() == ["s1_k0", "s1_k1", "s1_k2"]
    fs.pipe_file(f"{base}/b.zarr/zarr.json", b"")
    fs.pipe_file(f"{base}/b.zarr/notes.txt", b"mine")
    with pytest.raises(KdcacheError, match="refusing to write into"):
        CacheWriter(f"{base}/b.zarr", manifest(["s0"]))
    assert fs.cat_file(f"{base}/b.zarr/notes.txt") == b"mine" and fs.cat_file(f"{base}/b.zarr/zarr.json") == b""


def test_every_version_of_a_groups_metadata_is_whole(tmp_path, monkeypatch):
    """A group's zarr.json is written whole each time: no reader can catch a group with its decode
    record but not its view count, or marked complete before its digests. (zarr's attrs.update
    writes the document once per key; a race of four writers once read such a half-written group
    and took it for an edited manifest.)"""
    import zarr.storage

    from kdcache.cache.store import RECORD_ATTR, VIEWS_ATTR
    from kdcache.cache.store.digests import DIGEST_ATTR

    versions = []
    real_set = zarr.storage.LocalStore.set

    async def recording_set(self, key, value):
        if key == "g0/zarr.json":
            versions.append(json.loads(value.to_bytes())["attributes"])
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", recording_set)
    w = CacheWriter(str(tmp_path / "cache.zarr"), manifest(["g0"]))
    w.write_shard("g0", source="/d/g0.tar", claim=w.claim("g0"), **records(5, 3))
    assert versions and versions[-1].get("complete") is True
    for attrs in versions:
        if not attrs:
            continue  # the group as created, before any attribute
        assert RECORD_ATTR in attrs and VIEWS_ATTR in attrs, sorted(attrs)
        if attrs.get("complete"):
            assert DIGEST_ATTR in attrs, sorted(attrs)
    assert len(versions) <= 3, [sorted(a) for a in versions]  # created, described, completed
