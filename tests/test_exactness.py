"""Exactness holes an independent check found (issue 20), closed end to end on real shards and
caches through the command line: a teacher whose outputs are not finite never reaches a cache, and
such targets in an existing cache are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import zarr
from PIL import Image

from conftest import NUM_CLASSES, cli_in_process as run, encode, error_lines, make_image
from kdcache.cache.store import CacheReader

NONFINITE = "py:testmodels:nonfinite_cnn"
TINY = "py:kdcache.models.zoo:tiny_cnn"
POISON = "train1_0002"  # the solid image in shard 1: nonfinite_cnn's output there is NaN or ±inf


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory) -> Path:
    """3 shards x 4 labelled images; record 2 of shard 1 is one solid colour (a PNG)."""
    root = tmp_path_factory.mktemp("poisoned")
    rng = np.random.default_rng(3)
    for s in range(3):
        with wds.TarWriter(str(root / f"train-{s:06d}.tar")) as w:
            for i in range(4):
                cls = int(rng.integers(NUM_CLASSES))
                key = f"train{s}_{i:04d}"
                im = (Image.new("RGB", (40, 30), (90, 140, 200)) if key == POISON
                      else make_image(rng, int(rng.integers(24, 64)), int(rng.integers(24, 64)), cls))
                w.write({"__key__": key, "png": encode(im, "png"), "cls": str(cls).encode()})
    return root


def precompute_args(data, out, weights, teacher=NONFINITE, *extra):
    return ["precompute", "--data", data, "--teacher", teacher, "--teacher-weights", weights, "--num-classes",
            NUM_CLASSES, "--out", out, "-V", 3, "-k", 3, "--seed", 5, "--res", 32, "-b", 4, "--workers", 0,
            "--device", "cpu", "--no-progress", *extra]


KINDS = {"topk": (), "compact": ("--compact",), "sample": ("--targets", "sample", "--samples", 8),
         "sample_compact": ("--targets", "sample", "--samples", 8, "--compact")}


# ---- 1. a teacher whose outputs are not finite -----------------------------------------------------


@pytest.mark.parametrize("kind,value", [("topk", "nan"), ("topk", "-inf"), ("compact", "inf"), ("sample", "nan"),
                                        ("sample", "inf"), ("sample_compact", "-inf")])
def test_precompute_stops_at_a_teacher_whose_output_is_not_finite(poisoned, teacher_weights, tmp_path, monkeypatch,
                                                                  kind, value):
    """NaN / ±inf logits for the solid image of shard 1: exit 2 with one line naming the shard, the
    key and its views and the likely cause; the shard before it is complete, shard 1 was never
    stored (no group), nothing after it was started."""
    monkeypatch.setenv("KD_TEST_NONFINITE", value)
    out = tmp_path / "c.zarr"
    code, text = run(*precompute_args(poisoned, out, teacher_weights, NONFINITE, *KINDS[kind]))
    assert code == 2, text
    err = error_lines(text)
    assert len(err) == 1 and "Traceback" not in text, text
    want = {"nan": "NaN", "inf": "+inf", "-inf": "-inf"}[value]
    for word in ("train-000001.tar", f"key '{POISON}' view 0", f"key '{POISON}' view 1", f"logits hold {want}",
                 "fp16", "nothing of shard group 'train-000001' was stored"):
        assert word in err[0], (word, err[0])
    r = CacheReader(str(out))
    assert r.is_complete("train-000000")
    assert "train-000001" not in r.shard_names() and "train-000002" not in r.shard_names()
    # the same teacher on clean data is fine: the check does not refuse finite outputs
    clean = tmp_path / "clean.zarr"
    code, text = run(*precompute_args(poisoned / "train-000000.tar", clean, teacher_weights, NONFINITE, *KINDS[kind]))
    assert code == 0, text


def test_live_teacher_with_non_finite_output_stops_training(poisoned, teacher_weights, tmp_path, monkeypatch):
    """The live teacher runs through the same check: train stops naming the records instead of
    logging a NaN loss."""
    monkeypatch.setenv("KD_TEST_NONFINITE", "inf")
    code, text = run("train", "--data", poisoned, "--teacher", NONFINITE, "--teacher-weights", teacher_weights,
                     "--num-classes", NUM_CLASSES, "--topk", 3, "--student", TINY, "--out", tmp_path / "run", "--epochs", 1,
                     "-b", 12, "--res", 32, "--workers", 0, "--device", "cpu", "--no-progress")
    err = error_lines(text)
    assert code == 2 and len(err) == 1, text
    assert "live teacher" in err[0] and f"key '{POISON}'" in err[0] and "logits hold +inf" in err[0], err[0]
    assert not (tmp_path / "run" / "model.pt").exists()


def _fix_digests(path: Path, name: str) -> None:
    """Record the digests of group ``name`` as they are now, as the writer of an older kdcache did
    for what it stored (its NaN included)."""
    from kdcache.cache.store import DIGEST_ATTR

    r = CacheReader(str(path), check_digests=False, check_values=False)
    g = zarr.open_group(str(path / name), mode="r+")
    g.attrs[DIGEST_ATTR] = r.computed_digests(name)


@pytest.mark.parametrize("kind", ["topk", "compact"])
def test_train_and_verify_refuse_non_finite_targets_of_an_older_cache(poisoned, teacher_weights, tmp_path, kind):
    """A cache an older kdcache wrote from a NaN teacher (simulated: a record's stored values set to
    NaN through zarr, its digests recorded again): train and verify refuse it, exit 2, naming the
    group, key and view; inspect flags it as impossible values, exit 2."""
    data = tmp_path / "data"
    data.mkdir()
    for s in (0, 2):  # shards without the solid image
        (data / f"train-{s:06d}.tar").write_bytes((poisoned / f"train-{s:06d}.tar").read_bytes())
    c = tmp_path / "c.zarr"
    code, text = run(*precompute_args(data, c, teacher_weights, TINY, *KINDS[kind]))
    assert code == 0, text
    g = zarr.open_group(str(c / "train-000002"), mode="r+")
    arr = g["logprobs" if kind == "topk" else "topk_logmass"]
    values = arr[:]
    values[1, 0] = np.nan  # record 1 (train2_0001), view 0: the one epoch 0 reads
    arr[...] = values
    _fix_digests(c, "train-000002")
    assert CacheReader(str(c), check_values=False).digest_problems("train-000002") == []  # not an edit

    code, text = run("train", "--data", data, "--cache", c, "--student", TINY, "--out", tmp_path / "run",
                     "--epochs", 1, "-b", 4, "--workers", 0, "--device", "cpu", "--no-progress")
    err = error_lines(text)
    assert code == 2 and len(err) == 1, text
    for word in ("'train-000002'", "key 'train2_0001' view 0", "not finite"):
        assert word in err[0], (word, err[0])
    assert not (tmp_path / "run" / "model.pt").exists()
    code, text = run("verify", c, "--data", data, "--teacher", TINY, "--teacher-weights", teacher_weights, "-n", 4,
                     "--device", "cpu")
    err = error_lines(text)
    assert code == 2 and len(err) == 1 and "key 'train2_0001' view 0" in err[0] and "not finite" in err[0], text
    code, text = run("inspect", c)
    assert code == 2 and "NaN or +inf" in text, text


def test_verify_refuses_a_teacher_that_is_not_finite_on_a_sampled_cache(poisoned, teacher_weights, tmp_path, monkeypatch):
    """A sampled cache cannot show a NaN teacher (its draws looked like a clean one-hot of class 0),
    but verify re-runs the teacher: one that is not finite on a stored view now stops verify (exit 2)
    naming the shard and key, instead of re-drawing the same one-hot and passing."""
    monkeypatch.setenv("KD_TEST_NONFINITE", "1000")  # finite while the cache is made
    c = tmp_path / "c.zarr"
    code, text = run(*precompute_args(poisoned, c, teacher_weights, NONFINITE, *KINDS["sample"]))
    assert code == 0, text
    verify = ("verify", c, "--data", poisoned, "--teacher", NONFINITE, "--teacher-weights", teacher_weights, "-n", 100,
              "--device", "cpu")
    code, text = run(*verify)
    assert code == 0, text
    monkeypatch.setenv("KD_TEST_NONFINITE", "nan")
    code, text = run(*verify)
    err = error_lines(text)
    assert code == 2 and len(err) == 1, text
    assert "train-000001.tar" in err[0] and f"key '{POISON}'" in err[0] and "logits hold NaN" in err[0], err[0]


# ---- 2. manifest fields that decide what the stored bytes mean --------------------------------------


@pytest.fixture(scope="module")
def clean_caches(poisoned, teacher_weights, tmp_path_factory):
    """Shards 0 and 2 of the poisoned data (no solid image) and two caches of them: compact top-k,
    and sampled (8 draws at temperature 2)."""
    root = tmp_path_factory.mktemp("clean20")
    data = root / "data"
    data.mkdir()
    for s in (0, 2):
        (data / f"train-{s:06d}.tar").write_bytes((poisoned / f"train-{s:06d}.tar").read_bytes())
    out = {"data": data}
    for name, extra in (("compact", KINDS["compact"]), ("sample", KINDS["sample"] + ("--sample-temperature", 2))):
        out[name] = root / f"{name}.zarr"
        code, text = run(*precompute_args(data, out[name], teacher_weights, TINY, *extra))
        assert code == 0, text
    return out


def edit_manifest(cache: Path, field: str, value) -> None:
    meta = json.loads((cache / "zarr.json").read_text())
    m = meta["attributes"]["kdcache"]
    *path, last = field.split(".")
    for p in path:
        m = m.setdefault(p, {})
    m[last] = value
    (cache / "zarr.json").write_text(json.dumps(meta))


def three_commands(cache, data, weights, out, temperature=None):
    extra = ("--temperature", temperature) if temperature is not None else ()
    return {
        "train": run("train", "--data", data, "--cache", cache, "--student", TINY, "--out", out, "--epochs", 1,
                     "-b", 4, "--workers", 0, "--device", "cpu", "--no-progress", *extra),
        "inspect": run("inspect", cache),
        "verify": run("verify", cache, "--data", data, "--teacher", TINY, "--teacher-weights", weights, "-n", 8,
                      "--device", "cpu"),
    }


MANIFEST_EDITS = [  # (cache, field, edited value): every decode-relevant field (store.DECODE_FIELDS)
    ("compact", "format_version", 2),
    ("compact", "encoding.logprob_step", 0.125),
    ("compact", "encoding.layout", "plain"),
    ("compact", "encoding.classes", "other"),
    ("compact", "topk", 2),
    ("compact", "views", 2),
    ("compact", "teacher.num_classes", 4),
    ("compact", "teacher.mean", [0.5, 0.5, 0.5]),
    ("compact", "teacher.weights_sha256", "0" * 64),
    ("compact", "seed", 6),
    ("compact", "augmentation.scale", [0.5, 1.0]),
    ("compact", "augmentation.flip", False),
    ("compact", "resolution", 64),
    ("compact", "compute.batch_size", 8),
    ("compact", "render.backend", "torch"),
    ("compact", "targets.kind", "sample"),
    ("sample", "targets.temperature", 1.0),
    ("sample", "targets.samples", 4),
    ("sample", "targets.kind", "topk"),
    ("sample", "targets.version", 2),
    ("sample", "encoding.layout", "compact"),
]


@pytest.mark.parametrize("which,field,value", MANIFEST_EDITS, ids=[f"{w}-{f}" for w, f, _ in MANIFEST_EDITS])
def test_an_edited_manifest_field_is_named_by_train_inspect_and_verify(clean_caches, teacher_weights, tmp_path,
                                                                       which, field, value):
    """Each field that decides how stored bytes are read, edited in the root zarr.json: train,
    inspect and verify refuse the cache on open with exit 2 and one line naming the field as an
    edit (with the value the groups were written with), nothing is trained."""
    c = tmp_path / "c.zarr"
    shutil.copytree(clean_caches[which], c)
    written = CacheReader(str(c)).manifest
    for p in field.split("."):
        written = (written or {}).get(p) if p != "backend" else (written or {}).get(p, "pil")
    edit_manifest(c, field, value)
    temperature = 2 if which == "sample" else None
    for cmd, (code, text) in three_commands(c, clean_caches["data"], teacher_weights, tmp_path / "run",
                                            temperature).items():
        err = error_lines(text)
        assert code == 2 and len(err) == 1 and "Traceback" not in text, (cmd, text)
        assert f"manifest field {field} was edited after precompute" in err[0], (cmd, err[0])
        assert f"written with {json.dumps(written)}" in err[0], (cmd, err[0])
    assert not (tmp_path / "run" / "model.pt").exists()


def test_manifest_fields_free_to_differ_are_not_edits(clean_caches, teacher_weights, tmp_path):
    """sources, class_names, kdcache_version and the render details other than the backend may
    change (shards move, a release reads an older cache): the cache stays usable."""
    c = tmp_path / "c.zarr"
    shutil.copytree(clean_caches["compact"], c)
    for field, value in (("sources", ["/elsewhere/a.tar", "/elsewhere/b.tar"]), ("class_names", None),
                         ("kdcache_version", "9.9.9"), ("render.pil_version", "0.0")):
        edit_manifest(c, field, value)
    results = three_commands(c, clean_caches["data"], teacher_weights, tmp_path / "run")
    assert all(code == 0 for code, _ in results.values()), results


def test_a_group_record_edited_with_the_manifest_still_fails_its_digests(clean_caches, tmp_path):
    """The record is covered by the view digests: editing the manifest and every group's record
    alike is an edit of the views (named by view), as an edited array is."""
    from kdcache.cache.store import RECORD_ATTR

    c = tmp_path / "c.zarr"
    shutil.copytree(clean_caches["compact"], c)
    edit_manifest(c, "encoding.logprob_step", 0.125)
    for name in ("train-000000", "train-000002"):
        g = zarr.open_group(str(c / name), mode="r+")
        rec = json.loads(g.attrs[RECORD_ATTR])
        rec["encoding"]["logprob_step"] = 0.125
        g.attrs[RECORD_ATTR] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    r = CacheReader(str(c), check_digests=False)
    assert r.digest_problems("train-000000") == [0, 1, 2]
    code, text = run("inspect", c)
    assert code == 2 and "train-000000 views [0, 1, 2] were changed after precompute" in text, text


# ---- 4. an edited view is found before training starts ----------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_an_edit_in_the_last_view_stops_train_before_its_first_epoch(clean_caches, teacher_weights, tmp_path,
                                                                     workers):
    """V = 4, --epochs 4: view 3 is read only in epoch 4, yet its edit stops train at start-up (exit
    2, naming the group and the view): no step, no checkpoint. With data workers the check runs
    in that many processes."""
    c = tmp_path / "c.zarr"
    code, text = run(*precompute_args(clean_caches["data"], c, teacher_weights, TINY, "-V", 4))
    assert code == 0, text
    a = zarr.open_group(str(c / "train-000002"), mode="r+")["logprobs"]
    values = a[:]
    values[3, 3, 1] -= 0.5  # record 3, view 3 (written through zarr: valid chunk checksums)
    a[...] = values
    out = tmp_path / "run"
    code, text = run("train", "--data", clean_caches["data"], "--cache", c, "--student", TINY, "--out", out,
                     "--epochs", 4, "-b", 4, "--workers", workers, "--device", "cpu", "--no-progress")
    err = error_lines(text)
    assert code == 2 and len(err) == 1, text
    assert "'train-000002'" in err[0] and "view 3 does not match the digest" in err[0], err[0]
    assert not (out / "checkpoint.pt").exists() and not (out / "model.pt").exists()
    assert "epoch" not in text.replace("--epochs", ""), text
