"""A compact group codes its class ids the cheaper of two ways (cache/store/class_coding.py): an
image's class list with Lehmer codes, or the ids directly. Real Zarr stores written by CacheWriter
from teacher-like top-k records of 1000 classes: one teacher whose views agree (few classes per
image: the list wins), one whose lower ranks vary across views (~80 per image: the ids win)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import zarr

from kdcache.cache.store import CacheReader, CacheWriter, encoding_record, make_manifest
from kdcache.cache.store import class_coding
from kdcache.data.views import AugSpec, sample_shard_views
from kdcache.errors import KdcacheError

from conftest import stored

C, V, K, N = 1000, 10, 10, 48
NAMES = ["train-000000", "train-000001"]


def teacher_records(name: str, seed: int, hard: bool) -> dict:
    """One group's records as precompute hands them to CacheWriter: float32 top-k log-probs of 1000
    classes. Each image has a cluster of likely classes; ``hard`` makes the views' noise large
    against the cluster, so the lower ranks change from view to view."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, (N, C)).astype(np.float32)
    for i in range(N):
        cl = rng.choice(C, 10 if hard else 20, replace=False)
        base[i, cl] += (2.0 if hard else 4.0) + rng.normal(0, 1, len(cl)).astype(np.float32)
        base[i, cl[0]] += 7.0 if hard else 4.0
    noise = 2.5 if hard else 0.8
    logits = np.stack([base + rng.normal(0, noise, (N, C)).astype(np.float32) for _ in range(V)], 1) * 1.6
    vals, ids = torch.topk(torch.log_softmax(torch.from_numpy(logits), -1), K, -1)
    keys = [f"{name}_{i:03d}" for i in range(N)]
    size = np.full((N, 2), 300, np.int32)
    sv = sample_shard_views(0, name, keys, size, V, AugSpec())
    return dict(keys=keys, size=size, logprobs=vals.numpy(), classes=ids.numpy(), box=sv.box, flip=sv.flip,
                mix_with=sv.mix_with, mix_lam=sv.mix_lam)


def manifest(encoding: dict | None = None, views: int = V) -> dict:
    return make_manifest(teacher={"spec": "synthetic", "num_classes": C}, augmentation=AugSpec().to_dict(), seed=0,
                         views=views, topk=K, resolution=224, render={"backend": "pil"}, shards=NAMES,
                         sources=[f"/d/{n}.tar" for n in NAMES],
                         encoding=encoding or encoding_record("compact", "topk"))


def write(path, hard: bool, man: dict | None = None) -> dict:
    w = CacheWriter(str(path), man or manifest())
    data = {}
    for s, name in enumerate(NAMES):
        data[name] = teacher_records(name, s, hard)
        w.write_shard(name, source=f"/d/{name}.tar", **data[name])
    return data


def class_bytes(path) -> int:
    """Bytes on disk of every group's class arrays (list, codes or ids: data and metadata)."""
    total = 0
    for dp, _, files in os.walk(path):
        parts = os.path.relpath(dp, path).split(os.sep)
        if len(parts) >= 2 and parts[1] in ("class_list", "class_code", "classes"):
            total += sum(os.path.getsize(os.path.join(dp, f)) for f in files)
    return total


@pytest.mark.parametrize("hard,chosen", [(False, "image_list"), (True, "direct")])
def test_each_coding_round_trips_exactly_and_is_the_one_chosen(tmp_path, hard, chosen):
    path = tmp_path / "c.zarr"
    data = write(path, hard)
    r = CacheReader(str(path))
    for name in NAMES:
        g = zarr.open_group(str(path / name), mode="r")
        assert g.attrs["class_coding"] == chosen
        stored = {"image_list": ["class_code", "class_list"], "direct": ["classes"]}[chosen]
        assert sorted(a for a in g.array_keys() if a.startswith("class")) == stored
        d = r.read_shard(name)  # every view checked against its digest
        assert np.array_equal(d["classes"], data[name]["classes"])
        lp = data[name]["logprobs"]
        capped = np.concatenate([np.zeros(lp.shape[:2] + (1,), bool), lp[..., :-1] - lp[..., 1:] > 15.8], -1)
        assert np.abs(d["logprobs"] - lp)[~capped].max() <= 1 / 16 + 2e-3  # (docs/format.md: the cap at 254 steps)
        for v in (0, V - 1):
            assert np.array_equal(r.read_view(name, v).classes, data[name]["classes"][:, v])
            if chosen == "direct":  # docs/format.md: the ids as stored, read with plain zarr
                assert np.array_equal(g["classes"][:, v], data[name]["classes"][:, v])
    distinct = np.mean([len(np.unique(data[NAMES[0]]["classes"][i])) for i in range(N)])
    assert (distinct > 60) == hard, distinct


@pytest.mark.parametrize("hard", [False, True])
def test_the_chosen_coding_is_the_cheaper_on_disk(tmp_path, monkeypatch, hard):
    """The same records written with the choice forced the other way take more bytes on disk for
    their class arrays: the writer's estimate picks what the store really costs."""
    write(tmp_path / "chosen.zarr", hard)
    chosen = zarr.open_group(str(tmp_path / "chosen.zarr" / NAMES[0]), mode="r").attrs["class_coding"]
    other = next(c for c in class_coding.CODINGS if c != chosen)
    monkeypatch.setattr("kdcache.cache.store.layouts.cheaper_coding", lambda codings: other)
    write(tmp_path / "other.zarr", hard)
    assert zarr.open_group(str(tmp_path / "other.zarr" / NAMES[0]), mode="r").attrs["class_coding"] == other
    assert class_bytes(tmp_path / "chosen.zarr") < class_bytes(tmp_path / "other.zarr")
    # and the forced coding still reads back exactly
    a, b = CacheReader(str(tmp_path / "chosen.zarr")), CacheReader(str(tmp_path / "other.zarr"))
    for name in NAMES:
        assert np.array_equal(a.read_shard(name)["classes"], b.read_shard(name)["classes"])


@pytest.mark.parametrize("hard", [False, True])
def test_an_edited_coding_attribute_is_refused(tmp_path, hard):
    """The group's digests cover its decoded class ids, not the coding's name (a grown group may
    change coding and keeps its digests); a coding attribute edited to the other value is refused
    because the group holds the other coding's arrays."""
    path = tmp_path / "c.zarr"
    write(path, hard=hard)
    meta = path / NAMES[0] / "zarr.json"
    doc = json.loads(meta.read_text())
    was = doc["attributes"]["class_coding"]
    doc["attributes"]["class_coding"] = next(c for c in class_coding.CODINGS if c != was)
    meta.write_text(json.dumps(doc))
    with pytest.raises(KdcacheError, match="class_coding attribute says .* holds the arrays .* of the other coding"):
        CacheReader(str(path)).read_view(NAMES[0], 0)


def test_a_compact_cache_an_earlier_release_began_keeps_its_class_lists(tmp_path):
    """A compact cache whose manifest says "classes": "image_list" (earlier releases) is resumed,
    not refused: the groups added are coded as its first ones, with lists and no attribute."""
    path = tmp_path / "c.zarr"
    old = dict(encoding_record("compact", "topk"), classes="image_list")
    w = CacheWriter(str(path), manifest(old))
    w.write_shard(NAMES[0], source="/d/a.tar", **teacher_records(NAMES[0], 0, hard=True))
    w = CacheWriter(str(path), manifest())  # this release's settings: "per_group"
    w.write_shard(NAMES[1], source="/d/b.tar", **teacher_records(NAMES[1], 1, hard=True))
    r = CacheReader(str(path))
    assert r.manifest["encoding"]["classes"] == "image_list"
    for name in NAMES:
        g = zarr.open_group(str(path / name), mode="r")
        assert "class_coding" not in g.attrs and "class_list" in g.array_keys()
        r.read_shard(name)


@pytest.mark.parametrize("hard", [False, True])
def test_a_group_grown_to_more_views_equals_one_written_with_them(tmp_path, hard):
    """Growing (growth.py) re-encodes a compact group over all its views, and may change its coding:
    a cache of the first 4 views grown to 10 equals, as stored, the cache written with 10, and its
    first 4 views keep their digests."""
    half = {name: {a: (x[:, :4] if np.ndim(x) >= 2 and a not in ("size",) else x)
                   for a, x in teacher_records(name, s, hard).items()} for s, name in enumerate(NAMES)}
    w = CacheWriter(str(tmp_path / "grown.zarr"), manifest(views=4))
    for name in NAMES:
        w.write_shard(name, source=f"/d/{name}.tar", **half[name])
    before = {n: CacheReader(str(tmp_path / "grown.zarr")).view_digests(n) for n in NAMES}
    w = CacheWriter(str(tmp_path / "grown.zarr"), manifest())
    assert w.growing == 4
    for s, name in enumerate(NAMES):
        w.write_shard(name, source=f"/d/{name}.tar", **teacher_records(name, s, hard))
    assert w.finish_growth()
    write(tmp_path / "onego.zarr", hard)
    assert stored(tmp_path / "grown.zarr") == stored(tmp_path / "onego.zarr")
    r = CacheReader(str(tmp_path / "grown.zarr"))
    assert all(r.view_digests(n)[:4] == before[n] for n in NAMES)
