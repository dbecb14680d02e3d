"""`kdcache precompute` on bad input: one clear message, exit code 2, nothing marked complete."""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from conftest import NUM_CLASSES, TEACHER, corrupt_jpeg, encode, make_image, write_tar
from kdcache.cli import cli
from kdcache.cache.store import CacheReader
from kdcache.models.zoo import tiny_cnn

RNG = np.random.default_rng(0)
JPG = encode(make_image(RNG, 30, 26, 1), "jpg")


def run(data, out, weights, *extra, teacher=TEACHER):
    args = ["precompute", "--data", str(data), "--teacher", teacher, "--out", str(out), "-V", "2", "-k", "3",
            "--res", "32", "-b", "8", "--workers", "0", "--device", "cpu", "--no-progress", "--seed", "7",
            "--mixup", "--num-classes", str(NUM_CLASSES)]
    if weights is not None:
        args += ["--teacher-weights", str(weights)]
    return CliRunner().invoke(cli, args + list(extra))


def nothing_complete(out: Path) -> bool:
    if not out.exists():
        return True
    try:
        r = CacheReader(str(out))
    except Exception:
        return True
    return not any(r.is_complete(n) for n in r.shard_names())


def test_success_prints_summary(dataset, teacher_weights, tmp_path):
    res = run(dataset, tmp_path / "c.zarr", teacher_weights)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])  # stdout: the JSON summary for scripts
    assert summary["shards_written"] == 3 and summary["records"] == 42
    assert "precompute: wrote 3 shards (21 images x 2 views)" in res.stderr  # stderr: for people
    res = run(dataset, tmp_path / "c.zarr", teacher_weights)
    assert res.exit_code == 0 and "all 3 shards of this process are already complete" in res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["shards_skipped"] == 3


def test_timm_teacher_end_to_end(dataset, tmp_path):
    """A timm architecture as the teacher (random weights on purpose, nothing downloaded): its cfg
    normalisation and its seed are recorded."""
    res = run(dataset, tmp_path / "c.zarr", None, "--random-init", "4", teacher="timm:test_resnet")
    assert res.exit_code == 0, res.output
    m = CacheReader(str(tmp_path / "c.zarr")).manifest
    assert m["teacher"]["spec"] == "timm:test_resnet" and m["teacher"]["mean"] == [0.5, 0.5, 0.5]
    assert m["teacher"]["weights"] is None and m["teacher"]["num_classes"] == NUM_CLASSES
    assert m["teacher"]["random_init_seed"] == 4 and len(m["teacher"]["state_sha256"]) == 64


@pytest.mark.parametrize("teacher", ["timm:test_resnet", TEACHER])
def test_a_teacher_without_weights_is_refused(dataset, tmp_path, teacher):
    """No --teacher-weights and no --pretrained: a random network, whose outputs mean nothing and
    which every run would draw anew. Refused, saying how to ask for it on purpose."""
    res = run(dataset, tmp_path / "c.zarr", None, teacher=teacher)
    assert res.exit_code == 2, res.output
    assert "has random weights" in res.stderr and "--random-init SEED" in res.stderr
    assert "--teacher-weights FILE" in res.stderr and not (tmp_path / "c.zarr").exists()
    res = run(dataset, tmp_path / "c.zarr", None, "--random-init", "1", "--pretrained", teacher=teacher)
    assert res.exit_code == 2 and "cannot be combined" in res.stderr


def test_a_seeded_random_teacher_resumes_and_verifies(dataset, tmp_path):
    """--random-init SEED rebuilds the same network every time: an interrupted cache finishes with
    it, another seed is refused, and verify (with no weights) rebuilds it and proves the cache."""
    import json

    import zarr

    out = tmp_path / "c.zarr"
    assert run(dataset, out, None, "--random-init", "5").exit_code == 0
    zarr.open_group(str(out), mode="r+")["train-000001"].attrs["complete"] = False  # as if killed
    res = run(dataset, out, None, "--random-init", "6")
    assert res.exit_code == 2 and "teacher.random_init_seed: cache has 5, this run has 6" in res.stderr
    res = run(dataset, out, None, "--random-init", "5")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["shards_written"] == 1
    res = CliRunner().invoke(cli, ["verify", str(out), "--data", str(dataset), "--teacher", TEACHER, "--device",
                                   "cpu", "--samples", "1000", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["ok"] and r["teacher"]["state_matches"] is True and r["max_abs_delta_logprob"] == 0.0


def test_mean_std_flags(dataset, teacher_weights, tmp_path):
    res = run(dataset, tmp_path / "d.zarr", teacher_weights, "--mean", "0.4,0.4,0.4", "--std", "0.2,0.2,0.2")
    assert res.exit_code == 0, res.output
    t = CacheReader(str(tmp_path / "d.zarr")).manifest["teacher"]
    assert t["mean"] == [0.4, 0.4, 0.4] and t["std"] == [0.2, 0.2, 0.2]


@pytest.mark.parametrize(
    "pattern,expect",
    [
        ("nothing-*.tar", "matched no shards"),
        ("train-{000000..000004}.tar", r"shard .*train-000003\.tar does not exist"),
        ("emptydir", r"directory .*emptydir holds no \.tar shards"),
    ],
)
def test_empty_or_unmatched_pattern(dataset, teacher_weights, tmp_path, pattern, expect):
    (tmp_path / "emptydir").mkdir()
    data = tmp_path / pattern if pattern != "train-{000000..000004}.tar" else dataset / pattern
    res = run(data, tmp_path / "c.zarr", teacher_weights)
    assert res.exit_code == 2, res.output
    assert re.search(expect, res.stderr), res.stderr
    assert res.stderr.startswith("error: ") and "Traceback" not in res.output
    assert not (tmp_path / "c.zarr").exists()


def test_duplicate_keys(teacher_weights, tmp_path):
    data = tmp_path / "data"
    write_tar(data / "s-0.tar", [("a.jpg", JPG), ("b.jpg", JPG), ("a.jpg", JPG)])
    write_tar(data / "s-1.tar", [("c.jpg", JPG)])
    res = run(data, tmp_path / "c.zarr", teacher_weights)
    assert res.exit_code == 2, res.output
    assert f"shard {data / 's-0.tar'} holds key 'a' twice" in res.stderr
    assert nothing_complete(tmp_path / "c.zarr")


def test_missing_teacher_weights(dataset, tmp_path):
    res = run(dataset, tmp_path / "c.zarr", tmp_path / "nope.safetensors")
    assert res.exit_code == 2 and f"weights file {tmp_path / 'nope.safetensors'} does not exist" in res.stderr
    assert not (tmp_path / "c.zarr").exists()


def test_class_count_mismatch(dataset, tmp_path):
    res = run(dataset, tmp_path / "c.zarr", None, teacher="py:testmodels:fixed_cnn")
    assert res.exit_code == 2 and "outputs 7 classes but 5 were asked for" in res.stderr
    torch.save(tiny_cnn(10).state_dict(), tmp_path / "ten.pt")
    res = run(dataset, tmp_path / "c.zarr", tmp_path / "ten.pt")
    assert res.exit_code == 2 and "ten.pt does not fit the model" in res.stderr and "--num-classes" in res.stderr
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.parametrize("kind", ["file", "dir", "plain-zarr"])
def test_output_is_not_a_kdcache_store(dataset, teacher_weights, tmp_path, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("hello")
    elif kind == "dir":
        out.mkdir()
        (out / "results.csv").write_text("a,b\n")
    else:
        zarr.open_group(str(out), mode="w", zarr_format=3).create_array("x", shape=(2,), dtype="i4")
    before = sorted((str(p), p.stat().st_mtime_ns) for p in [out, *out.rglob("*")])
    res = run(dataset, out, teacher_weights)
    assert res.exit_code == 2, res.output
    assert str(out) in res.stderr and "not a kdcache store" in res.stderr
    assert before == sorted((str(p), p.stat().st_mtime_ns) for p in [out, *out.rglob("*")])


def test_undecodable_image(teacher_weights, tmp_path):
    data = tmp_path / "data"
    write_tar(data / "s-0.tar", [("ok.jpg", JPG), ("broken.jpg", corrupt_jpeg()), ("ok2.jpg", JPG)])
    write_tar(data / "s-1.tar", [("c.jpg", JPG)])
    out = tmp_path / "c.zarr"
    res = run(data, out, teacher_weights)
    assert res.exit_code == 2, res.output
    assert "cannot decode image 'broken'" in res.stderr and str(data / "s-0.tar") in res.stderr
    assert "image file is truncated" in res.stderr and "--skip-bad" in res.stderr
    assert nothing_complete(out)
    res = run(data, out, teacher_weights, "--skip-bad")
    assert res.exit_code == 0, res.output
    r = CacheReader(str(out))
    assert list(r.shard_attrs("s-0")["bad"]) == ["broken"] and r.read_shard("s-0")["keys"].tolist() == ["ok", "broken", "ok2"]
    assert json.loads(res.stdout.strip().splitlines()[-1])["bad"] == 1


def test_unreadable_tar(teacher_weights, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "s-0.tar").write_bytes(b"garbage" * 200)
    res = run(data, tmp_path / "c.zarr", teacher_weights)
    assert res.exit_code == 2 and f"cannot read shard {data / 's-0.tar'}" in res.stderr
    assert nothing_complete(tmp_path / "c.zarr")


def test_other_settings_refused(cache, dataset, teacher_weights, tmp_path):
    out = tmp_path / "c.zarr"
    shutil.copytree(cache, out)  # V=3, k=3, seed 7, res 32, mixup
    res = run(dataset, out, teacher_weights, "--no-mixup")  # and -V 2
    assert res.exit_code == 2, res.output
    assert "made with other settings" in res.stderr
    assert "views: cache has 3, this run has 2" in res.stderr
    assert "augmentation.mixup: cache has True, this run has False" in res.stderr


def test_bad_flags(dataset, teacher_weights, tmp_path):
    res = run(dataset, tmp_path / "c.zarr", teacher_weights, "--scale", "0.5,0.1")
    assert res.exit_code == 2 and "invalid --scale/--ratio: scale range must satisfy" in res.stderr
    res = run(dataset, tmp_path / "c.zarr", teacher_weights, "--mean", "0.5,0.5")
    assert res.exit_code == 2 and "expected 3" in res.output
    res = run(dataset, tmp_path / "c.zarr", teacher_weights, "--topk", "6")
    assert res.exit_code == 2 and "--topk 6 exceeds the teacher's 5 classes" in res.output
    assert nothing_complete(tmp_path / "c.zarr")


def test_exit_code_of_the_real_process(dataset, tmp_path):
    """Not just CliRunner: `python -m kdcache` itself exits 2 with one line and no traceback."""
    res = subprocess.run(
        [sys.executable, "-m", "kdcache", "precompute", "--data", str(dataset), "--teacher", TEACHER,
         "--teacher-weights", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "c.zarr"), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])),
    )
    assert res.returncode == 2
    assert res.stderr.strip() == f"error: weights file {tmp_path / 'missing.pt'} does not exist"
    assert not (tmp_path / "c.zarr").exists()


def test_a_flag_of_the_other_target_kind_gets_a_note(dataset, teacher_weights, tmp_path):
    res = run(dataset, tmp_path / "s.zarr", teacher_weights, "--targets", "sample", "--samples", "4")
    assert res.exit_code == 0, res.output
    assert "note: --topk applies to --targets topk only; this run stores --targets sample" in res.stderr
    res = run(dataset, tmp_path / "t.zarr", teacher_weights, "--sample-temperature", "2")
    assert res.exit_code == 0, res.output
    assert "note: --sample-temperature applies to --targets sample only" in res.stderr
    assert "--topk" not in res.stderr  # given, and used
