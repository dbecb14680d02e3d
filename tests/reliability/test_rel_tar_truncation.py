"""Fault: a shard tar cut short (a partial copy, a full disk, an interrupted download).

Python's tarfile treats a truncated or garbage header block as the end of the archive and stops
without an error, so a shard cut after 6 of its 12 samples used to read as a 6-sample shard (and
precompute marked it complete). Both read paths must notice: ``iter_samples`` (a stream, local
or not: it can never seek) and ``scan_keys`` (local: headers only, seeking over member data).
"""

from __future__ import annotations

import gzip
import io
import subprocess
import tarfile
from pathlib import Path

import fsspec
import pytest
import webdataset as wds

from kdcache.errors import KdcacheError
from kdcache.data.shards import iter_samples, scan_keys

N = 12


def _shard(path: Path) -> list[tarfile.TarInfo]:
    """12 samples (jpg bytes + cls) written by webdataset's TarWriter; returns the members."""
    with wds.TarWriter(str(path)) as w:
        for i in range(N):
            w.write({"__key__": f"k{i:04d}", "jpg": bytes([i + 1]) * (1500 + 37 * i), "cls": str(i % 5).encode()})
    with tarfile.open(path) as t:
        return t.getmembers()


def _cut_points(members: list[tarfile.TarInfo], size: int) -> dict[str, tuple[int, str, int]]:
    """name -> (cut offset, expected last good key, samples read before it)."""
    by_name = {m.name: m for m in members}
    first7 = min((m for m in members if m.name.startswith("k0006.")), key=lambda m: m.offset)
    jpg7 = by_name["k0006.jpg"]
    last = max(members, key=lambda m: m.offset_data)
    end = last.offset_data + -(-last.size // 512) * 512  # where the end-of-archive blocks start
    assert end + 1024 <= size
    return {
        # the fault as found: the cut falls inside the 7th sample's first header
        "inside_header": (first7.offset + 100, "k0005", 6),
        # inside the PAX extended header that precedes the jpg's ustar header
        "inside_pax_header": (jpg7.offset + 700, "k0006", 7),
        "inside_member_data": (jpg7.offset_data + 700, "k0006", 7),
        "at_member_boundary": (first7.offset, "k0005", 6),
        "just_before_end_blocks": (end, "k0011", 12),
        "between_the_end_blocks": (end + 512, "k0011", 12),
        "inside_first_end_block": (end + 100, "k0011", 12),
    }


CUTS = ["inside_header", "inside_pax_header", "inside_member_data", "at_member_boundary",
        "just_before_end_blocks", "between_the_end_blocks", "inside_first_end_block"]
WHERE = {
    "inside_header": "inside a tar header",
    "inside_pax_header": "inside a tar header",
    "inside_member_data": "inside the data of member 'k0006.jpg'",
    "at_member_boundary": "without the end-of-archive marker",
    "just_before_end_blocks": "without the end-of-archive marker",
    "between_the_end_blocks": "inside the end-of-archive marker",
    "inside_first_end_block": "inside the end-of-archive marker",
}


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    d = tmp_path_factory.mktemp("tars")
    path = d / "intact.tar"
    members = _shard(path)
    return path, members


def _truncated(intact, tmp_path, cut):
    path, members = intact
    data = path.read_bytes()
    offset, key, n = _cut_points(members, len(data))[cut]
    out = tmp_path / "train-000007.tar"
    out.write_bytes(data[:offset])
    return out, offset, key, n


def _readers(path: Path):
    """Every way kdcache reads a shard: the stream from a local file, through `pipe:`, through
    fsspec (a non-seekable remote stand-in), and the local header scan."""
    url_mem = f"memory://kdcache-rel/{path.parent.name}/{path.name}"
    with fsspec.open(url_mem, "wb") as f:
        f.write(path.read_bytes())
    return {
        "iter_samples(local)": lambda: [s.key for s in iter_samples(str(path))],
        "iter_samples(pipe:)": lambda: [s.key for s in iter_samples(f"pipe:cat {path}")],
        "iter_samples(fsspec)": lambda: [s.key for s in iter_samples(url_mem)],
        "scan_keys(local)": lambda: scan_keys(str(path))[0],
        "scan_keys(fsspec)": lambda: scan_keys(url_mem)[0],
    }


@pytest.mark.parametrize("cut", CUTS)
def test_truncated_tar_is_refused_by_every_reader(intact, tmp_path, cut):
    path, offset, key, n = _truncated(intact, tmp_path, cut)
    for how, read in _readers(path).items():
        with pytest.raises(KdcacheError) as ei:
            got = read()
            pytest.fail(f"{how} read {len(got)} of {N} samples from a tar cut {cut} without an error")
        msg = str(ei.value)
        shown = "pipe:cat " if "pipe" in how else ("memory://" if "fsspec" in how else "")
        assert f"shard {shown}" in msg and "train-000007.tar is truncated after key " in msg, (how, msg)
        assert f"after key '{key}' ({n} samples read)" in msg, (how, msg)
        assert WHERE[cut] in msg and f"at byte {offset}" in msg, (how, msg)
        assert msg.endswith("re-copy or re-pack it"), (how, msg)


def test_truncated_gzip_tar_is_refused(intact, tmp_path):
    path, members = intact
    data = path.read_bytes()
    gz = gzip.compress(data[: _cut_points(members, len(data))["at_member_boundary"][0]])
    (tmp_path / "a.tar.gz").write_bytes(gz)
    for read in (lambda: list(iter_samples(str(tmp_path / "a.tar.gz"))), lambda: scan_keys(str(tmp_path / "a.tar.gz"))):
        with pytest.raises(KdcacheError, match=r"a\.tar\.gz is truncated after key 'k0005' \(6 samples read\)"):
            read()
    # the compressed stream itself cut short
    whole = gzip.compress(data)
    (tmp_path / "b.tar.gz").write_bytes(whole[: len(whole) // 2])
    for read in (lambda: list(iter_samples(str(tmp_path / "b.tar.gz"))), lambda: scan_keys(str(tmp_path / "b.tar.gz"))):
        with pytest.raises(KdcacheError, match=r"b\.tar\.gz is truncated after key .*compressed stream"):
            read()


def test_garbage_header_and_lone_zero_block_are_refused(intact, tmp_path):
    """tarfile also stops silently at a header whose checksum is wrong, and at a single zero
    block in the middle of an archive: both lose every sample after them."""
    path, members = intact
    data = bytearray(path.read_bytes())
    first7 = min((m for m in members if m.name.startswith("k0006.")), key=lambda m: m.offset)
    bad = bytearray(data)
    bad[first7.offset + 10 : first7.offset + 20] = b"garbage!!!"
    (tmp_path / "garbage.tar").write_bytes(bad)
    zero = bytearray(data)
    zero[first7.offset : first7.offset + 512] = bytes(512)  # one zero block where a header was
    (tmp_path / "zero.tar").write_bytes(zero)
    for name, pattern in (("garbage", r"damaged tar header at byte %d" % first7.offset),
                          ("zero", r"lone zero block at byte %d" % first7.offset)):
        for how, read in _readers(tmp_path / f"{name}.tar").items():
            with pytest.raises(KdcacheError, match=pattern):
                read()
                pytest.fail(how)


def test_concatenated_tars_are_refused(intact, tmp_path):
    """`cat a.tar b.tar` is a valid-looking tar of which tarfile reads only a.tar's samples."""
    path, _ = intact
    (tmp_path / "cat.tar").write_bytes(path.read_bytes() * 2)
    for how, read in _readers(tmp_path / "cat.tar").items():
        with pytest.raises(KdcacheError, match=r"cat\.tar has data after its end-of-archive marker"):
            read()
            pytest.fail(how)


# ---- intact tars of every common flavour still read in full ------------------------------------

LONG = "d" * 120  # longer than ustar's 100-byte name field


def _members():
    out = []
    for i in range(5):
        key = f"{LONG}/s{i}" if i % 2 else f"s{i}"
        out.append((f"{key}.jpg", bytes([i + 7]) * (100 + 600 * i)))
        out.append((f"{key}.cls", str(i).encode()))
    out.append(("__index__", b"{}"))  # a webdataset per-shard metadata member: skipped
    return out


def _keys_expected():
    return [f"{LONG}/s{i}" if i % 2 else f"s{i}" for i in range(5)]


@pytest.mark.parametrize("fmt", ["pax", "gnu", "ustar", "tarwriter", "gnu_tar_cli", "gzip"])
def test_intact_tars_read_in_full(tmp_path, fmt):
    path = tmp_path / ("s.tar.gz" if fmt == "gzip" else "s.tar")
    if fmt == "tarwriter":
        with wds.TarWriter(str(path)) as w:
            for i, key in enumerate(_keys_expected()):
                w.write({"__key__": key, "jpg": bytes([i + 7]) * (100 + 600 * i), "cls": str(i).encode()})
    elif fmt == "gnu_tar_cli":
        src = tmp_path / "src"
        for name, data in _members():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(data)
        names = [n for n, _ in _members()]
        subprocess.run(["tar", "--format=gnu", "-cf", str(path), "-C", str(src), *names], check=True)
    else:
        tar_fmt = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT,
                   "gzip": tarfile.PAX_FORMAT}[fmt]
        with tarfile.open(path, "w:gz" if fmt == "gzip" else "w", format=tar_fmt) as t:
            for name, data in _members():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    want = _keys_expected()
    for how, read in _readers(path).items():
        assert read() == want, how
    samples = list(iter_samples(str(path)))
    assert [s.cls for s in samples] == list(range(5))
    assert [len(s.image) for s in samples] == [100 + 600 * i for i in range(5)]


def test_intact_tar_with_trailing_zero_padding(intact, tmp_path):
    """Zero bytes after the end-of-archive marker (record padding, a block device) are fine."""
    path, _ = intact
    (tmp_path / "pad.tar").write_bytes(path.read_bytes() + bytes(30000))
    for how, read in _readers(tmp_path / "pad.tar").items():
        assert len(read()) == N, how


def test_a_reader_that_stops_early_does_not_raise(intact):
    """Callers may take the first few samples only (inspect does): no end-of-archive check then."""
    path, _ = intact
    it = iter_samples(str(path))
    assert [next(it).key for _ in range(3)] == ["k0000", "k0001", "k0002"]
    it.close()
