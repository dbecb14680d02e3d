"""Storage requests of the read paths, counted on ``countfs://`` (benchmarks/scale_support.py: the
local disk behind an fsspec filesystem that logs every request object storage would see).

A reader of a remote cache reads each complete group's metadata once (the shard listing already
reads it), lists the files of all groups in one recursive listing rather than one per group, and
``inspect`` sizes groups from that listing instead of one HEAD request per file. Damage is still
found, and a group written after the listing is still read.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import precompute_config, write_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scale_support  # noqa: E402  (registers countfs://)
from kdcache.cache.store.index import INDEX_DIR  # noqa: E402

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


# ---- the index of complete groups (kdcache/cache/store/index.py) -----------------------------------


def _remote_cache(root: Path, teacher_weights, shards: int) -> tuple[Path, str]:
    """A cache written straight to countfs:// (so its writer keeps the index), and its data."""
    from kdcache.tools.precompute import precompute

    data, out = root / f"train{shards}", root / f"cache{shards}.zarr"
    if not out.exists():
        write_dataset(data, shards=shards, per_shard=2, seed=4)
        precompute(precompute_config(data, f"countfs://{out}", teacher_weights, views=2, topk=2))
    return data, out


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, teacher_weights):
    root = tmp_path_factory.mktemp("idx")
    return {n: _remote_cache(root, teacher_weights, n) for n in (SHARDS, 3 * SHARDS)}


def _restart_log() -> None:
    """Empty the request log (truncated, not removed: the logger keeps its file open)."""
    open(os.environ[scale_support.ENV_REQUESTS], "w").close()


def _start_up(out: Path, data: Path) -> int:
    """Open a cache and run train's start-up checks on it (shard list, prepare_shards,
    check_cache_groups); the number of groups checked."""
    from kdcache.learn.replay import check_cache_groups, prepare_shards
    from kdcache.cache.store import CacheReader

    r = CacheReader(f"countfs://{out}")
    names = [n for n in r.shard_names() if r.is_complete(n)]
    urls = sorted(str(p) for p in data.glob("*.tar"))
    assert [Path(u).stem for u in urls] == names
    shards = prepare_shards(urls, r, False, scan_local=False)
    check_cache_groups(r, [s.name for s in shards], workers=1)
    return len(shards)


def test_index_open_and_start_up_requests_do_not_grow_with_shards(indexed, counted, tmp_path):
    """Metadata requests (reads of zarr.json, listings, heads) of open + train start-up are the same
    for 10 and 30 groups: the index and one recursive listing replace several requests per group.
    What remains per group is its data (check_cache_groups reads every view against its digest)."""
    per = {}
    for shards, (data, out) in indexed.items():
        _restart_log()
        assert _start_up(out, data) == shards
        reqs = counted(out)
        meta = [(m, p) for m, p, _ in reqs if p.endswith("zarr.json") or m in ("ls", "find", "info", "exists")]
        data_reads = [p for m, p, _ in reqs if not p.endswith("zarr.json") and m == "cat_file"]
        # the manifest, the first group's decode record (the open's probe), the index, the root's names,
        # the first group's files, then every group's files in one listing: no zarr.json read per group
        # (groups are read from several threads: the two listings may come in either order)
        assert meta[:4] == [("cat_file", "zarr.json"), ("cat_file", "train-000000/zarr.json"), ("ls", ".index"),
                            ("ls", "")], meta
        assert sorted(meta[4:]) == [("find", ""), ("find", "train-000000")], meta
        per[shards] = (len(meta), len(data_reads))
    assert per[SHARDS][0] == per[3 * SHARDS][0], per
    # every group's data is still read (the digest check): one read per array per group, nothing more
    arrays = 8
    assert per[3 * SHARDS][1] - per[SHARDS][1] == 2 * SHARDS * arrays, per


def test_start_up_reads_remote_groups_at_once(indexed, counted, monkeypatch):
    """On a remote cache the start-up check waits on its groups' reads together, not one group after
    the other: with a fixed latency per request, a serial check ends its data reads at least one
    latency apart; here many end within half of one. The same requests are made either way."""
    latency_ms = 30
    data, out = indexed[3 * SHARDS]
    monkeypatch.setenv(scale_support.ENV_LATENCY, str(latency_ms))
    log = Path(os.environ[scale_support.ENV_REQUESTS])
    _restart_log()
    assert _start_up(out, data) == 3 * SHARDS
    ends = sorted(float(line.split("\t")[0]) for line in log.read_text().splitlines()
                  if line.split("\t")[4] == "data")
    close = sum(b - a < latency_ms / 2000 for a, b in zip(ends, ends[1:]))
    assert close >= len(ends) // 2, (close, len(ends))
    threaded = len(ends)
    monkeypatch.setenv(scale_support.ENV_LATENCY, "0")
    import kdcache.cache.store.reader as store_reader

    monkeypatch.setattr(store_reader, "REMOTE_READS_AT_ONCE", 1)  # one at a time: the same data reads
    _restart_log()
    assert _start_up(out, data) == 3 * SHARDS
    assert sum(line.split("\t")[4] == "data" for line in log.read_text().splitlines()) == threaded


def _index_entries(out: Path) -> dict:
    entries = {}
    for seg in (out / INDEX_DIR).iterdir():
        entries.update(json.loads(seg.read_text())["groups"])
    return entries


def test_index_segments_hold_every_complete_group(indexed):
    data, out = indexed[SHARDS]
    entries = _index_entries(out)
    assert sorted(entries) == [f"train-{i:06d}" for i in range(SHARDS)]
    for name, e in entries.items():
        assert e["attrs"] == json.loads((out / name / "zarr.json").read_text())["attributes"]
        assert e["attrs"]["complete"] is True
        for key, size in e["files"].items():
            assert (out / name / key).stat().st_size == size


def test_index_absent_or_stale_falls_back_and_damage_is_named(indexed, tmp_path):
    from kdcache.errors import KdcacheError
    from kdcache.cache.store import CacheReader

    data, src = indexed[SHARDS]
    ref = CacheReader(f"countfs://{src}")
    want = {n: ref.read_view(n, 1).classes for n in ref.shard_names()}
    # no index: read as before, the same values
    plain = tmp_path / "plain.zarr"
    shutil.copytree(src, plain)
    shutil.rmtree(plain / INDEX_DIR)
    r = CacheReader(f"countfs://{plain}")
    assert r.load_index() == 0 and sorted(r.shard_names()) == sorted(want)
    assert all((r.read_view(n, 1).classes == c).all() for n, c in want.items())
    # a segment cut short (a writer killed mid-put on a store without atomic puts): skipped, read as stored
    cut = tmp_path / "cut.zarr"
    shutil.copytree(src, cut)
    for seg in (cut / INDEX_DIR).iterdir():
        seg.write_bytes(seg.read_bytes()[:100])
    r = CacheReader(f"countfs://{cut}")
    assert r.load_index() == 0 and sorted(r.shard_names()) == sorted(want)
    assert all(r.is_complete(n) and (r.read_view(n, 1).classes == c).all() for n, c in want.items())
    # an entry whose group lost a chunk, and one whose group was deleted: named on read, never read as fill
    bad = tmp_path / "bad.zarr"
    shutil.copytree(src, bad)
    shutil.rmtree(bad / "train-000005" / "logprobs" / "c")
    shutil.rmtree(bad / "train-000007")
    r = CacheReader(f"countfs://{bad}")
    assert r.load_index() == SHARDS
    names = r.shard_names()
    assert "train-000007" not in names and r.is_complete("train-000005")
    for n in names[:5]:
        assert (r.read_view(n, 1).classes == want[n]).all()
    with pytest.raises(KdcacheError, match=r"train-000005.*'logprobs'.*chunk file"):
        r.check_shard("train-000005")
    with pytest.raises(KdcacheError, match=r"no shard group 'train-000007'"):
        r.check_shard("train-000007")
    # a group redone as incomplete behind its entry (a killed rewrite): the entry is not believed
    redo = tmp_path / "redo.zarr"
    shutil.copytree(src, redo)
    meta = redo / "train-000003" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["complete"] = False
    meta.write_text(json.dumps(doc))
    shutil.rmtree(redo / "train-000003" / "box" / "c")
    r = CacheReader(f"countfs://{redo}")
    r.load_index()
    with pytest.raises(KdcacheError, match=r"train-000003.*incomplete"):
        r.check_shard("train-000003")


def test_resume_finds_what_is_left_from_the_index(indexed, teacher_weights, counted, tmp_path):
    """A resumed precompute asks nothing of a group the index records complete (one listing of the
    index, its segments, one recursive listing), and finishes the cache equal to a one-run cache."""
    from kdcache.tools.precompute import precompute
    from kdcache.cache.store import CacheReader

    data, ref = indexed[SHARDS]
    out = tmp_path / "half.zarr"
    precompute(precompute_config(data, f"countfs://{out}", teacher_weights, views=2, topk=2, shard_index=0,
                                 num_shard_groups=2))
    _restart_log()
    precompute(precompute_config(data, f"countfs://{out}", teacher_weights, views=2, topk=2))
    reqs = counted(out)
    done = {f"train-{i:06d}" for i in range(0, SHARDS, 2)}
    touched = [(m, p) for m, p, _ in reqs if p.split("/")[0] in done]
    # only the open's decode-record probe of the first group (O(1)): nothing per complete group
    assert touched == [("cat_file", "train-000000/zarr.json")], touched
    assert [p for m, p, _ in reqs if m == "find" and p == ""] == [""]  # one listing of the whole cache
    a, b = CacheReader(f"countfs://{out}"), CacheReader(str(ref))
    assert a.shard_names() == b.shard_names()
    # two writers, two segments; together they say what one writer's segment says (which writer wrote
    # a group is all that differs: the index is rank-independent as a union)
    assert len(list((out / INDEX_DIR).iterdir())) == 2
    assert _index_entries(out) == _index_entries(ref)
    for n in b.shard_names():
        assert (a.read_view(n, 0).logprobs == b.read_view(n, 0).logprobs).all()


def test_a_grown_remote_cache_reads_its_grown_groups_from_the_index(indexed, teacher_weights, tmp_path):
    """Growing a remote cache (V 2 -> 4) adds a segment whose entries hold every group again, at 4
    views, beside the first writer's entries at 2: the reader takes the 4-view entries (more views
    win), believes them (their files are the ones listed), and reads the views the group had
    unchanged."""
    import shutil

    import fsspec

    from kdcache.cache.store import CacheReader
    from kdcache.cache.store.index import read_index
    from kdcache.tools.precompute import precompute

    data, ref = indexed[SHARDS]
    out = tmp_path / "grown.zarr"
    shutil.copytree(ref, out)
    s = precompute(precompute_config(data, f"countfs://{out}", teacher_weights, views=4, topk=2))
    assert (s["shards_grown"], s["growth_finished"]) == (SHARDS, True)
    segments = [json.loads(p.read_text())["groups"] for p in (out / INDEX_DIR).iterdir()]
    assert sorted(len(g) for g in segments) == [SHARDS, SHARDS]
    found = read_index(fsspec.filesystem("file"), str(out))
    assert {e["attrs"]["views"] for e in found.values()} == {4}
    a, b = CacheReader(f"countfs://{out}"), CacheReader(str(ref))
    assert a.load_index() == SHARDS
    for n in b.shard_names():
        assert a.view_digests(n)[:2] == b.view_digests(n) and n in a._index  # the entry was believed
        assert (a.read_view(n, 1).logprobs == b.read_view(n, 1).logprobs).all()


def test_a_data_worker_with_the_index_reads_no_group_metadata(indexed, counted):
    """A data worker's reader (ReplayStream._open_reader loads the index) reads a group's views with
    no zarr.json of that group or its arrays: only the index, the file listing and the data."""
    from kdcache.cache.store import CacheReader

    data, out = indexed[SHARDS]
    _restart_log()
    r = CacheReader(f"countfs://{out}")
    assert r.load_index() == SHARDS
    for name in ("train-000004", "train-000006"):
        assert len(r.read_view(name, 1)) == 2
    meta = [p for m, p, _ in counted(out) if p.endswith("zarr.json")]
    assert meta == ["zarr.json", "train-000000/zarr.json"], meta  # the manifest and the open's probe only


def test_read_ahead_keeps_order_bounds_the_threads_and_raises_in_turn(indexed):
    """``CacheReader.read_ahead``: results in the names' order; on a remote cache several calls run
    at once but never more than asked; an error surfaces when its name's turn comes (the names
    before it are all delivered); a local cache runs one call at a time, in order."""
    import threading
    import time

    from kdcache.cache.store import CacheReader
    from kdcache.errors import KdcacheError

    data, out = indexed[3 * SHARDS]
    state = {"now": 0, "most": 0}
    lock = threading.Lock()

    def slow(name):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.02)
        with lock:
            state["now"] -= 1
        if name == "bad":
            raise KdcacheError("bad group")
        return name.upper()

    r = CacheReader(f"countfs://{out}")
    names = [f"g{i}" for i in range(20)]
    assert list(r.read_ahead(names, slow, at_once=4)) == [n.upper() for n in names]
    assert 1 < state["most"] <= 4, state
    got = []
    with pytest.raises(KdcacheError, match="bad group"):
        for x in r.read_ahead(names[:5] + ["bad"] + names[5:], slow, at_once=4):
            got.append(x)
    assert got == [n.upper() for n in names[:5]]
    state["most"] = 0
    local = CacheReader(str(out))
    assert list(local.read_ahead(names, slow)) == [n.upper() for n in names] and state["most"] == 1


def test_a_data_worker_reads_a_remote_caches_views_ahead(indexed, counted, monkeypatch):
    """An epoch's stream reads its shards' views ahead on a remote cache (waiting together, as train
    start-up does): with a fixed latency per request, many data reads end within half a latency of
    the previous one, which one group after another cannot do."""
    from kdcache.learn.replay import ReplayStream, StreamConfig, prepare_shards
    from kdcache.cache.store import CacheReader

    latency_ms = 30
    data, out = indexed[3 * SHARDS]
    url = f"countfs://{out}"
    urls = sorted(str(p) for p in data.glob("*.tar"))
    shards = prepare_shards(urls, CacheReader(url), False, scan_local=False)
    stream = ReplayStream(shards, StreamConfig(cache=url, batch_size=4, res=16, seed=0, with_targets=True))
    monkeypatch.setenv(scale_support.ENV_LATENCY, str(latency_ms))
    log = Path(os.environ[scale_support.ENV_REQUESTS])
    _restart_log()
    records = sum(len(b) for b in stream if hasattr(b, "keys"))
    assert records == sum(s.count for s in shards)
    ends = sorted(float(line.split("\t")[0]) for line in log.read_text().splitlines()
                  if line.split("\t")[4] == "data")
    close = sum(b - a < latency_ms / 2000 for a, b in zip(ends, ends[1:]))
    assert close >= len(ends) // 2, (close, len(ends))


def test_inspect_lists_the_cache_once_while_reading_ahead(indexed, counted):
    """inspect's summary reads a remote cache's groups ahead; their sizes still come from the one
    listing of the whole cache (taken before reading drops a checked group's part of it), so no
    group is listed on its own but the first."""
    from kdcache.tools.inspection import summarize

    data, out = indexed[3 * SHARDS]
    _restart_log()
    s = summarize(f"countfs://{out}")
    assert s["totals"]["bytes"] > 0 and len([r for r in s["shards"] if r["complete"]]) == 3 * SHARDS
    finds = [p for m, p, _ in counted(out) if m == "find"]
    assert sorted(finds) == ["", "train-000000"], finds
