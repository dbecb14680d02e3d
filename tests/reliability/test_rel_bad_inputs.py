"""Faults in the input data: corrupt shards given to precompute and to train, and images changed
under an existing cache.

Each bad input is one shard (train-000001) of a small dataset, rewritten: an undecodable image, a
key twice (adjacent and apart), a sample without an image, a tar cut at three offsets, the shard
file missing, the shard emptied. Precompute and train (cached mode, with a cache made from the
intact data) must each stop with exit code 2 and one message that names the shard and the key,
with nothing marked complete for that shard, and never a traceback. An empty shard is valid input
and must work. The commands run in this process through click's CliRunner (the real command
line on real files: startup is what a subprocess would add).
"""

from __future__ import annotations

import io
import shutil
import tarfile

import numpy as np
import pytest
import torch

from conftest import corrupt_jpeg, encode, make_image, sharp_teacher, write_dataset, write_tar
from relhelpers import NC, TINY, cache_diff, complete_groups, tally
from relhelpers import cli_inproc as cli
from relhelpers import precompute_args, train_args

BAD = "train-000001"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """3 shards x 5 images, a confident tiny teacher (its top-k reacts to any pixel change, so
    verify can see a swapped image) and the cache of the intact data."""
    root = tmp_path_factory.mktemp("badinputs")
    write_dataset(root / "good", shards=3, per_shard=5, seed=21)
    torch.save(sharp_teacher(3, num_classes=NC).state_dict(), root / "teacher.pt")
    code, out = cli(*precompute_args(root / "good", root / "good.zarr", root / "teacher.pt"))
    assert code == 0, out
    return root


def members(path):
    """(name, bytes) of every member of a tar, in order."""
    with tarfile.open(path) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def variant(env, name, build):
    """A copy of the good dataset whose shard train-000001 is replaced by ``build(good_path, new_path)``."""
    d = env / name
    if d.exists():
        return d
    shutil.copytree(env / "good", d)
    build(env / "good" / f"{BAD}.tar", d / f"{BAD}.tar")
    return d


def _rewrite(change):
    def build(src, dst):
        write_tar(dst, change(members(src)))
    return build


def _undecodable(ms):
    return [(n, corrupt_jpeg() if n.startswith("train1_0002.") and n.endswith((".jpg", ".png")) else d) for n, d in ms]


def _other_ext(ms):  # the corrupt JPEG must be named .jpg
    return [(n.rsplit(".", 1)[0] + ".jpg" if n.startswith("train1_0002.") and n.endswith(".png") else n, d)
            for n, d in ms]


def _cut(where):
    def build(src, dst):
        with tarfile.open(src) as t:
            ms = t.getmembers()
        m, img = ms[6], ms[7]  # sample 3's first member (cls) and its image
        at = {"in-header": m.offset + 100, "in-data": img.offset_data + img.size // 2,
              "before-end-marker": ms[-1].offset_data + ((ms[-1].size + 511) // 512) * 512}[where]
        dst.write_bytes(src.read_bytes()[:at])
    return build


CORRUPT = {
    # name: (build, key the message must name, words it must hold)
    "undecodable-image": (_rewrite(lambda ms: _undecodable(_other_ext(ms))), "train1_0002", "cannot decode image"),
    "duplicate-key-adjacent": (_rewrite(lambda ms: ms[:4] + ms[2:4] + ms[4:]), "train1_0001", "twice"),
    "duplicate-key-apart": (_rewrite(lambda ms: ms[:8] + [("train1_0000" + n[len("train1_0004"):], d)
                                                          for n, d in ms[8:10]]), "train1_0000", "twice"),
    "sample-without-image": (_rewrite(lambda ms: [(n, d) for n, d in ms if not (n.startswith("train1_0002.")
                                                                              and n.endswith((".jpg", ".png")))]),
                             "train1_0002", "has no image"),
    "tar-cut-in-header": (_cut("in-header"), "train1_0002", "3 samples read"),
    # the cut is inside sample 3's image: the message names that member
    "tar-cut-in-data": (_cut("in-data"), "train1_0003", "inside the data of member 'train1_0003.jpg'"),
    "tar-cut-before-end-marker": (_cut("before-end-marker"), "train1_0004", "end-of-archive marker"),
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_shard_stops_precompute_and_train(env, tmp_path, name):
    build, key, words = CORRUPT[name]
    data = variant(env, name, build)
    url = str(data / f"{BAD}.tar")
    tally(bad_inputs=2)
    # precompute: exit 2, shard and key named, that shard not complete
    code, out = cli(*precompute_args(data, tmp_path / "c.zarr", env / "teacher.pt"))
    assert code == 2, out
    assert url in out and f"'{key}'" in out and words in out, out
    assert not complete_groups(tmp_path / "c.zarr").get(BAD)
    # train on the cache of the intact data: exit 2, shard and key named, no student
    code, out = cli(*train_args(data, env / "good.zarr", tmp_path / "run"))
    assert code == 2, out
    assert url in out and f"'{key}'" in out, out
    assert not (tmp_path / "run" / "model.pt").exists()


def test_undecodable_image_with_skip_bad_keeps_records_aligned(env, tmp_path):
    """--skip-bad: the bad record keeps its row and is recorded; every other record of the cache
    is where it was (keys, sizes and view geometry equal the intact run's), the other groups are
    bit for bit the intact run's, and train leaves the bad record out by name."""
    from kdcache.cache.store import CacheReader

    data = variant(env, "undecodable-image", CORRUPT["undecodable-image"][0])
    out = tmp_path / "c.zarr"
    code, text = cli(*precompute_args(data, out, env / "teacher.pt", "--skip-bad"))
    assert code == 0, text
    tally(bad_inputs=1)
    r, good = CacheReader(str(out)), CacheReader(str(env / "good.zarr"))
    assert list(r.shard_attrs(BAD)["bad"]) == ["train1_0002"]
    d, g = r.read_shard(BAD), good.read_shard(BAD)
    assert d["keys"].tolist() == g["keys"].tolist()
    ok = d["keys"] != "train1_0002"
    for a in ("size", "box", "flip"):
        assert np.array_equal(d[a][ok], g[a][ok]), a
    assert d["size"][~ok].tolist() == [[-1, -1]] and (d["classes"][~ok] == -1).all()
    diff = cache_diff(env / "good.zarr", out)
    # only the bad shard differs: the bad record, and the records mixed with it (left unmixed) or
    # in the teacher batches it left (the same outputs up to float16 rounding)
    assert diff["lost"] == 0 and diff["groups_misaligned"] in ([], [BAD]), diff
    code, text = cli(*train_args(data, out, tmp_path / "run"))
    assert code == 0, text
    assert "train-000001/train1_0002" in text and (tmp_path / "run" / "model.pt").exists()


def test_missing_shard_file(env, tmp_path):
    """The shard list names a file that is not there: exit 2 naming it; nothing written."""
    data = env / "missing"
    if not data.exists():
        shutil.copytree(env / "good", data)
        (data / f"{BAD}.tar").unlink()
    pattern = str(data / "train-{000000..000002}.tar")
    tally(bad_inputs=2)
    code, out = cli(*precompute_args(pattern, tmp_path / "c.zarr", env / "teacher.pt"))
    assert code == 2 and str(data / f"{BAD}.tar") in out and "does not exist" in out, out
    assert not (tmp_path / "c.zarr").exists()
    code, out = cli(*train_args(pattern, env / "good.zarr", tmp_path / "run"))
    assert code == 2 and str(data / f"{BAD}.tar") in out and "does not exist" in out, out


def test_empty_shard_works_and_an_emptied_shard_is_refused(env, tmp_path):
    """A shard with 0 samples is valid: precompute writes a complete empty group and train runs.
    A shard emptied after precompute no longer matches its group: train stops naming both."""
    from kdcache.cache.store import CacheReader

    data = variant(env, "empty", lambda src, dst: write_tar(dst, []))
    out = tmp_path / "c.zarr"
    code, text = cli(*precompute_args(data, out, env / "teacher.pt"))
    assert code == 0, text
    r = CacheReader(str(out))
    assert r.is_complete(BAD) and len(r.keys(BAD)) == 0
    diff = cache_diff(env / "good.zarr", out)  # the other shards: bit for bit the intact run's
    assert diff["groups_lost"] == [] and diff["misaligned"] == 0 and diff["lost"] == 5, diff  # the 5 removed
    code, text = cli(*train_args(data, out, tmp_path / "run"))
    assert code == 0, text
    tally(bad_inputs=1)
    code, text = cli(*train_args(data, env / "good.zarr", tmp_path / "run2"))
    assert code == 2 and str(data / f"{BAD}.tar") in text and "'train1_0000'" in text, text


# ---- an image changed under an existing cache --------------------------------------------------


def _swap(same_size: bool):
    def build(src, dst):
        out = []
        for n, d in members(src):
            if n.startswith("train1_0002.") and n.endswith((".jpg", ".png")):
                from PIL import Image

                with Image.open(io.BytesIO(d)) as im:
                    w, h = im.size
                rng = np.random.default_rng(99)
                new = make_image(rng, w if same_size else w + 3, h, 4)
                d = encode(new, n.rsplit(".", 1)[1])
            out.append((n, d))
        write_tar(dst, out)
    return build


def test_same_size_image_swapped_is_caught_by_verify_not_by_train(env, tmp_path):
    """The documented limit (docs/reliability.md): train checks keys and image sizes, not pixels;
    a same-size image swapped under a key trains without a word. `kdcache verify` re-runs the
    teacher and names the record."""
    data = variant(env, "swapped-same-size", _swap(True))
    tally(bad_inputs=2)
    code, out = cli(*train_args(data, env / "good.zarr", tmp_path / "run"))
    assert code == 0, out  # not detected by train: see docs/reliability.md
    code, out = cli("verify", env / "good.zarr", "--data", data, "--teacher", TINY, "--teacher-weights",
                    env / "teacher.pt", "-n", 1000, "--device", "cpu")
    assert code == 1, out
    # the records named: the swapped one, and those mixed with it in that view (nothing else)
    from kdcache.cache.store import CacheReader

    d = CacheReader(str(env / "good.zarr")).read_shard(BAD)
    keys = d["keys"].tolist()
    named = {(ln.split()[1], int(ln.split()[3].rstrip(":"))) for ln in out.splitlines() if ln.startswith(f"  {BAD} ")}
    assert {k for k, _ in named} >= {"train1_0002"}, out
    for k, v in named:
        assert k == "train1_0002" or d["mix_with"][keys.index(k), v] == keys.index("train1_0002"), (k, v, out)
    assert not [ln for ln in out.splitlines() if ln.startswith("  train-00000") and not ln.startswith(f"  {BAD} ")]


def test_image_of_another_size_stops_train(env, tmp_path):
    data = variant(env, "swapped-other-size", _swap(False))
    tally(bad_inputs=2)
    code, out = cli(*train_args(data, env / "good.zarr", tmp_path / "run"))
    assert code == 2, out
    assert "'train1_0002'" in out and str(data / f"{BAD}.tar") in out and "cache" in out, out
    assert not (tmp_path / "run" / "model.pt").exists()
    code, out = cli("verify", env / "good.zarr", "--data", data, "--teacher", TINY, "--teacher-weights",
                    env / "teacher.pt", "-n", 1000, "--device", "cpu")
    assert code == 1 and "train1_0002" in out, out
