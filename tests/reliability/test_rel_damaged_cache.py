"""Faults in a finished cache: a chunk file deleted, emptied or cut short.

Zarr reads a missing chunk as the array's fill value without a word: with `logprobs`' data file
of one group removed, training ran on log-probability 0.0 and inspect reported a top-5 mass of
2.0. A truncated chunk gave a raw zarr/numcodecs traceback and exit code 1 (which for `verify`
means "records disagree"). Both are now a KdcacheError naming the cache, the group and the array
(exit code 2 on the command line).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from kdcache.cli import cli
from kdcache.errors import KdcacheError
from kdcache.cache.store import ARRAYS, EVERY_CHUNK_ATTR, CacheReader, CacheWriter
from relhelpers import manifest, records, same

G = "train-000001"


@pytest.fixture
def cache_copy(cache, tmp_path):
    """A copy of the session's precomputed cache (3 groups, V=3, k=3), free to damage."""
    dst = tmp_path / "cache.zarr"
    shutil.copytree(cache, dst)
    return dst


def _data_file(cache, group, array):
    files = [p for p in (cache / group / array).rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(files) == 1, files  # one data file per array (docs/format.md)
    return files[0]


def _inspect(cache):
    return CliRunner().invoke(cli, ["inspect", str(cache)])


@pytest.mark.parametrize("array", ["logprobs", "keys", "size", "flip", "mix_lam"])
def test_deleted_chunk_file_is_named_not_read_as_fill(cache, cache_copy, array):
    _data_file(cache_copy, G, array).unlink()
    r = CacheReader(str(cache_copy))
    want = (f"cache group '{G}' in {cache_copy} has no data for array '{array}' (its chunk file "
            f"{'c/0/0/0' if array == 'logprobs' else 'c/0/0'} is missing): the cache is damaged; re-run "
            "precompute on that shard after deleting the group, or restore it")
    for read in (lambda: r.read_view(G, 1), lambda: r.read_shard(G), lambda: r.keys(G), lambda: r.sizes(G),
                 lambda: r.check_shard(G)):
        with pytest.raises(KdcacheError) as ei:
            got = read()
            pytest.fail(f"read without an error: {got!r:.200}")
        assert str(ei.value) == want
    assert r.is_complete(G)  # it says complete; the data check is what refuses it
    # the other groups still read, equal to the undamaged cache's
    intact = CacheReader(str(cache)).read_view("train-000000", 1)
    assert np.array_equal(r.read_view("train-000000", 1).logprobs, intact.logprobs) and intact.logprobs.shape == (7, 3)
    res = _inspect(cache_copy)
    assert res.exit_code == 2 and "has no data for array" in res.output and "Traceback" not in res.output, res.output


def test_empty_chunk_file_is_named(cache_copy):
    _data_file(cache_copy, G, "logprobs").write_bytes(b"")
    with pytest.raises(KdcacheError, match=r"has no data for array 'logprobs' \(its chunk file c/0/0/0 is empty\)"):
        CacheReader(str(cache_copy)).read_view(G, 0)


def test_writer_does_not_count_a_damaged_group_as_complete(cache_copy):
    """precompute's resume asks the writer: a group marked complete whose data is gone is not
    complete, and is never silently overwritten either: the user is told what to do."""
    _data_file(cache_copy, G, "classes").unlink()
    m = zarr.open_group(str(cache_copy), mode="r").attrs["kdcache"]
    w = CacheWriter(str(cache_copy), m)
    assert w.is_complete("train-000000") and not w.is_complete(G)
    with pytest.raises(KdcacheError, match=rf"'{G}' .* is marked complete but has no data for array 'classes' .* "
                                           rf"delete the group's directory \({G}/\) and re-run"):
        w.claim(G)
    shutil.rmtree(cache_copy / G)  # what the message says to do
    assert w.claim(G) is not None


@pytest.mark.parametrize("array,cut", [("logprobs", 0.5), ("logprobs", 0.9), ("keys", 0.5), ("classes", 0.3),
                                       ("mix_lam", 0.5)])
def test_truncated_chunk_file_is_a_clean_error(cache_copy, array, cut):
    f = _data_file(cache_copy, G, array)
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * cut)])
    r = CacheReader(str(cache_copy))
    pattern = (rf"cannot read array '{array}' of cache group '{G}' in {cache_copy}: the stored data is damaged "
               r"\(.*\); re-run precompute on that shard after deleting the group, or restore it")
    read = (lambda: r.keys(G)) if array == "keys" else (lambda: r.read_view(G, 1))
    with pytest.raises(KdcacheError, match=pattern):
        read()
    with pytest.raises(KdcacheError, match=pattern):
        r.read_shard(G)
    res = _inspect(cache_copy)
    assert res.exit_code == 2, res.output
    assert f"cannot read array '{array}' of cache group '{G}'" in res.output and "Traceback" not in res.output


def test_damaged_array_metadata_is_a_clean_error(cache_copy):
    meta = cache_copy / G / "logprobs" / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:100])
    with pytest.raises(KdcacheError, match=rf"cannot read the arrays' metadata of cache group '{G}' .* damaged"):
        CacheReader(str(cache_copy)).read_view(G, 0)


def test_unparseable_group_metadata_spoils_only_that_group(cache_copy):
    """A group's zarr.json cut short (a store that writes in place, killed mid-update): listing the
    cache still works, the other groups read, that one is named, and precompute redoes it."""
    (cache_copy / G / "zarr.json").write_bytes(b'{"zarr_format": 3, "node_ty')
    r = CacheReader(str(cache_copy))
    assert r.shard_names() == ["train-000000", "train-000001", "train-000002"]
    assert len(r.read_view("train-000002", 0)) == 7 and not r.is_complete(G)
    with pytest.raises(KdcacheError, match=rf"cannot read the metadata of cache group '{G}' .* damaged"):
        r.read_view(G, 0)
    w = CacheWriter(str(cache_copy), zarr.open_group(str(cache_copy), mode="r").attrs["kdcache"])
    assert not w.is_complete(G) and w.claim(G) is not None


# ---- what the writer stores, so that the reader can check it -----------------------------------


def test_every_chunk_is_stored_and_fill_values_are_not_data(tmp_path):
    """zarr skips a chunk equal to the fill value (here: flip all False), which made "no file"
    ambiguous. Groups written now store every chunk and say so."""
    out = tmp_path / "c.zarr"
    w = CacheWriter(str(out), manifest(["s0"]))
    rec = records(4, 3)
    rec["flip"][:] = False
    w.write_shard("s0", source="/d/s0.tar", claim=w.claim("s0"), **rec)
    g = zarr.open_group(str(out / "s0"), mode="r")
    assert g.attrs[EVERY_CHUNK_ATTR] is True
    assert (out / "s0" / "flip" / "c" / "0" / "0").is_file()
    assert np.isnan(g["logprobs"].fill_value) and np.isnan(g["mix_lam"].fill_value)
    assert g["keys"].fill_value == 0xFF and g["classes"].fill_value == -2 and g["mix_with"].fill_value == -2
    assert g["size"].fill_value == -2 and g["box"].fill_value == np.iinfo(np.uint16).max
    assert same(CacheReader(str(out)).read_shard("s0"), rec)
    (out / "s0" / "flip" / "c" / "0" / "0").unlink()
    with pytest.raises(KdcacheError, match="has no data for array 'flip'"):
        CacheReader(str(out)).read_view("s0", 0)


def test_groups_written_before_still_read(tmp_path):
    """A group from an earlier kdcache (no every_chunk_stored attribute; zarr's default fill 0 and
    skipped all-fill chunks): an all-False flip has no file and still reads; a missing logprobs
    file (k >= 2: cannot be all zeros) is still refused."""
    out = tmp_path / "c.zarr"
    w = CacheWriter(str(out), manifest(["s0"]))
    rec = records(4, 3)
    rec["flip"][:] = False
    w.write_shard("s0", source="/d/s0.tar", claim=w.claim("s0"), **rec)
    g = zarr.open_group(str(out / "s0"), mode="r+")
    del g.attrs[EVERY_CHUNK_ATTR]
    (out / "s0" / "flip" / "c" / "0" / "0").unlink()
    r = CacheReader(str(out))
    assert not r.read_view("s0", 0).flip.any() and same(r.read_shard("s0"), rec)
    (out / "s0" / "logprobs" / "c" / "0" / "0" / "0").unlink()
    with pytest.raises(KdcacheError, match="has no data for array 'logprobs'"):
        CacheReader(str(out)).read_view("s0", 0)


def test_groups_written_before_truncated_unsharded_chunk(tmp_path):
    """Chunks without a checksum (groups from an earlier kdcache): Blosc decodes a truncated chunk
    into garbage without an error, so the reader compares the file's size with the compressed
    size in its Blosc header."""
    from zarr.codecs import BloscCodec, BloscShuffle

    out = tmp_path / "c.zarr"
    w = CacheWriter(str(out), manifest(["s0"]))
    rec = records(6, 3)
    w.write_shard("s0", source="/d/s0.tar", claim=w.claim("s0"), **rec)
    g = zarr.open_group(str(out / "s0"), mode="r+")
    del g.attrs[EVERY_CHUNK_ATTR]
    for a, data in (("size", rec["size"]), ("keys", g["keys"][:])):  # as the earlier writer stored them
        arr = g.create_array(a, shape=data.shape, chunks=data.shape, dtype=data.dtype, overwrite=True,
                             compressors=BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.bitshuffle))
        arr[...] = data
    assert same(CacheReader(str(out)).read_shard("s0"), rec)
    f = out / "s0" / "size" / "c" / "0" / "0"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])
    plain = zarr.open_array(str(out / "s0" / "size"), mode="r")[:]
    assert not np.array_equal(plain, rec["size"])  # plain zarr: garbage, without an error
    want = (r"cannot read array 'size' of cache group 's0' .*: the stored data is damaged "
            rf"\(its chunk file c/0/0 is {len(raw) // 2} bytes, its Blosc header says {len(raw)}\)")
    with pytest.raises(KdcacheError, match=want):
        CacheReader(str(out)).read_view("s0", 0)


def test_empty_groups_need_no_files(tmp_path):
    out = tmp_path / "c.zarr"
    w = CacheWriter(str(out), manifest(["s0"]))
    w.write_shard("s0", source="/d/s0.tar", claim=w.claim("s0"), **records(0, 1))
    r = CacheReader(str(out))
    assert len(r.read_view("s0", 1)) == 0 and sorted(r.read_shard("s0")) == sorted(ARRAYS)
