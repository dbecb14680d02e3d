"""Storage requests of the read paths, counted on ``countfs://`` (benchmarks/scale_support.py: the
local disk behind an fsspec filesystem that logs every request object storage would see).

A reader of a remote cache reads each complete group's metadata once (the shard listing already
reads it), lists the files of all groups in one recursive listing rather than one per group, and
``inspect`` sizes groups from that listing instead of one HEAD request per file. Damage is still
found, and a group written after the listing is still read.
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import precompute_config, write_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scale_support  # noqa: E402  (registers countfs://)

SHARDS = 10


@pytest.fixture(scope="module")
def ten_groups(tmp_path_factory, teacher_weights):
    from kdcache.tools.precompute import precompute

    root = tmp_path_factory.mktemp("req")
    write_dataset(root / "train", shards=SHARDS, per_shard=2, seed=4)
    precompute(precompute_config(root / "train", root / "cache.zarr", teacher_weights, views=2, topk=2))
    return root


@pytest.fixture
def counted(tmp_path, monkeypatch):
    """The request log of this test: a function returning [(method, path relative to the cache, outcome)]."""
    log = tmp_path / "requests.log"
    monkeypatch.setenv(scale_support.ENV_REQUESTS, str(log))
    monkeypatch.setenv(scale_support.ENV_LATENCY, "0")

    def read(cache: Path):
        if not log.exists():
            return []
        out = []
        for line in log.read_text().splitlines():
            f = line.split("\t")
            out.append((f[3], f[5].replace(str(cache), "").lstrip("/"), f[6]))
        return out

    return read


def _copy(src: Path, dst: Path) -> str:
    shutil.copytree(src, dst)
    return f"countfs://{dst}"


def test_reading_every_group_lists_the_cache_once_and_reads_group_metadata_once(ten_groups, counted, tmp_path):
    from kdcache.cache.store import CacheReader

    url = _copy(ten_groups / "cache.zarr", tmp_path / "c.zarr")
    r = CacheReader(url)
    names = r.shard_names()
    assert len(names) == SHARDS
    for name in names:
        assert r.is_complete(name) and r.shard_attrs(name)["complete"]
        assert r.check_shard(name) == 2
        r.read_view(name, 1)
    reqs = counted(tmp_path / "c.zarr")
    finds = [p for m, p, _ in reqs if m == "find"]
    assert len(finds) == 2  # the first group alone, then every group in one listing (not one per group)
    group_meta = Counter(p for m, p, _ in reqs if m == "cat_file" and p.count("/") == 1 and p.endswith("zarr.json"))
    # once each, by the shard listing; the first listed group once more on open, where its decode record is
    # compared with the manifest (an edited manifest is named before anything is read): O(1), not per shard
    assert group_meta == {f"{n}/zarr.json": 1 + (n == names[0]) for n in names}


def test_reading_one_group_reads_only_that_group(ten_groups, counted, tmp_path):
    """A data worker's reader needs the groups of its shards only: no listing of the root, no other
    group's metadata."""
    from kdcache.cache.store import CacheReader

    url = _copy(ten_groups / "cache.zarr", tmp_path / "c.zarr")
    r = CacheReader(url)
    assert len(r.read_view("train-000007", 1)) == 2
    assert not r.has_shard("train-000099") and r.has_shard("train-000003")
    reqs = counted(tmp_path / "c.zarr")
    assert [p for m, p, _ in reqs if m in ("ls", "find") and p == ""] == []  # the root is never listed
    groups = {p.split("/")[0] for m, p, _ in reqs if p.count("/") == 1 and p.endswith("zarr.json")}
    # and the first listed group, whose decode record is compared with the manifest on open
    assert groups == {"train-000007", "train-000099", "train-000003", "train-000000"}
    assert sum(1 for m, p, _ in reqs if p == "train-000007/zarr.json") == 1


def test_a_missing_chunk_is_found_through_the_shared_listing(ten_groups, tmp_path):
    from kdcache.errors import KdcacheError
    from kdcache.cache.store import CacheReader

    url = _copy(ten_groups / "cache.zarr", tmp_path / "c.zarr")
    victim = tmp_path / "c.zarr" / "train-000005" / "logprobs" / "c"
    shutil.rmtree(victim)
    r = CacheReader(url)
    for name in [f"train-{i:06d}" for i in range(5)]:
        r.check_shard(name)  # the whole-cache listing was taken at the second of these
    assert r._all_files is not None
    with pytest.raises(KdcacheError, match=r"train-000005.*'logprobs'.*chunk file"):
        r.check_shard("train-000005")


def test_a_group_written_after_the_listing_is_listed_on_its_own(ten_groups, teacher_weights, tmp_path):
    from kdcache.tools.precompute import precompute
    from kdcache.cache.store import CacheReader

    data = ten_groups / "train"
    out = tmp_path / "c.zarr"
    precompute(precompute_config(data, out, teacher_weights, views=2, topk=2, shard_index=0, num_shard_groups=2))
    r = CacheReader(f"countfs://{out}")
    assert r.check_shard("train-000000") == 2 and r.check_shard("train-000002") == 2  # listing of 5 groups
    # the listing came with the second group and dropped it once checked (the first was listed alone)
    assert sorted(r._all_files) == [f"train-{i:06d}" for i in (0, 4, 6, 8)]
    precompute(precompute_config(data, out, teacher_weights, views=2, topk=2))  # the odd groups now
    assert r.check_shard("train-000001") == 2  # not in the listing: listed alone, found complete
    ref = CacheReader(str(ten_groups / "cache.zarr"))
    assert (r.read_view("train-000001", 0).classes == ref.read_view("train-000001", 0).classes).all()


def test_inspect_sizes_groups_from_the_listing(ten_groups, counted, tmp_path):
    from kdcache.tools.inspection import summarize

    local = summarize(str(ten_groups / "cache.zarr"))
    url = _copy(ten_groups / "cache.zarr", tmp_path / "c.zarr")
    remote = summarize(url)
    on_disk = sum(f.stat().st_size for g in (ten_groups / "cache.zarr").iterdir() if g.is_dir()
                  for f in g.rglob("*") if f.is_file())
    assert remote["totals"]["bytes"] == local["totals"]["bytes"] == on_disk
    assert remote["totals"]["raw_bytes"] == local["totals"]["raw_bytes"] > 0
    methods = Counter(m for m, _, _ in counted(tmp_path / "c.zarr"))
    assert methods["info"] == 0  # no HEAD per file
    # per group: its arrays' metadata (a listing and one read each) and its data, nothing read twice
    arrays = 8
    assert methods["cat_file"] <= 2 + SHARDS * (1 + 2 * arrays)  # + the decode-record probe on open
