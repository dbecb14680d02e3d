"""The paper's baselines from kdcache's own flags: what the student sees in each student-view mode,
the fixed-teacher cache, target provenance (digests), and the thread count."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from conftest import NUM_CLASSES, TEACHER, precompute_config, with_aug
from kdcache.cli import cli
from kdcache.learn.replay import ReplayStream, StreamConfig, epoch_batches, fresh_seed, prepare_shards
from kdcache.data.shards import decode_shard, expand_urls, shard_name
from kdcache.cache.store import CacheReader
from kdcache.learn.trainer import TrainConfig, train
from kdcache.data.views import AugSpec, center_view, sample_shard_views
from kdcache.data.render import render

RES = 32
STUDENT = "py:kdcache.models.zoo:tiny_cnn"


@pytest.fixture(scope="module")
def plain_cache(dataset, teacher_weights, tmp_path_factory):
    """A cache without mixup (fresh student views need unmixed targets)."""
    from kdcache.tools.precompute import precompute

    out = tmp_path_factory.mktemp("plain") / "cache.zarr"
    precompute(precompute_config(dataset, out, teacher_weights, mixup=False))
    return out


def _stream(dataset, cache, **kw):
    reader = CacheReader(str(cache))
    return ReplayStream(prepare_shards(expand_urls(str(dataset)), reader, False),
                        StreamConfig(batch_size=64, res=RES, cache=str(cache), **kw))


def _pixels_by_key(stream, epoch):
    return {k: (p, lp) for b in epoch_batches(stream, epoch) for k, p, lp in zip(b.keys, b.pixels("cpu"), b.logprobs)}


def test_student_views_cache_and_fresh(dataset, plain_cache):
    """`cache`: the stored view; `fresh`: a crop of the student's own, another one each epoch,
    the same for the same seed, key and epoch — the targets are the cache's in both."""
    reader = CacheReader(str(plain_cache))
    V = reader.views
    images = {}
    for url in expand_urls(str(dataset)):
        d = decode_shard(url)
        images.update({k: (shard_name(url), i, im) for i, (k, im) in enumerate(zip(d.keys, d.images))})
    aug = AugSpec(scale=(0.3, 1.0))
    for epoch in (0, 1, V + 1):
        stored = _pixels_by_key(_stream(dataset, plain_cache), epoch)
        fresh = _pixels_by_key(_stream(dataset, plain_cache, student_view="fresh", view_seed=5, aug=aug), epoch)
        again = _pixels_by_key(_stream(dataset, plain_cache, student_view="fresh", view_seed=5, aug=aug), epoch)
        other = _pixels_by_key(_stream(dataset, plain_cache, student_view="fresh", view_seed=6, aug=aug), epoch)
        assert stored.keys() == fresh.keys() and len(stored) == 21
        differ = 0
        for key, (px, lp) in stored.items():
            shard, i, im = images[key]
            row = reader.read_view(shard, epoch % V)
            # consistent: exactly the stored view, and its targets
            assert torch.equal(px, render(im, _view(row, i), RES))
            assert torch.equal(lp, torch.from_numpy(row.logprobs[i]))
            # fresh: the seeded crop of (fresh seed, key, epoch), the same targets
            want = sample_shard_views(fresh_seed(5), shard, [key], [(im.height, im.width)], [epoch], aug).view(0, 0)
            assert torch.equal(fresh[key][0], render(im, want, RES)) and torch.equal(fresh[key][1], lp)
            assert torch.equal(again[key][0], fresh[key][0])
            differ += not torch.equal(fresh[key][0], px)
            differ += not torch.equal(other[key][0], fresh[key][0])
        assert differ >= 2 * len(stored) - 4  # fresh crops are (almost always) other pixels


def _view(row, i):
    from kdcache.data.views import View

    x, y, w, h = (int(t) for t in row.box[i])
    return View(x, y, w, h, bool(row.flip[i]))


def test_fresh_views_are_refused_where_they_cannot_work(dataset, cache, plain_cache, tmp_path):
    kw = dict(data=str(dataset), student=STUDENT, out=str(tmp_path / "r"), workers=0, device="cpu", progress=False)
    with pytest.raises(Exception, match="holds targets of mixed images"):
        train(TrainConfig(**with_aug(dict(kw, cache=str(cache), student_view="fresh"))))
    with pytest.raises(Exception, match="needs --cache"):
        TrainConfig(**with_aug(dict(kw, student_view="fresh")))
    with pytest.raises(Exception, match="needs cached targets"):
        TrainConfig(**with_aug(dict(kw, cache=str(plain_cache), teacher=TEACHER, student_view="fresh")))


def test_center_crop_cache_is_the_fixed_teacher(dataset, teacher_weights, tmp_path):
    """precompute --center-crop: one view per image, the evaluation crop; with --student-view fresh
    the student trains against these fixed outputs."""
    out = tmp_path / "fixed.zarr"
    args = ["precompute", "--data", str(dataset), "--teacher", TEACHER, "--teacher-weights", str(teacher_weights),
            "--num-classes", str(NUM_CLASSES), "--out", str(out), "--res", str(RES), "-k", "3", "--workers", "0",
            "--device", "cpu", "--no-progress", "--center-crop"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and "pass --views 1" in res.stderr
    res = CliRunner().invoke(cli, args + ["--views", "1"])
    assert res.exit_code == 0, res.output
    r = CacheReader(str(out))
    assert r.views == 1 and r.manifest["augmentation"]["name"] == "center_crop"
    for name in r.shard_names():
        d = r.read_shard(name)
        for i, (h, w) in enumerate(d["size"]):
            cv = center_view(int(w), int(h))
            assert tuple(d["box"][i, 0]) == cv.box and not d["flip"][i, 0]
    s = train(TrainConfig(**with_aug(dict(data=str(dataset), cache=str(out), student=STUDENT, out=str(tmp_path / "r"),
                                          epochs=2, batch_size=4, workers=0, device="cpu", progress=False,
                                          student_view="fresh"))))
    assert s["student_view"] == "fresh" and s["views_reused"] is True


def test_an_edited_cache_is_caught_and_named(dataset, plain_cache, teacher_weights, tmp_path):
    """Precompute records a digest per view; train refuses an edited view (naming the group and
    view) unless told, verify reports it, inspect flags it, and summary.json identifies the targets."""
    edited = tmp_path / "edited.zarr"
    shutil.copytree(plain_cache, edited)
    g = zarr.open_group(str(edited), mode="r+")["train-000001"]
    lp = g["logprobs"][:]
    lp[2, 1, 0] = np.float16(lp[2, 1, 0] - 0.01)
    g["logprobs"][:] = lp
    kw = dict(data=str(dataset), student=STUDENT, epochs=2, batch_size=4, workers=0, device="cpu", progress=False)
    with pytest.raises(Exception, match=r"cache group 'train-000001' .*view 1 does not match the digest"):
        train(TrainConfig(**with_aug(dict(kw, cache=str(edited), out=str(tmp_path / "a")))))
    s_edit = train(TrainConfig(**with_aug(dict(kw, cache=str(edited), out=str(tmp_path / "b"), allow_edited_cache=True))))
    s_orig = train(TrainConfig(**with_aug(dict(kw, cache=str(plain_cache), out=str(tmp_path / "c")))))
    s_again = train(TrainConfig(**with_aug(dict(kw, cache=str(plain_cache), out=str(tmp_path / "d")))))
    # the manifest is the same; the targets digest tells the caches apart
    assert s_edit["cache_manifest_sha256"] == s_orig["cache_manifest_sha256"]
    assert s_edit["cache_targets_sha256"] == s_orig["cache_targets_sha256"] == s_again["cache_targets_sha256"]
    assert len(s_orig["cache_targets_sha256"]) == 64
    # (the digests recorded in the edited copy are the original's: it is the data that changed)
    res = CliRunner().invoke(cli, ["verify", str(edited), "--data", str(dataset), "--teacher", TEACHER,
                                   "--teacher-weights", str(teacher_weights), "--device", "cpu", "--json"])
    assert res.exit_code == 1
    r = json.loads(res.stdout)
    assert any("'train-000001': views [1]" in p for p in r["problems"]), r["problems"]
    res = CliRunner().invoke(cli, ["inspect", str(edited)])  # the summary, flagged, then exit 2
    assert res.exit_code == 2 and "train-000001 views [1] no longer match the digest" in res.stdout
    assert "is damaged: shard train-000001 views [1] were changed after precompute" in res.stderr


def test_threads_follow_the_workers_and_are_recorded(dataset, cache, tmp_path):
    from kdcache.runtime import available_cores, default_threads

    assert default_threads(0) == available_cores() and default_threads(available_cores() + 3) == 1
    s = train(TrainConfig(**with_aug(dict(data=str(dataset), cache=str(cache), student=STUDENT, out=str(tmp_path / "r"),
                                          epochs=1, batch_size=4, workers=0, device="cpu", progress=False,
                                          threads=1))))
    assert s["threads"] == 1 and torch.get_num_threads() == 1
    assert json.loads((tmp_path / "r" / "config.json").read_text())["resolved"]["threads"] == 1
    torch.set_num_threads(available_cores())
