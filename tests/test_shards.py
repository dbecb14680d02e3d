"""WebDataset shards: finding them, reading them (and their errors), decoding, and `kdcache pack`."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import NUM_CLASSES, corrupt_jpeg, encode, make_image, write_dataset, write_imagefolder, write_tar
from kdcache.cli import cli
from kdcache.errors import BadImageError, KdcacheError
from kdcache.data.shards import (
    decode_image,
    expand_urls,
    iter_samples,
    load_class_names,
    pack_imagefolder,
    scan_keys,
    shard_name,
    webp_supported,
)

RNG = np.random.default_rng(0)
JPG = encode(make_image(RNG, 30, 20, 1), "jpg")
PNG = encode(make_image(RNG, 25, 35, 2), "png")


# ---- finding shards ----------------------------------------------------------------------------


def test_expand_brace_list_dir_glob(dataset):
    urls = sorted(str(p) for p in Path(dataset).glob("*.tar"))
    assert len(urls) == 3
    assert expand_urls(str(dataset)) == urls  # a directory
    assert expand_urls(str(dataset / "train-{000000..000002}.tar")) == urls  # a brace pattern
    assert expand_urls(str(dataset / "train-00000[12].tar")) == urls[1:]  # a glob
    assert expand_urls([urls[2], urls[0]]) == [urls[2], urls[0]]  # a list, order kept
    assert expand_urls("file:" + urls[0]) == [urls[0]]
    assert [shard_name(u) for u in urls] == ["train-000000", "train-000001", "train-000002"]
    assert shard_name("s3://bucket/x/val-01.tar.gz") == "val-01"


def test_expand_errors(dataset, tmp_path):
    with pytest.raises(KdcacheError, match="matched no shards"):
        expand_urls(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(KdcacheError, match=r"shard .*train-000003\.tar does not exist \(from pattern"):
        expand_urls(str(dataset / "train-{000000..000009}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(KdcacheError, match="holds no .tar shards"):
        expand_urls(str(tmp_path / "empty"))
    other = tmp_path / "copy"
    other.mkdir()
    (other / "train-000000.tar").write_bytes((dataset / "train-000000.tar").read_bytes())
    with pytest.raises(KdcacheError, match="share the name 'train-000000'"):
        expand_urls([str(dataset / "train-000000.tar"), str(other / "train-000000.tar")])


# ---- reading shards ----------------------------------------------------------------------------


def test_iter_samples_reads_real_shards(dataset):
    samples = list(iter_samples(str(dataset / "train-000001.tar")))
    assert [s.key for s in samples] == [f"train1_{i:04d}" for i in range(7)]  # tar order
    assert {s.ext for s in samples} == {"jpg", "png"}
    assert all(s.cls is not None and 0 <= s.cls < NUM_CLASSES for s in samples)
    ims = [decode_image(s) for s in samples]
    assert all(im.mode == "RGB" and 24 <= im.width < 64 and 24 <= im.height < 64 for im in ims)
    assert load_class_names(expand_urls(str(dataset))) == [f"class_{c}" for c in range(NUM_CLASSES)]


# A real 16x16 lossless WebP (red left half, green square in the middle), encoded once with
# Pillow + libwebp and kept as bytes, because the Pillow-SIMD under test may lack a WebP encoder.
WEBP_16 = bytes.fromhex(
    "524946463c000000574542505650384c2f0000002f0fc003001720904d4e92ff22160824010e3e964020c5914cf2fc07"
    "766e2090b459c9955cd1f30611fd0f8551af0c00"
)


def test_image_extensions_and_optional_cls(tmp_path):
    from PIL import Image
    import io

    p = write_tar(tmp_path / "s.tar", [("a.jpeg", JPG), ("b.png", PNG), ("b.cls", b" 3\n"), ("c.webp", WEBP_16),
                                        ("d.JPG", JPG), ("d.json", b"{}")])
    samples = list(iter_samples(p))
    assert [(s.key, s.ext, s.cls) for s in samples] == [("a", "jpeg", None), ("b", "png", 3), ("c", "webp", None), ("d", "jpg", None)]
    assert isinstance(Image.open(io.BytesIO(samples[0].image)), Image.Image)


def test_webp_decodes_or_says_why_not(tmp_path):
    """WebP needs libwebp in the PIL build: either it decodes, or the error says what to install."""
    p = write_tar(tmp_path / "s.tar", [("c.webp", WEBP_16)])
    (sample,) = iter_samples(p)
    if webp_supported():
        im = decode_image(sample)
        assert im.size == (16, 16) and im.mode == "RGB"
        assert im.getpixel((0, 0)) == (200, 30, 30) and im.getpixel((8, 8)) == (20, 200, 90)
    else:
        with pytest.raises(BadImageError, match=r"'c'.*no WebP support: install libwebp-dev"):
            decode_image(sample)


@pytest.mark.parametrize(
    "members,pattern",
    [
        # the same key twice, apart and in a row
        ([("a.jpg", JPG), ("b.jpg", JPG), ("a.jpg", JPG)], r"holds key 'a' twice"),
        ([("a.jpg", JPG), ("a.cls", b"1"), ("a.jpg", JPG)], r"holds key 'a' twice"),
        ([("a.txt", b"hello")], r"sample 'a' in shard .*s\.tar has no image"),
        ([("a.jpg", JPG), ("a.cls", b"dog")], r"sample 'a' in shard .*s\.tar has a cls entry that is not an integer"),
    ],
)
def test_bad_shard_contents(tmp_path, members, pattern):
    p = write_tar(tmp_path / "s.tar", members)
    with pytest.raises(KdcacheError, match=pattern):
        list(iter_samples(p))


@pytest.mark.parametrize("content", [b"", b"not a tar at all" * 64, "truncated"])
def test_unreadable_tar(tmp_path, dataset, content):
    pattern = r"cannot read shard .*broken\.tar"
    if content == "truncated":  # cut inside the second member's header (tests/reliability has more)
        content = (dataset / "train-000000.tar").read_bytes()[:3000]
        pattern = r"shard .*broken\.tar is truncated after key 'train0_0000' \(1 samples read\): .* at byte 3000"
    p = tmp_path / "broken.tar"
    p.write_bytes(content)
    with pytest.raises(KdcacheError, match=pattern):
        list(iter_samples(str(p)))
    with pytest.raises(KdcacheError, match=pattern):
        scan_keys(str(p))


def test_decode_error_names_shard_and_key(tmp_path):
    p = write_tar(tmp_path / "s.tar", [("good.jpg", JPG), ("bad.jpg", corrupt_jpeg())])
    good, bad = list(iter_samples(p))
    decode_image(good)
    with pytest.raises(BadImageError) as ei:
        decode_image(bad)
    assert ei.value.key == "bad" and ei.value.shard == p
    assert "'bad'" in str(ei.value) and "s.tar" in str(ei.value) and "truncated" in str(ei.value)
    assert "--skip-bad" in str(ei.value)


# ---- pack --------------------------------------------------------------------------------------


def _read_split(folder: Path):
    samples = [s for u in expand_urls(str(folder)) for s in iter_samples(u)]
    return samples, json.loads((folder / "classes.json").read_text())


def test_pack_imagefolder(tmp_path):
    files = write_imagefolder(tmp_path / "src", per_class=(6, 5, 4))
    by_bytes = {data: path for path, data in files.items()}
    res = CliRunner().invoke(cli, ["pack", str(tmp_path / "src"), str(tmp_path / "out"), "--shard-size", "4",
                                   "--val-fraction", "0.25"])
    assert res.exit_code == 0, res.output
    train, classes = _read_split(tmp_path / "out" / "train")
    val, val_classes = _read_split(tmp_path / "out" / "val")
    assert classes == val_classes == ["cls_a", "cls_b", "cls_c"]
    # every image once, byte for byte, with the label of its folder
    both = train + val
    assert sorted(by_bytes[s.image] for s in both) == sorted(files)
    for s in both:
        folder = by_bytes[s.image].split("/")[0]
        assert s.cls == classes.index(folder)
        assert s.ext == by_bytes[s.image].rsplit(".", 1)[1]
        assert "." not in s.key and s.key.startswith(folder)
    assert len({s.key for s in both}) == len(both)
    # the val split takes round(n * fraction) of each class
    per_class = Counter(by_bytes[s.image].split("/")[0] for s in val)
    assert per_class == {"cls_a": 2, "cls_b": 1, "cls_c": 1}
    # shard size: 11 train samples in shards of 4
    sizes = [len(list(iter_samples(u))) for u in expand_urls(str(tmp_path / "out" / "train"))]
    assert sizes == [4, 4, 3]
    assert "packed 11 train samples into 3 shards and 4 val samples" in res.output
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_pack_no_val_and_is_seeded(tmp_path):
    write_imagefolder(tmp_path / "src", per_class=(3, 3))
    a = pack_imagefolder(tmp_path / "src", tmp_path / "a", shard_size=100, seed=1)
    b = pack_imagefolder(tmp_path / "src", tmp_path / "b", shard_size=100, seed=1)
    c = pack_imagefolder(tmp_path / "src", tmp_path / "c", shard_size=100, seed=2)
    keys = lambda s: [x.key for u in s["train_shards"] for x in iter_samples(u)]  # noqa: E731
    assert keys(a) == keys(b) and sorted(keys(a)) == sorted(keys(c)) and keys(a) != keys(c)
    assert a["val_shards"] == [] and not (tmp_path / "a" / "val").exists()


def test_pack_bad_image(tmp_path):
    write_imagefolder(tmp_path / "src", per_class=(3, 2))
    bad = tmp_path / "src" / "cls_b" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    res = CliRunner().invoke(cli, ["pack", str(tmp_path / "src"), str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "broken.jpg is not a readable image" in res.output and "--skip-bad" in res.output
    assert not (tmp_path / "out" / "train").exists()
    res = CliRunner().invoke(cli, ["pack", str(tmp_path / "src"), str(tmp_path / "out"), "--skip-bad"])
    assert res.exit_code == 0, res.output
    assert f"skipped unreadable image: {bad}" in res.output
    train, _ = _read_split(tmp_path / "out" / "train")
    assert len(train) == 5


@pytest.mark.parametrize(
    "setup,args,pattern",
    [
        ("empty", [], "has no class sub-directories"),
        ("noimages", [], "holds no images"),
        ("ok", ["--val-fraction", "1.0"], r"--val-fraction must be in \[0, 1\)"),
        ("ok", ["--shard-size", "0"], "--shard-size must be at least 1"),
    ],
)
def test_pack_errors(tmp_path, setup, args, pattern):
    src = tmp_path / "src"
    src.mkdir()
    if setup == "noimages":
        (src / "cat").mkdir()
        (src / "cat" / "notes.txt").write_text("x")
    elif setup == "ok":
        write_imagefolder(src, per_class=(2,))
    res = CliRunner().invoke(cli, ["pack", str(src), str(tmp_path / "out"), *args])
    assert res.exit_code == 2, res.output
    assert re.search(pattern, res.output), res.output


def test_write_dataset_helper_matches_iter_samples(tmp_path):
    """The conftest generator writes what the reader expects (guards the other tests)."""
    paths = write_dataset(tmp_path / "d", shards=2, per_shard=3, prefix="val")
    assert [shard_name(p) for p in paths] == ["val-000000", "val-000001"]
    assert [s.key for s in iter_samples(paths[1])] == ["val1_0000", "val1_0001", "val1_0002"]


def test_remote_shards_through_fsspec(dataset):
    """A scheme WebDataset has no handler for (here fsspec's in-memory filesystem, standing in
    for s3:// or az://) is read through fsspec, sample for sample like the local file."""
    import fsspec

    local = sorted(str(p) for p in dataset.glob("*.tar"))[0]
    url = "memory://kdcache-test/shards/" + Path(local).name
    with fsspec.open(url, "wb") as f:
        f.write(Path(local).read_bytes())
    assert expand_urls(url) == [url]
    remote = [(s.key, s.ext, s.cls, s.image) for s in iter_samples(url)]
    assert remote == [(s.key, s.ext, s.cls, s.image) for s in iter_samples(local)] and remote
    with pytest.raises(KdcacheError, match=r"cannot open shard memory://kdcache-test/missing\.tar"):
        list(iter_samples("memory://kdcache-test/missing.tar"))
