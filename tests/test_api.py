"""The library API (``import kdcache``): names, the cache handle, the loader, the loss, the live
teacher and the spot check, and the two examples run as a user runs them."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import kdcache
from conftest import NUM_CLASSES, TEACHER, precompute_config, sharp_teacher, write_tar
from kdcache.cache.store import CacheReader
from kdcache.cli import cli
from kdcache.learn.losses import sparse_kd_loss
from kdcache.models.factory import normalize

ROOT = Path(__file__).resolve().parent.parent
STUDENT = "py:kdcache.models.zoo:tiny_cnn"

# The public surface. A name may be added; one that disappears breaks users' code (docs/api.md).
PUBLIC = {"__version__", "open_cache", "Cache", "Record", "ReplayLoader", "Batch", "Targets", "kd_loss",
          "sparse_kd_loss", "LiveTeacher", "LiveEnsemble", "SpotCheck", "AugSpec", "View", "render", "create_model",
          "KdcacheError", "PrecomputeConfig", "TrainConfig", "precompute", "train"}


def test_every_public_name_is_there_and_resolves():
    missing = PUBLIC - set(kdcache.__all__)
    assert not missing, f"public names gone from kdcache.__all__: {sorted(missing)}"
    for name in kdcache.__all__:
        assert getattr(kdcache, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kdcache.nope  # noqa: B018


def test_import_kdcache_loads_no_torch():
    # `kdcache --help` and `import kdcache` stay fast: the API loads on first use.
    code = "import sys, kdcache; print('torch' in sys.modules, 'zarr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ---- the cache handle ---------------------------------------------------------------------------


def test_open_cache_reports_the_manifest_and_reads_records(cache):
    c = kdcache.open_cache(str(cache))
    reader = CacheReader(str(cache))
    m = reader.manifest
    assert (c.num_classes, c.views, c.topk, c.kind, c.layout) == (NUM_CLASSES, 3, 3, "topk", "plain")
    assert (c.seed, c.resolution, c.teacher["spec"]) == (m["seed"], m["resolution"], m["teacher"]["spec"])
    assert c.shards == sorted(m["shards"]) and len(c.shards) == 3
    shard = c.shards[1]
    key = c.keys(shard)[4]
    rec = c.record(key, 2)
    want = reader.read_view(shard, 2)
    assert rec.shard == shard and rec.index == 4 and rec.view == 2
    assert rec.box == tuple(int(t) for t in want.box[4]) and rec.flip == bool(want.flip[4])
    assert rec.mix_with == int(want.mix_with[4]) and rec.mix_lam == float(want.mix_lam[4])
    assert np.array_equal(rec.classes, want.classes[4]) and np.array_equal(rec.logprobs, want.logprobs[4])
    assert rec.size == tuple(int(t) for t in want.size[4])
    with pytest.raises(kdcache.KdcacheError, match="close ones: " + key):
        c.record(key + "x", 0)
    assert "3 views" in repr(c) and "top-3" in repr(c)


# ---- the loader ---------------------------------------------------------------------------------


def _batches(loader, epoch, skip=0):
    loader.set_epoch(epoch, skip_batches=skip)
    return list(loader)


def test_loader_batches_carry_normalised_images_targets_and_views(dataset, cache):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    loader = kdcache.ReplayLoader(str(dataset), str(cache), 5, device="cpu", mean=mean, std=std, labels=True)
    assert loader.res == 32 and loader.num_views == 3
    assert len(loader) == loader.plan(0).steps == 5  # 21 records in batches of 5
    batches = _batches(loader, 4)
    assert len(batches) == 5 and sum(len(b) for b in batches) == 21
    b = batches[0]
    assert b.images.shape == (5, 3, 32, 32) and b.images.dtype == torch.float32
    assert torch.equal(b.images, normalize(b.pixels("cpu"), mean, std))
    t = b.targets
    assert isinstance(t, kdcache.Targets) and t.kind == "topk" and t.tail == "uniform"
    assert t.classes.shape == (5, 3) and t.logprobs.shape == (5, 3)
    assert torch.equal(b.views, torch.full((5,), 4 % 3))
    assert b.labels is not None and b.labels.dtype == torch.int64
    # the targets are the cache's for exactly these records and this view
    reader = CacheReader(str(cache))
    for i, (shard, key) in enumerate(zip(b.shards, b.keys)):
        rec = reader.read_view(shard, 1)
        j = list(rec.keys).index(key)
        assert np.array_equal(t.classes[i].numpy(), rec.classes[j])
        assert np.array_equal(t.logprobs[i].numpy(), rec.logprobs[j])


def test_loader_is_deterministic_resumes_mid_epoch_and_splits_ranks(dataset, cache):
    loader = kdcache.ReplayLoader(str(dataset), str(cache), 4, device="cpu", seed=3)
    full = _batches(loader, 1)
    again = _batches(loader, 1)
    assert [b.keys for b in full] == [b.keys for b in again]
    assert all(torch.equal(a.images, b.images) for a, b in zip(full, again))
    loader.set_epoch(1, skip_batches=2)
    assert len(loader) == len(full) - 2
    tail = list(loader)
    assert [b.keys for b in tail] == [b.keys for b in full[2:]]
    assert all(torch.equal(a.images, b.images) for a, b in zip(tail, full[2:]))
    other_epoch = _batches(loader, 2)
    assert [b.keys for b in other_epoch] != [b.keys for b in full]
    # two ranks: the same number of steps, disjoint records
    ranks = [kdcache.ReplayLoader(str(dataset), str(cache), 4, device="cpu", seed=3, rank=r, world=2) for r in (0, 1)]
    seen = [[(s, k) for b in _batches(ld, 0) for s, k in zip(b.shards, b.keys)] for ld in ranks]
    assert len(ranks[0]) == len(ranks[1])
    assert not set(seen[0]) & set(seen[1])


def test_loader_refuses_what_cannot_work(dataset, cache):
    with pytest.raises(kdcache.KdcacheError, match="needs a cache"):
        kdcache.ReplayLoader(str(dataset), None, 4, student_view="fresh")
    with pytest.raises(kdcache.KdcacheError, match="student_view must be one of"):
        kdcache.ReplayLoader(str(dataset), str(cache), 4, student_view="teacher")


def test_kd_loss_is_the_trainers_loss_and_guards_sampled_targets(dataset, cache):
    loader = kdcache.ReplayLoader(str(dataset), str(cache), 6, device="cpu", labels=True)
    b = _batches(loader, 0)[0]
    z = torch.randn(len(b), NUM_CLASSES, requires_grad=True)
    soft = b.label_targets(NUM_CLASSES, "cpu")
    got = kdcache.kd_loss(z, b.targets, temperature=2.0, labels=soft, label_weight=0.3)
    want = sparse_kd_loss(z, b.targets.logprobs, b.targets.classes, temperature=2.0, labels=soft, label_weight=0.3)
    assert torch.equal(got, want)
    drawn = kdcache.Targets(b.targets.classes, b.targets.logprobs, "sample", "sampled", 2.0)
    with pytest.raises(kdcache.KdcacheError, match="drawn at temperature 2"):
        kdcache.kd_loss(z, drawn, temperature=1.0)
    with pytest.raises(kdcache.KdcacheError, match="does not apply to sampled targets"):
        kdcache.kd_loss(z, drawn, temperature=2.0, tail="uniform")


def test_live_teacher_gives_the_cached_targets_on_the_same_views(dataset, cache, teacher_weights):
    loader = kdcache.ReplayLoader(str(dataset), str(cache), 7, device="cpu")
    live = kdcache.LiveTeacher.load(TEACHER, weights=str(teacher_weights), cache=str(cache), device="cpu")
    assert (live.topk, live.res, live.num_classes) == (3, 32, NUM_CLASSES)
    for b in _batches(loader, 2):
        now = live.targets(b)
        assert torch.equal(now.classes, b.targets.classes)
        torch.testing.assert_close(now.logprobs.float(), b.targets.logprobs.float(), atol=2e-3, rtol=0)


# ---- the spot check -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharp(dataset, tmp_path_factory):
    """A cache made by a confident teacher (its outputs move with small pixel changes), and its weights."""
    from kdcache.tools.precompute import precompute

    root = tmp_path_factory.mktemp("spot")
    weights = root / "sharp.pt"
    torch.save(sharp_teacher(3).state_dict(), weights)
    out = root / "cache.zarr"
    precompute(precompute_config(dataset, out, weights, mixup=False))
    return out, weights


def reencoded(dataset: Path, dest: Path) -> Path:
    """The same shards, every image decoded and encoded again (same keys, sizes and labels, other pixels)."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted(dataset.glob("*.tar")):
        members = []
        with tarfile.open(src) as t:
            for m in t.getmembers():
                data = t.extractfile(m).read()
                ext = m.name.rsplit(".", 1)[-1]
                if ext in ("jpg", "png"):
                    im = Image.open(io.BytesIO(data)).convert("RGB")
                    buf = io.BytesIO()
                    im.save(buf, format="JPEG", quality=40)
                    data = buf.getvalue()
                    m.name = m.name.rsplit(".", 1)[0] + ".jpg"
                members.append((m.name, data))
        write_tar(dest / src.name, members)
    (dest / "classes.json").write_text((dataset / "classes.json").read_text())
    return dest


def _train(args):
    return CliRunner().invoke(cli, ["train", "--student", STUDENT, "--epochs", "1", "--batch-size", "7", "--workers",
                                    "0", "--device", "cpu", "--no-progress", *map(str, args)])


def test_spot_check_passes_on_the_right_data_and_logs_its_figures(dataset, sharp, tmp_path):
    cache, weights = sharp
    res = _train(["--data", dataset, "--cache", cache, "--out", tmp_path / "run", "--spot-check", "1",
                  "--teacher-weights", weights])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    spot = summary["spot_check"]
    assert spot["batches"] == 3 and spot["records"] == 21 and spot["failures"] == 0
    assert spot["top1_agree"] == 1.0 and spot["max_dlogprob"] < 1e-2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("spot_records" in x for x in lines) == 3


def test_spot_check_stops_a_cache_paired_with_reencoded_shards(dataset, sharp, tmp_path):
    cache, weights = sharp
    other = reencoded(dataset, tmp_path / "reencoded")
    res = _train(["--data", other, "--cache", cache, "--out", tmp_path / "run", "--spot-check", "1",
                  "--teacher-weights", weights])
    assert res.exit_code == 1, res.output
    err = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "spot check" in err[0] and "shard 'train-00000" in err[0] and "view 0" in err[0]
    assert "key 'train" in err[0]
    assert not (tmp_path / "run" / "model.pt").exists()
    warned = _train(["--data", other, "--cache", cache, "--out", tmp_path / "warned", "--spot-check", "1",
                     "--teacher-weights", weights, "--spot-check-warn"])
    assert warned.exit_code == 0, warned.output
    assert "warning: spot check" in warned.output
    assert json.loads((tmp_path / "warned" / "summary.json").read_text())["spot_check"]["failures"] > 0


def test_spot_check_needs_the_caches_own_teacher(dataset, sharp, teacher_weights, tmp_path):
    cache, _ = sharp
    res = _train(["--data", dataset, "--cache", cache, "--out", tmp_path / "run", "--spot-check", "0.5",
                  "--teacher-weights", teacher_weights])
    assert res.exit_code == 2 and "are not the weights cache" in res.output
    res = _train(["--data", dataset, "--cache", cache, "--out", tmp_path / "run2", "--spot-check", "0.5"])
    assert res.exit_code == 2 and "pass its weights with --teacher-weights" in res.output
    res = _train(["--data", dataset, "--out", tmp_path / "run3", "--spot-check", "0.5"])
    assert res.exit_code == 2 and "needs --cache" in res.output


# ---- the examples, run as a user runs them ------------------------------------------------------


def _example(name, *args, threads: int | None = None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's kdcache, installed or not
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env)


def test_own_loop_trains_the_weights_kdcache_train_trains(dataset, cache, tmp_path):
    settings = ["--epochs", "2", "--batch-size", "6", "--lr", "3e-3", "--warmup-steps", "2", "--temperature", "2"]
    # One torch thread on both sides: a float sum's order depends on the thread count, so the same
    # weights bit for bit need the same threads (whatever OMP_NUM_THREADS the suite runs under).
    mine = _example("own_loop.py", "--data", dataset, "--cache", cache, "--student", STUDENT, "--seed", "5",
                    "--out", tmp_path / "own.pt", *settings, threads=1)
    assert mine.returncode == 0, mine.stderr
    res = CliRunner().invoke(cli, ["train", "--data", str(dataset), "--cache", str(cache), "--student", STUDENT,
                                   "--out", str(tmp_path / "run"), "--seed", "5", "--workers", "0", "--device",
                                   "cpu", "--no-progress", "--threads", "1", *settings])
    assert res.exit_code == 0, res.output
    own = torch.load(tmp_path / "own.pt", weights_only=True)
    trained = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert own.keys() == trained.keys()
    assert all(torch.equal(own[k], trained[k]) for k in own), "own_loop.py and kdcache train differ"


def test_timm_loop_runs_a_timm_recipe_on_the_cache(dataset, cache, tmp_path):
    out = _example("timm_loop.py", "--data", dataset, "--cache", cache, "--val-data", dataset, "--model",
                   "resnet10t", "--epochs", "2", "--batch-size", "7", "--workers", "0", "--device", "cpu",
                   "--label-weight", "0.1", "--out", tmp_path / "ema.pt")
    assert out.returncode == 0, out.stderr
    assert "EMA top-1 on 21 validation images" in out.stdout
    state = torch.load(tmp_path / "ema.pt", weights_only=True)
    assert any(k.startswith("fc.") for k in state)
