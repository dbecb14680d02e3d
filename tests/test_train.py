"""`kdcache train` end to end on real shards and a real cache (CPU)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner

from conftest import NUM_CLASSES, TEACHER, with_aug
from kdcache.cli import cli
from kdcache.learn.losses import sparse_kd_loss
from kdcache.models.factory import create_model, normalize
from kdcache.learn.replay import ReplayStream, StreamConfig, epoch_batches, prepare_shards
from kdcache.data.shards import expand_urls, iter_samples, shard_name
from kdcache.cache.store import CacheReader
from kdcache.learn.trainer import TrainConfig, lr_at, manifest_digest, train

STUDENT = "py:kdcache.models.zoo:tiny_cnn"
RES = 32


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory) -> Path:
    from kdcache.models.zoo import tiny_cnn

    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("init") / "student0.pt"
    torch.save(tiny_cnn(NUM_CLASSES).state_dict(), path)
    return path


def config(dataset, out, **kw) -> TrainConfig:
    base = dict(data=str(dataset), student=STUDENT, out=str(out), epochs=2, batch_size=4, res=RES, lr=1e-2,
                weight_decay=0.0, workers=0, device="cpu", progress=False, log_every=2)
    base.update(kw)
    return TrainConfig(**with_aug(base))


def kd_loss_over_views(dataset, cache, weights) -> float:
    """Mean cached-KD loss of a student over every record of views 0..2 (a fixed yardstick)."""
    reader = CacheReader(str(cache))
    st = ReplayStream(prepare_shards(expand_urls(str(dataset)), reader, False),
                      StreamConfig(batch_size=64, res=RES, cache=str(cache)))
    info = create_model(STUDENT, num_classes=NUM_CLASSES, weights=str(weights))
    model = info.model.train()  # batch statistics: independent of the running averages
    losses = []
    with torch.no_grad():
        for epoch in range(3):
            for b in epoch_batches(st, epoch):
                z = model(normalize(b.pixels("cpu"), info.mean, info.std))
                losses.append(sparse_kd_loss(z, b.logprobs, b.classes).item())
    return float(np.mean(losses))


def state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_precompute_then_train_two_epochs(dataset, cache, init_weights, tmp_path):
    out = tmp_path / "run"
    # min_lr > 0: the schedule's last step runs at exactly --min-lr, and the log check below wants lr > 0
    summary = train(config(dataset, out, cache=str(cache), student_weights=str(init_weights),
                           val_data=str(dataset), label_weight=0.0, checkpoint_every=4, min_lr=1e-5))
    # the distillation loss falls: measured on all stored views before and after
    before = kd_loss_over_views(dataset, cache, init_weights)
    after = kd_loss_over_views(dataset, cache, out / "model.pt")
    assert after < 0.5 * before, (before, after)

    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    for key in ("final_val_top1", "final_val_top5", "best_val_top1", "best_val_top5", "images_per_s", "wall_time_s",
                "mode", "cache_manifest_sha256", "steps", "epochs"):
        assert saved[key] is not None, key
    assert saved["mode"] == "cached" and saved["steps"] == 12 and saved["epochs"] == 2
    assert saved["cache_manifest_sha256"] == manifest_digest(CacheReader(str(cache)).manifest)
    assert 0 <= saved["final_val_top1"] <= saved["final_val_top5"] <= 1
    assert saved["views_reused"] is False and saved["records_dropped"] == 0

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["resolved"]["mode"] == "cached" and cfg["resolved"]["num_classes"] == NUM_CLASSES
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [l for l in lines if "loss" in l]
    assert [l["step"] for l in train_lines] == [2, 4, 6, 8, 10, 12]
    assert all(np.isfinite(l["loss"]) and l["images_per_s"] > 0 and l["lr"] > 0 for l in train_lines)
    assert sum("val_top1" in l for l in lines) == 2
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (2, 0, 12)
    assert not [p for p in os.listdir(out) if ".tmp" in p]
    # model.pt is a plain state dict the next run can start from
    create_model(STUDENT, num_classes=NUM_CLASSES, weights=str(out / "model.pt"))
    again = train(config(dataset, tmp_path / "run2", cache=str(cache), student_weights=str(out / "model.pt"), epochs=1))
    assert again["steps"] == 6


def test_cached_and_live_teacher_train_alike(dataset, cache, teacher_weights, init_weights, tmp_path):
    common = dict(student_weights=str(init_weights), epochs=1, label_weight=0.3)
    s_cached = train(config(dataset, tmp_path / "cached", cache=str(cache), **common))
    s_live = train(config(dataset, tmp_path / "live", cache=str(cache), teacher=TEACHER,
                          teacher_weights=str(teacher_weights), **common))
    assert (s_cached["mode"], s_live["mode"]) == ("cached", "live")
    a, b = state(tmp_path / "cached" / "model.pt"), state(tmp_path / "live" / "model.pt")
    # the live teacher sees the same views and its top-k is cast like precompute's: same targets
    for k in a:
        assert torch.equal(a[k], b[k]), k
    cfg = json.loads((tmp_path / "live" / "config.json").read_text())["resolved"]
    assert cfg["mode"] == "live" and cfg["teacher_res"] == RES and cfg["topk"] == 3


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bitwise_equal(dataset, cache, init_weights, tmp_path, workers):
    kw = dict(cache=str(cache), student_weights=str(init_weights), workers=workers, label_weight=0.5,
              optimizer="sgd", lr=0.05, warmup_steps=3, grad_clip=1.0, batch_size=3)
    straight = train(config(dataset, tmp_path / "straight", **kw))
    stopped = train(config(dataset, tmp_path / "cut", stop_after=5, **kw))  # mid epoch 0 (7 steps/epoch)
    assert stopped["stopped_at"] == 5 and not (tmp_path / "cut" / "summary.json").exists()
    with pytest.raises(Exception, match="already holds a run"):
        train(config(dataset, tmp_path / "cut", **kw))
    resumed = train(config(dataset, tmp_path / "cut", resume=True, **kw))
    assert resumed["steps"] == straight["steps"] == 14
    a, b = state(tmp_path / "straight" / "model.pt"), state(tmp_path / "cut" / "model.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics file holds each step once
    steps = [json.loads(l)["step"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == sorted(set(steps))


def test_reuse_notice_advises_more_views_only_at_heavy_reuse():
    from kdcache.learn.trainer import views_reuse_note

    light = views_reuse_note(20, 16)
    assert light.startswith("note: training for 20 epochs over 16 views") and "--views" not in light
    assert "--views" not in views_reuse_note(7 * 16 + 15, 16)  # under 8 uses of each view
    heavy = views_reuse_note(240, 16)
    assert "each view comes back about 15 times" in heavy and "--views 64 or more" in heavy
    assert "its first 16 views are these" in heavy and "\n" not in heavy
    assert "--views 250 or more" in views_reuse_note(1000, 2)  # enough for about 4 uses of each view


def test_labels_only_without_cache_reuses_views_with_warning(dataset, tmp_path, capsys):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the notice is one clean line on stderr, not a Python warning
        s = train(config(dataset, tmp_path / "labels", epochs=3, views=2, mixup=True, val_data=str(dataset)))
    notes = [l for l in capsys.readouterr().err.splitlines() if "views are reused" in l]
    assert len(notes) == 1 and notes[0].startswith("note: training for 3 epochs over 2 views")
    assert s["mode"] == "labels" and s["views_reused"] is True and s["final_val_top1"] is not None
    assert json.loads((tmp_path / "labels" / "config.json").read_text())["resolved"]["mode"] == "labels"


# ---- bad input: a clear message and exit code 2 ----------------------------------------------


def run_cli(*args):
    result = CliRunner().invoke(cli, ["train", *map(str, args)], catch_exceptions=False)
    return result.exit_code, result.output


def base_args(dataset, out, cache=None):
    args = ["--data", dataset, "--student", STUDENT, "--out", out, "--res", RES, "--batch-size", 4,
            "--workers", 0, "--device", "cpu", "--no-progress"]
    return args + (["--cache", cache] if cache is not None else [])


def rewrite(src_dir, dst_dir, change):
    """Copy shards sample by sample; ``change(url, index, record)`` may edit the record dict."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for u in expand_urls(str(src_dir)):
        with wds.TarWriter(str(dst_dir / f"{shard_name(u)}.tar")) as w:
            for j, s in enumerate(iter_samples(u)):
                rec = {"__key__": s.key, s.ext: s.image, "cls": str(s.cls).encode()}
                change(u, j, rec)
                w.write(rec)
    return dst_dir


def test_cli_trains(dataset, cache, tmp_path):
    code, out = run_cli(*base_args(dataset, tmp_path / "r", cache), "--epochs", 1, "--label-weight", 0.5)
    assert code == 0, out
    assert json.loads(out.strip().splitlines()[-1])["mode"] == "cached"


def test_bad_inputs_exit_2(dataset, cache, tmp_path):
    # data from another dataset: a key differs (caught before training)
    other = rewrite(dataset, tmp_path / "other", lambda u, j, r: r.update(__key__="stranger") if (j == 4 and u.endswith("000001.tar")) else None)
    code, out = run_cli(*base_args(other, tmp_path / "r1", cache))
    assert code == 2 and "train-000001" in out and "'stranger'" in out and "train1_0004" in out, out

    # same keys, other image sizes (caught when the shard is read)
    from conftest import encode, make_image

    def resize(u, j, r):
        if j == 0 and u.endswith("000002.tar"):
            r.pop("png", None), r.pop("jpg", None)
            r["png"] = encode(make_image(np.random.default_rng(0), 13, 11, 1), "png")

    sized = rewrite(dataset, tmp_path / "sized", resize)
    code, out = run_cli(*base_args(sized, tmp_path / "r2", cache))
    assert code == 2 and "train2_0000" in out and "train-000002" in out and "13x11 px (WxH)" in out, out

    # the cache's class count differs from the student head
    code, out = run_cli(*base_args(dataset, tmp_path / "r3", cache), "--num-classes", 7)
    assert code == 2 and "5-class" in out and "7" in out, out

    # an incomplete cache shard
    broken = tmp_path / "broken.zarr"
    shutil.copytree(cache, broken)
    import zarr

    g = zarr.open_group(str(broken), mode="r+")
    g["train-000001"].attrs["complete"] = False
    code, out = run_cli(*base_args(dataset, tmp_path / "r4", broken))
    assert code == 2 and "train-000001" in out and "incomplete" in out, out

    # no cls labels while --label-weight > 0, and as --val-data
    unlabelled = rewrite(dataset, tmp_path / "nocls", lambda u, j, r: r.pop("cls"))
    code, out = run_cli(*base_args(unlabelled, tmp_path / "r5", cache), "--label-weight", 0.5)
    assert code == 2 and "no cls label" in out and "train0_0000" in out, out
    code, out = run_cli(*base_args(dataset, tmp_path / "r6", cache), "--val-data", unlabelled)
    assert code == 2 and "no cls label" in out, out
    code, out = run_cli(*base_args(unlabelled, tmp_path / "r6b"), "--num-classes", 5)  # labels-only mode
    assert code == 2 and "no cls label" in out, out

    # an unknown student spec
    args = base_args(dataset, tmp_path / "r7", cache)
    args[args.index(STUDENT)] = "py:kdcache.models.zoo:no_such_net"
    code, out = run_cli(*args)
    assert code == 2 and "no_such_net" in out, out

    # a shard the cache never saw
    extra = tmp_path / "extra"
    shutil.copytree(dataset, extra)
    shutil.copy(extra / "train-000000.tar", extra / "train-000009.tar")
    code, out = run_cli(*base_args(extra, tmp_path / "r8", cache))
    assert code == 2 and "train-000009" in out, out
    assert not (tmp_path / "r8" / "checkpoint.pt").exists()


# ---- many processes ------------------------------------------------------------------------


def test_ddp_two_processes_gloo(dataset, cache, tmp_path):
    out = tmp_path / "ddp"
    """torchrun, two CPU processes, gloo: both ranks run the same number of steps; rank 0 writes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "kdcache", "train", *map(str, base_args(dataset, out, cache)), "--epochs", "2", "--batch-size", "3",
           "--val-data", str(dataset)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    assert len(results) == 2  # both ranks finished
    assert results[0]["steps"] == results[1]["steps"] == 2 * 3  # ceil(7 / 3) per epoch on both ranks
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6 and summary["final_val_top1"] is not None
    assert summary["records_dropped"] == 2 * (14 - 9)  # the rank holding two shards stops at 3 batches of 3
    assert (out / "model.pt").exists() and (out / "metrics.jsonl").exists()


# ---- --stop-after through the CLI -------------------------------------------------------------


def test_cli_stop_after_exits_0_and_says_how_to_resume(dataset, cache, tmp_path):
    out = tmp_path / "r"
    args = [*base_args(dataset, out, cache), "--epochs", 2]  # 6 steps per epoch, 12 in all
    res = CliRunner().invoke(cli, ["train", *map(str, args), "--stop-after", 4])
    assert res.exit_code == 0, res.output
    stopped = json.loads(res.stdout.strip().splitlines()[-1])  # stdout: the machine-readable line
    assert stopped["stopped_at"] == 4 and stopped["total_steps"] == 12 and stopped["epoch"] == 0
    assert stopped["checkpoint"] == str(out / "checkpoint.pt") and stopped["mode"] == "cached"
    assert stopped["out"] == str(out)
    human = [l for l in res.stderr.splitlines() if "stopped" in l]  # stderr: one line for people
    assert len(human) == 1, res.stderr
    assert "step 4 of 12" in human[0] and str(out / "checkpoint.pt") in human[0], human[0]
    assert "re-run the same command with --resume" in human[0], human[0]
    assert (out / "checkpoint.pt").exists() and not (out / "summary.json").exists()
    # doing what it says finishes the run
    res = CliRunner().invoke(cli, ["train", *map(str, args), "--resume"])
    assert res.exit_code == 0, res.output
    done = json.loads(res.stdout.strip().splitlines()[-1])
    assert done["steps"] == 12 and done["epochs"] == 2
    assert json.loads((out / "summary.json").read_text())["steps"] == 12


# ---- the learning-rate schedule -------------------------------------------------------------


def documented_lr(s, base, W, S, min_lr):
    """docs/training.md's schedule, written out independently of lr_at."""
    if s < W:
        return base * (s + 1) / (W + 1)
    t = (s - W) / max(1, S - 1 - W)
    return min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("W,S", [(0, 10), (3, 10), (1, 2), (4, 6), (5, 6), (6, 6), (8, 5), (0, 1)])
def test_lr_at_peaks_once_and_ends_at_min_lr(W, S):
    base, lo = 0.1, 1e-3
    lrs = [lr_at(s, base, W, S, lo) for s in range(S)]
    assert lrs == pytest.approx([documented_lr(s, base, W, S, lo) for s in range(S)], rel=1e-12, abs=0)
    ramp, cosine = lrs[: min(W, S)], lrs[W:]
    assert all(a < b for a, b in zip(ramp, ramp[1:])) and all(x < base for x in ramp)  # strictly below the peak
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))  # non-increasing
    assert max(lrs) <= base
    if S > W:  # the peak exactly once, at step W
        assert lrs.count(base) == 1 and lrs[W] == base
    else:  # warm-up never reaches the peak
        assert base not in lrs
    if S - 1 > W:  # the last step runs at exactly --min-lr
        assert lrs[-1] == lo and min(lrs) == lo
    else:
        assert lo not in lrs


def test_logged_lr_follows_the_schedule(dataset, cache, tmp_path):
    out = tmp_path / "lr"
    W, base, lo = 3, 1e-2, 1e-4
    s = train(config(dataset, out, cache=str(cache), warmup_steps=W, lr=base, min_lr=lo, log_every=1))
    S = s["steps"]
    assert S == 12
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {l["step"]: l["lr"] for l in lines if "loss" in l}  # "step" counts steps done: step s+1 ran at lr_at(s)
    assert sorted(lrs) == list(range(1, S + 1))
    for done, lr in lrs.items():
        assert lr == lr_at(done - 1, base, W, S, lo)
        assert lr == pytest.approx(documented_lr(done - 1, base, W, S, lo), rel=1e-12, abs=0)
    assert list(lrs.values()).count(base) == 1 and lrs[W + 1] == base and lrs[S] == lo


# ---- undecodable images: --skip-bad --------------------------------------------------------------

BAD_KEY = "train0_0002"


@pytest.fixture(scope="module")
def bad_data(dataset, tmp_path_factory):
    """The dataset (3 shards x 7) with record 2 of train-000000 replaced by a truncated JPEG."""
    from conftest import corrupt_jpeg

    def corrupt(u, j, r):
        if j == 2 and u.endswith("train-000000.tar"):
            r.pop("png", None), r.pop("jpg", None)
            r["jpg"] = corrupt_jpeg()

    return rewrite(dataset, tmp_path_factory.mktemp("baddata") / "train", corrupt)


def test_cli_bad_image_stops_train_and_skip_bad_leaves_it_out(bad_data, tmp_path):
    # without --skip-bad: exit 2 naming shard and key, and the flag it suggests exists
    code, out = run_cli(*base_args(bad_data, tmp_path / "r0"), "--num-classes", NUM_CLASSES)
    assert code == 2 and f"'{BAD_KEY}'" in out and "train-000000.tar" in out and "--skip-bad" in out, out
    assert not (tmp_path / "r0" / "summary.json").exists()
    # with --skip-bad: the 20 good records train (with mixup), the bad one is listed
    out = tmp_path / "r1"
    res = CliRunner().invoke(cli, ["train", *map(str, base_args(bad_data, out)), "--num-classes", NUM_CLASSES,
                                   "--epochs", 2, "--mixup", "--skip-bad", "--val-data", str(bad_data)])
    assert res.exit_code == 0, res.output
    notes = [l for l in res.stderr.splitlines() if "undecodable" in l]
    assert len(notes) == 1 and notes[0].startswith("note: 1 undecodable image"), res.stderr
    assert f"train-000000/{BAD_KEY}" in notes[0] and "--skip-bad" in notes[0], notes[0]
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(res.stdout.strip().splitlines()[-1]) == summary
    assert summary["bad_records"] == 1 and summary["bad_keys"] == [f"train-000000/{BAD_KEY}"]
    assert summary["steps"] == 2 * 5  # ceil(20 / 4) per epoch
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["skip_bad"] is True and cfg["resolved"]["steps_per_epoch"] == [5, 5]
    # the validation pass leaves it out as well
    vals = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "val_top1" in l]
    assert vals and all(v["val_images"] == 20 for v in vals)


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_bad_resume_is_bitwise_equal(bad_data, init_weights, tmp_path, workers):
    from kdcache.errors import KdcacheError

    kw = dict(student_weights=str(init_weights), workers=workers, skip_bad=True, mixup=True, views=2, batch_size=3,
              warmup_steps=2, num_classes=NUM_CLASSES, label_weight=0.0)
    straight = train(config(bad_data, tmp_path / "straight", **kw))
    stopped = train(config(bad_data, tmp_path / "cut", stop_after=4, **kw))  # mid epoch 0 (7 steps per epoch)
    assert stopped["stopped_at"] == 4 and stopped["total_steps"] == 14
    resumed = train(config(bad_data, tmp_path / "cut", resume=True, **kw))
    assert resumed["steps"] == straight["steps"] == 2 * 7  # ceil(20 / 3)
    assert resumed["bad_records"] == straight["bad_records"] == 1
    a, b = state(tmp_path / "straight" / "model.pt"), state(tmp_path / "cut" / "model.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # --skip-bad changes the data order: it may not change on resume
    with pytest.raises(KdcacheError, match="skip_bad"):
        train(config(bad_data, tmp_path / "cut", resume=True, **{**kw, "skip_bad": False}))
