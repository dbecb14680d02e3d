"""`kdcache verify`: passes on a correct cache, fails naming the record when the cache or data change."""

from __future__ import annotations

import io
import json
import os
import shutil

import fsspec
import numpy as np
import pytest
import torch
import webdataset as wds
import zarr
from click.testing import CliRunner
from PIL import Image

from conftest import NUM_CLASSES, TEACHER, plain_keys, precompute_config, sharp_teacher, snapshot
from kdcache.cli import cli
from kdcache.cache.agreement import compare_record


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def sharp(dataset, tmp_path_factory):
    """A teacher whose outputs move clearly with the input (a scaled-up head), and its cache."""
    from kdcache.tools.precompute import precompute

    model = sharp_teacher(1)
    root = tmp_path_factory.mktemp("sharp")
    weights = root / "sharp.pt"
    torch.save(model.state_dict(), weights)
    out = root / "cache.zarr"
    precompute(precompute_config(dataset, out, weights))
    return weights, out


def verify_args(cache, data, weights, *extra, as_json=True):
    return ("verify", cache, "--data", data, "--teacher", TEACHER, "--teacher-weights", weights,
            "--device", "cpu", "--samples", 1000, *extra) + (("--json",) if as_json else ())


def test_verify_passes_and_does_not_write(sharp, dataset):
    weights, c = sharp
    before = snapshot(c)
    res = run(*verify_args(c, dataset, weights))
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["ok"] is True and r["failures"] == [] and r["problems"] == []
    assert r["samples_checked"] == r["population"] == r["compared"] == 63  # 21 samples x 3 views: all of them
    assert r["keys_found"] == r["keys_checked"] == r["sizes_match"] == 21
    assert r["geometry_match"] == r["geometry_checked"] == 63
    assert r["top1_agreement"] == 1.0 and r["topk_set_agreement"] == 1.0
    assert r["max_abs_delta_logprob"] <= 1e-2
    assert r["teacher"]["spec_matches"] and r["teacher"]["weights_match"] and r["render"]["matches"]
    text = run(*verify_args(c, dataset, weights, as_json=False))
    assert text.exit_code == 0 and "OK:" in text.stdout and "top-1 agreement 100.0%" in text.stdout
    assert snapshot(c) == before


def test_verify_session_cache_via_urls(cache, dataset, teacher_weights):
    before = snapshot(cache)
    res = run(*verify_args(f"file://{cache}", dataset, teacher_weights, "--samples", 20, "--seed", 3))
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["ok"] and r["samples_checked"] == 20
    fs = fsspec.filesystem("memory")
    fs.put(str(cache), "/verify-test/cache.zarr", recursive=True)
    try:
        res = run(*verify_args("memory://verify-test/cache.zarr", dataset, teacher_weights, "--samples", 20, "--seed", 3))
        assert res.exit_code == 0, res.output
        m = json.loads(res.stdout)
    finally:
        fs.rm("/verify-test", recursive=True)
    for x in (r, m):
        x.pop("cache")
    assert m == r
    assert snapshot(cache) == before


def test_verify_streams_only_sampled_shards_once(sharp, dataset, monkeypatch):
    import kdcache.data.shards as shards

    weights, c = sharp
    opened = []
    real = shards.iter_samples

    def spy(url):
        opened.append(os.path.basename(url))
        return real(url)

    monkeypatch.setattr(shards, "iter_samples", spy)
    res = run(*verify_args(c, dataset, weights, "--samples", 2, "--seed", 5))
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["samples_checked"] == 2 and 1 <= len(r["shards_checked"]) <= 2
    assert sorted(opened) == sorted(f"{s}.tar" for s in r["shards_checked"])  # each once, no others


def altered(cache, tmp_path, array, edit):
    """A copy of ``cache`` with one element of ``train-000001/<array>`` changed; returns (path, key, view)."""
    c = tmp_path / "cache.zarr"
    shutil.copytree(cache, c)
    g = zarr.open_group(str(c), mode="r+")["train-000001"]
    i, v = 4, 1
    a = g[array][:]
    edit(a, i, v)
    g[array][:] = a
    return c, plain_keys(g["keys"])[i], v


def failing_records(res) -> list[tuple[str, str, int]]:
    assert res.exit_code == 1, res.output
    r = json.loads(res.stdout)
    assert r["ok"] is False
    return [(f["shard"], f["key"], f["view"]) for f in r["failures"]], r


def test_verify_fails_on_altered_logprob(sharp, dataset, tmp_path):
    weights, c0 = sharp

    def edit(a, i, v):
        a[i, v, 1] = a[i, v, 1] - np.float16(0.25)

    c, key, v = altered(c0, tmp_path, "logprobs", edit)
    fails, r = failing_records(run(*verify_args(c, dataset, weights)))
    assert fails == [("train-000001", key, v)]
    assert "log-prob" in r["failures"][0]["reasons"][0] and r["max_abs_delta_logprob"] >= 0.2
    text = run(*verify_args(c, dataset, weights, as_json=False))
    assert text.exit_code == 1 and f"train-000001 {key} view {v}" in text.stdout and "FAILED" in text.stdout


def test_verify_fails_on_altered_box(sharp, dataset, tmp_path):
    weights, c0 = sharp

    def edit(a, i, v):
        a[i, v, 2] = max(1, a[i, v, 2] // 2)  # half the crop width

    c, key, v = altered(c0, tmp_path, "box", edit)
    fails, r = failing_records(run(*verify_args(c, dataset, weights)))
    # The record itself is named; a record mixed with it (whose partner crop changed) may be too.
    assert ("train-000001", key, v) in fails
    own = next(f for f in r["failures"] if f["key"] == key and f["view"] == v)
    assert any(why.startswith("geometry") for why in own["reasons"])
    assert r["geometry_match"] == 62


def rewrite_tar(src, dst, change=None, drop=None):
    """Copy a shard, replacing the image of key ``change`` (same size, other pixels) or dropping ``drop``."""
    from webdataset import tariterators

    stream = tariterators.url_opener([{"url": str(src)}])
    with wds.TarWriter(str(dst)) as w:
        for s in tariterators.group_by_keys(tariterators.tar_file_expander(stream)):
            rec = {k: v for k, v in s.items() if not k.startswith("__") or k == "__key__"}
            if s["__key__"] == drop:
                continue
            if s["__key__"] == change:
                ext = "png" if "png" in rec else "jpg"
                im = Image.open(io.BytesIO(rec[ext])).convert("RGB")
                inv = Image.fromarray(255 - np.asarray(im))
                buf = io.BytesIO()
                inv.save(buf, format="PNG" if ext == "png" else "JPEG", quality=90)
                rec[ext] = buf.getvalue()
            w.write(rec)


def test_verify_fails_on_changed_image(sharp, dataset, tmp_path):
    weights, c = sharp
    data = tmp_path / "train"
    shutil.copytree(dataset, data)
    key = "train2_0003"
    rewrite_tar(dataset / "train-000002.tar", data / "train-000002.tar", change=key)
    before = snapshot(c)
    fails, r = failing_records(run(*verify_args(c, data, weights)))
    assert {(s, k) for s, k, _ in fails} >= {("train-000002", key)}
    assert all(s == "train-000002" for s, _, _ in fails)  # other shards untouched
    assert r["sizes_match"] == r["keys_found"] == 21  # same size: only the pixels betray it
    assert snapshot(c) == before


def test_verify_fails_on_missing_key(sharp, dataset, tmp_path):
    weights, c = sharp
    data = tmp_path / "train"
    shutil.copytree(dataset, data)
    rewrite_tar(dataset / "train-000000.tar", data / "train-000000.tar", drop="train0_0002")
    fails, r = failing_records(run(*verify_args(c, data, weights)))
    assert ("train-000000", "train0_0002", 0) in fails
    assert r["keys_found"] == 20
    assert any("train0_0002" in why and "not in data shard" in why for f in r["failures"] for why in f["reasons"])


def test_teacher_mismatch_policy(sharp, dataset, teacher_weights, tmp_path):
    weights, c = sharp
    # Other weights: a problem, and the numbers disagree too.
    fails, r = failing_records(run(*verify_args(c, dataset, teacher_weights, "--samples", 6)))
    assert r["teacher"]["weights_match"] is False and any("sha256" in p for p in r["problems"])
    # The same weights re-saved in the legacy torch format: another hash, identical numbers.
    resaved = tmp_path / "resaved.pt"
    torch.save(torch.load(weights, weights_only=True), resaved, _use_new_zipfile_serialization=False)
    res = run(*verify_args(c, dataset, resaved, "--samples", 6))
    assert res.exit_code == 1, res.output
    r = json.loads(res.stdout)
    assert r["failures"] == [] and r["teacher"]["weights_match"] is False and r["problems"]
    res = run(*verify_args(c, dataset, resaved, "--samples", 6, "--allow-teacher-mismatch"))
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["ok"] and r["problems"] == [] and any("sha256" in w for w in r["warnings"])


def test_render_backend_difference_warns(sharp, dataset, tmp_path):
    weights, c0 = sharp
    c = tmp_path / "cache.zarr"
    shutil.copytree(c0, c)
    root = zarr.open_group(str(c), mode="r+")
    man = dict(root.attrs["kdcache"])
    man["render"] = dict(man["render"], pil="Pillow", pil_version="9.0.0")
    root.attrs["kdcache"] = man
    res = run(*verify_args(c, dataset, weights, "--samples", 6))
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["render"]["matches"] is False and any("Pillow 9.0.0" in w for w in r["warnings"])
    text = run(*verify_args(c, dataset, weights, "--samples", 6, as_json=False))
    assert "warning:" in text.stdout and "Pillow 9.0.0" in text.stdout


def test_verify_skips_bad_records(tmp_path, teacher_weights):
    from conftest import write_dataset
    from kdcache.tools.precompute import precompute

    data = tmp_path / "train"
    write_dataset(data, shards=1, per_shard=5, seed=4)
    with wds.TarWriter(str(data / "train-000000.tar")) as w:  # rewrite with a broken image among good ones
        from conftest import encode, make_image

        rng = np.random.default_rng(1)
        for i in range(4):
            w.write({"__key__": f"g_{i}", "png": encode(make_image(rng, 33, 29, i), "png"), "cls": b"0"})
        w.write({"__key__": "g_broken", "png": b"\x89PNG broken", "cls": b"0"})
    c = tmp_path / "cache.zarr"
    precompute(precompute_config(data, c, teacher_weights, skip_bad=True))
    res = run(*verify_args(c, data, teacher_weights))
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["population"] == r["compared"] == 4 * 3 and r["geometry_match"] == 12


def test_compare_record_tolerance_and_ties():
    ids = np.array([2, 0, 1, 3, 4])
    vals = np.array([-1.0, -1.5, -2.0, -3.0, -4.0], dtype=np.float16)
    same = compare_record(vals[:3], ids[:3], vals, ids)
    assert same["reasons"] == [] and same["top1_exact"] and same["topk_exact"] and same["max_delta"] == 0
    assert same["tail_delta"] == 0
    # The default tolerance is one float16 step (2^-10·|x|) plus 1e-4: a step passes, 0.005 does not.
    step = np.array([-1.0 + 2**-10, -1.5, -2.0], dtype=np.float16)
    assert compare_record(step, ids[:3], vals, ids)["reasons"] == []
    assert len(compare_record(vals[:3] + np.float16(0.005), ids[:3], vals, ids)["reasons"]) >= 3
    # The tie rules, with a wider tolerance (--atol 1e-2): within it, 0.005 < 1e-2
    wide = dict(atol=1e-2)
    ok = compare_record(vals[:3] + np.float16(0.005), ids[:3], vals, ids, **wide)
    assert ok["reasons"] == []
    bad = compare_record(vals[:3] - np.float16(0.05), ids[:3], vals, ids, **wide)
    assert len([r for r in bad["reasons"] if r.startswith("log-prob")]) == 3
    # A near-tie at the top: precompute saw class 0 ahead of class 2 by 0.004, the re-run the reverse.
    tvals = np.array([-1.0, -1.004, -2.0, -3.0, -4.0], dtype=np.float16)
    tie = compare_record(np.array([-1.0, -1.004, -2.0], dtype=np.float16), np.array([0, 2, 1]), tvals, ids, **wide)
    assert tie["top1_exact"] is False and tie["reasons"] == []
    # A real top-1 change (gap 0.5) fails.
    swap = compare_record(np.array([-1.0, -1.5, -2.0], dtype=np.float16), np.array([0, 2, 1]), vals, ids, **wide)
    assert any(r.startswith("top-1") for r in swap["reasons"])
    # Boundary tie for the top-k set: stored class 1 at rank 3 vs class 3, 0.003 apart.
    bvals = np.array([-1.0, -1.5, -2.0, -2.003, -4.0], dtype=np.float16)
    bids = np.array([2, 0, 3, 1, 4])
    btie = compare_record(np.array([-1.0, -1.5, -2.003], dtype=np.float16), np.array([2, 0, 1]), bvals, bids, **wide)
    assert btie["topk_exact"] is False and btie["reasons"] == []


def test_tail_mass_catches_a_shared_bias():
    """A shift shared by every stored log-prob moves the mass outside the top-k; the tail check sees
    it even where each entry alone stays within its tolerance."""
    # A confident teacher, every entry +0.009 (the old default tolerance, 0.01, let this pass):
    # the tail goes from 0.005 to about 0. The default tolerance fails it, tail included.
    p = np.array([0.95, 0.03, 0.015] + [0.005 / 7] * 7)
    ids = np.argsort(-p)
    vals = np.log(p[ids]).astype(np.float16)
    biased = (vals[:3].astype(np.float64) + 0.009).astype(np.float16)
    r = compare_record(biased, ids[:3], vals, ids)
    assert any(x.startswith("tail mass") for x in r["reasons"]) and r["tail_delta"] > 0.004, r["reasons"]
    assert compare_record(vals[:3], ids[:3], vals, ids)["reasons"] == []
    # A spread teacher (10 classes of ~0.0995, tail 0.005), every entry one float16 step up: each
    # entry is within its tolerance, but together they move the tail by ~0.002 (> the root-sum-
    # square of the steps, ~0.0007).
    p = np.array([0.0995] * 10 + [0.005 / 90] * 90)
    ids = np.arange(100)
    vals = np.log(p).astype(np.float16)
    up = np.nextafter(vals[:10], np.float16(0))
    r = compare_record(up, ids[:10], vals, ids)
    assert not [x for x in r["reasons"] if x.startswith("log-prob")]
    assert any(x.startswith("tail mass") for x in r["reasons"]), r["reasons"]
    # one entry a step up, the others as stored: rounding noise, not a shift
    one = vals[:10].copy()
    one[0] = up[0]
    assert compare_record(one, ids[:10], vals, ids)["reasons"] == []


def test_bad_inputs_exit_2(sharp, dataset, tmp_path):
    weights, c = sharp

    def fails(*args, needle):
        res = run(*args)
        assert res.exit_code == 2, (args, res.output)
        assert needle in res.stderr, (needle, res.stderr)

    fails("verify", tmp_path / "none.zarr", "--data", dataset, "--teacher", TEACHER, needle="does not exist")
    fails(*verify_args(c, str(tmp_path / "nope-*.tar"), weights), needle="matched no shards")
    other = tmp_path / "other"
    other.mkdir()
    from conftest import write_dataset

    write_dataset(other, shards=1, per_shard=2, prefix="val")
    fails(*verify_args(c, other, weights), needle="no complete cache shard")
    fails(*verify_args(c, dataset, tmp_path / "missing.pt"), needle="missing.pt does not exist")
    fails(*verify_args(c, dataset, weights, "--num-classes", 7), needle="--num-classes 7")
    v99 = tmp_path / "v99.zarr"
    shutil.copytree(c, v99)
    root = zarr.open_group(str(v99), mode="r+")
    root.attrs["kdcache"] = dict(root.attrs["kdcache"], format_version=99)
    fails(*verify_args(v99, dataset, weights), needle="format version 99")
    holes = tmp_path / "holes.zarr"
    shutil.copytree(c, holes)
    shutil.rmtree(holes / "train-000001" / "box")
    fails(*verify_args(holes, dataset, weights), needle="lacks arrays ['box']")


def test_verify_reruns_precompute_batches_exactly(sharp, dataset):
    """verify gives the teacher the batches precompute gave it (recorded batch size), so on the same
    machine every stored float16 comes back bit for bit, tail mass included."""
    weights, c = sharp
    r = json.loads(run(*verify_args(c, dataset, weights)).stdout)
    assert r["ok"] and r["exact_batches"] is True and r["compared"] == 63
    assert r["max_abs_delta_logprob"] == 0.0 and r["max_abs_delta_tail_mass"] == 0.0
    assert r["tolerance"] == {"atol": 1e-4, "rtol": 2.0**-10, "logprob_step": 0.0}  # plain layout: not quantised


def _cache_copy(c, tmp_path):
    out = tmp_path / "cache.zarr"
    shutil.copytree(c, out)
    return out


def test_verify_reports_a_missing_group(sharp, dataset, tmp_path):
    weights, c0 = sharp
    c = _cache_copy(c0, tmp_path)
    shutil.rmtree(c / "train-000001")
    res = run(*verify_args(c, dataset, weights, "--samples", 6))
    assert res.exit_code == 1, res.output
    r = json.loads(res.stdout)
    assert r["ok"] is False and r["failures"] == []
    assert any("'train-000001'" in p and "missing from the store" in p for p in r["problems"]), r["problems"]
    assert any("train-000001.tar has no group in the cache" in p for p in r["problems"]), r["problems"]
    text = run(*verify_args(c, dataset, weights, "--samples", 6, as_json=False))
    assert text.exit_code == 1 and "problem: shard group 'train-000001'" in text.stdout and "FAILED" in text.stdout


def test_verify_reports_an_incomplete_group(sharp, dataset, tmp_path):
    weights, c0 = sharp
    c = _cache_copy(c0, tmp_path)
    zarr.open_group(str(c), mode="r+")["train-000002"].attrs["complete"] = False
    res = run(*verify_args(c, dataset, weights, "--samples", 6))
    assert res.exit_code == 1, res.output
    r = json.loads(res.stdout)
    assert any("'train-000002' is incomplete" in p for p in r["problems"]), r["problems"]
    assert "train-000002" not in r["shards_checked"]


def test_verify_reports_data_shards_the_cache_never_covered(sharp, dataset, tmp_path):
    from conftest import write_dataset

    weights, c = sharp
    data = tmp_path / "train"
    shutil.copytree(dataset, data)
    write_dataset(tmp_path / "more", shards=1, per_shard=3, seed=9, prefix="extra")
    shutil.copy(tmp_path / "more" / "extra-000000.tar", data / "extra-000000.tar")
    res = run(*verify_args(c, data, weights, "--samples", 6))
    assert res.exit_code == 1, res.output
    r = json.loads(res.stdout)
    assert r["failures"] == [] and any("extra-000000.tar has no group in the cache" in p for p in r["problems"])
    # a subset of the cache's shards is fine: the others are not checked, and that is only a warning
    res = run(*verify_args(c, dataset / "train-000000.tar", weights, "--samples", 6))
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["problems"] == [] and any("not in the data pattern" in w for w in r["warnings"])


def test_verify_with_a_shared_bias_fails(sharp, dataset, tmp_path):
    """+0.009 on every stored log-prob passed the old tolerance (0.01); now it fails."""
    weights, c0 = sharp
    c = _cache_copy(c0, tmp_path)
    g = zarr.open_group(str(c), mode="r+")["train-000001"]
    lp = g["logprobs"][:]
    g["logprobs"][:] = (lp.astype(np.float64) + 0.009).astype(np.float16)
    fails, r = failing_records(run(*verify_args(c, dataset, weights)))
    assert {s for s, _, _ in fails} == {"train-000001"} and len(fails) == 7 * 3
    assert all(any(x.startswith("tail mass") for x in f["reasons"]) for f in r["failures"])
