"""`kdcache inspect`: every figure checked against values computed here from the raw Zarr arrays."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from conftest import NUM_CLASSES, TEACHER, plain_keys, precompute_config, snapshot, write_dataset
from kdcache.cli import cli
from kdcache.cache.store import FORMAT_VERSION

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(path) for f in fs)


def expected_summary(cache_path) -> dict:
    """The summary figures, computed independently: zarr-python reads and a dense reconstruction."""
    root = zarr.open_group(str(cache_path), mode="r")
    man = root.attrs["kdcache"]
    C, V, k = man["teacher"]["num_classes"], man["views"], man["topk"]
    shards = {}
    masses, ents, top1 = [], [], Counter()
    for name in sorted(root.group_keys()):
        g = root[name]
        attrs = dict(g.attrs)
        row = {"complete": bool(attrs.get("complete")), "bytes": dir_bytes(os.path.join(cache_path, name))}
        shards[name] = row
        if not row["complete"]:
            continue
        keys = plain_keys(g["keys"])
        bad = set(attrs.get("bad") or {})
        keep = np.array([kk not in bad for kk in keys])
        lp = g["logprobs"][:].astype(np.float64)[keep].reshape(-1, k)
        cls = g["classes"][:].astype(np.int64)[keep].reshape(-1, k)
        raw = sum(g[a][:].nbytes for a in ("keys", "size", "logprobs", "classes", "box", "flip", "mix_with", "mix_lam"))
        row.update(samples=len(keys), bad=len(bad), records=int(keep.sum()) * V, raw=raw)
        for l, c in zip(lp, cls):
            dense = np.full(C, 0.0)
            p = np.exp(l)
            m = max(0.0, 1.0 - p.sum())
            dense[:] = m / (C - k) if C > k else 0.0
            dense[c] = p
            q = dense[dense > 0]
            ents.append(float(-(q * np.log(q)).sum()))
            masses.append(float(p.sum()))
            top1[int(c[0])] += 1
    records = sum(r.get("records", 0) for r in shards.values())
    total_bytes = sum(r["bytes"] for r in shards.values() if r["complete"])
    return {
        "manifest": man, "shards": shards, "records": records, "bytes": total_bytes,
        "raw": sum(r.get("raw", 0) for r in shards.values()),
        "mass": float(np.mean(masses)) if masses else None, "entropy": float(np.mean(ents)) if ents else None,
        "top1": top1,
    }


def test_summary_matches_independent_computation(cache):
    before = snapshot(cache)
    res = run("inspect", cache, "--json")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    exp = expected_summary(cache)
    man = exp["manifest"]

    assert s["format_version"] == FORMAT_VERSION == 3 and s["views"] == man["views"] == 3 and s["topk"] == man["topk"] == 3
    assert s["seed"] == 7 and s["resolution"] == 32 and s["num_classes"] == NUM_CLASSES
    assert s["teacher"]["spec"] == TEACHER and s["teacher"]["weights_sha256"] == man["teacher"]["weights_sha256"]
    assert s["augmentation"] == man["augmentation"] and s["render"] == man["render"]
    assert s["class_names"] == [f"class_{c}" for c in range(NUM_CLASSES)]

    assert [r["name"] for r in s["shards"]] == sorted(exp["shards"])
    for row in s["shards"]:
        e = exp["shards"][row["name"]]
        assert row["status"] == "complete" and row["complete"] is True
        assert (row["samples"], row["bad"], row["records"]) == (e["samples"], e["bad"], e["records"]) == (7, 0, 21)
        assert row["bytes"] == e["bytes"]
        assert row["raw_bytes"] == e["raw"]

    t = s["totals"]
    assert t["complete_only"] is True and t["shards_complete"] == t["shards_total"] == 3
    assert t["samples"] == 21 and t["bad_samples"] == 0
    assert t["records"] == exp["records"] == 63
    assert t["bytes"] == exp["bytes"]
    assert t["raw_bytes"] == exp["raw"]
    assert t["bytes_per_record"] == pytest.approx(exp["bytes"] / 63)
    assert t["compression_ratio"] == pytest.approx(exp["raw"] / exp["bytes"])
    assert t["mean_topk_mass"] == pytest.approx(exp["mass"], rel=1e-9)
    assert t["mean_entropy"] == pytest.approx(exp["entropy"], rel=1e-9)
    assert 0 < t["mean_topk_mass"] <= 1.0 + 1e-3 and 0 < t["mean_entropy"] <= math.log(NUM_CLASSES) + 1e-6
    want = sorted(exp["top1"].items(), key=lambda kv: (-kv[1], kv[0]))
    assert [(e["class"], e["count"]) for e in t["top1"]] == want
    assert all(e["name"] == f"class_{e['class']}" for e in t["top1"])
    assert sum(e["fraction"] for e in t["top1"]) == pytest.approx(1.0)

    text = run("inspect", cache)
    assert text.exit_code == 0, text.output
    out = text.stdout
    for needle in (TEACHER, man["teacher"]["weights_sha256"][:16], "train-000000", "complete", "records 63",
                   f"{exp['bytes']:,}", f"{exp['mass']:.4f}", f"{exp['entropy']:.4f}", man["render"]["pil"],
                   f"format {FORMAT_VERSION}", "seed 7", "teacher resolution 32"):
        assert needle in out, (needle, out)
    assert snapshot(cache) == before


def documented_fields(section: str) -> list[str]:
    """Backticked field paths in the first column of the tables under ``### <section>`` in docs/cli.md."""
    text = DOCS.read_text()
    m = re.search(rf"^### {re.escape(section)}\s*$(.*?)(?=^#{{1,3}} )", text + "\n# end", re.M | re.S)
    assert m, f"docs/cli.md has no section '### {section}'"
    return re.findall(r"^\|\s*`([^`]+)`", m.group(1), re.M)


def resolve(obj, path: str):
    """``totals.top1[].count`` → checks the field exists (in every element of lists)."""
    parts = path.split(".")
    items = [obj]
    for p in parts:
        nxt = []
        for it in items:
            if p.endswith("[]"):
                assert isinstance(it, dict) and p[:-2] in it, path
                assert isinstance(it[p[:-2]], list), path
                nxt.extend(it[p[:-2]])
            else:
                assert isinstance(it, dict) and p in it, path
                nxt.append(it[p])
        items = nxt
    return items


def test_json_carries_documented_fields(cache, dataset, tmp_path):
    s = json.loads(run("inspect", cache, "--json").stdout)
    fields = documented_fields("inspect --json: summary")
    assert len(fields) > 20
    for f in fields:
        resolve(s, f)
    r = json.loads(run("inspect", cache, "--shard", "train-000001", "--key", "train1_0003", "--json").stdout)
    fields = documented_fields("inspect --json: one record")
    assert len(fields) > 10
    for f in fields:
        resolve(r, f)
    png = tmp_path / "r.png"
    rr = run("inspect", cache, "--shard", "train-000001", "--key", "train1_0003", "--render", png, "--data", dataset,
             "--json")
    assert rr.exit_code == 0, rr.output
    rj = json.loads(rr.stdout)
    for f in documented_fields("inspect --json: render"):
        resolve(rj, f)


def test_record_matches_arrays(cache):
    root = zarr.open_group(str(cache), mode="r")
    g = root["train-000001"]
    keys = plain_keys(g["keys"])
    for i in (0, 3, 6):
        key = keys[i]
        res = run("inspect", cache, "--shard", "train-000001", "--key", key, "--json")
        assert res.exit_code == 0, res.output
        r = json.loads(res.stdout)
        assert r["index"] == i and r["bad"] is None
        assert (r["size"]["height"], r["size"]["width"]) == tuple(int(t) for t in g["size"][i])
        assert [v["view"] for v in r["views"]] == [0, 1, 2]
        for v in r["views"]:
            vi = v["view"]
            assert [v["box"][c] for c in "xywh"] == [int(t) for t in g["box"][i, vi]]
            assert v["flip"] == bool(g["flip"][i, vi])
            j = int(g["mix_with"][i, vi])
            assert v["mix_with"] == j and v["mixed"] == (j >= 0)
            assert v["mix_key"] == (keys[j] if j >= 0 else None)
            assert v["mix_lam"] == float(g["mix_lam"][i, vi])
            lp = g["logprobs"][i, vi].astype(np.float64)
            cls = g["classes"][i, vi]
            assert [t["class"] for t in v["topk"]] == [int(c) for c in cls]
            assert [t["name"] for t in v["topk"]] == [f"class_{int(c)}" for c in cls]
            assert [t["prob"] for t in v["topk"]] == pytest.approx(np.exp(lp).tolist())
            assert v["topk_mass"] == pytest.approx(np.exp(lp).sum())
        text = run("inspect", cache, "--shard", "train-000001", "--key", key).stdout
        assert key in text and "view 2:" in text and "class_" in text
    # Both mixed and unmixed views exist in this shard; the text says which.
    mixed = (g["mix_with"][:] >= 0)
    assert mixed.any() and (~mixed).any()
    one = json.loads(run("inspect", cache, "--shard", "train-000001", "--key", keys[2], "--view", "1", "--json").stdout)
    assert [v["view"] for v in one["views"]] == [1]


@pytest.mark.parametrize("mixed", [True, False])
def test_render_png(cache, dataset, tmp_path, mixed):
    root = zarr.open_group(str(cache), mode="r")
    g = root["train-000002"]
    mw = g["mix_with"][:]
    i, v = map(int, np.argwhere(mw >= 0 if mixed else mw < 0)[0])
    key = plain_keys(g["keys"])[i]
    before = snapshot(cache)
    out = tmp_path / "view.png"
    res = run("inspect", cache, "--shard", "train-000002", "--key", key, "--view", v, "--render", out, "--data", dataset)
    assert res.exit_code == 0, res.output
    assert f"wrote {out}" in res.stdout
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (1200, 400)  # FIGSIZE (12, 4) at DPI 100, no tight bbox
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 10  # a picture, not a blank canvas
    assert ("partner" in res.stdout or "mixed with" in res.stdout) == mixed
    assert snapshot(cache) == before


def test_fsspec_urls(cache):
    local = json.loads(run("inspect", cache, "--json").stdout)
    # file:// URL
    f = json.loads(run("inspect", f"file://{cache}", "--json").stdout)
    # memory:// URL: the cache copied into fsspec's in-memory filesystem
    fs = fsspec.filesystem("memory")
    fs.put(str(cache), "/inspect-test/cache.zarr", recursive=True)
    try:
        res = run("inspect", "memory://inspect-test/cache.zarr", "--json")
        assert res.exit_code == 0, res.output
        m = json.loads(res.stdout)
        rec = run("inspect", "memory://inspect-test/cache.zarr", "--shard", "train-000000", "--key", "train0_0001",
                  "--json")
        assert rec.exit_code == 0, rec.output
        rec_local = run("inspect", cache, "--shard", "train-000000", "--key", "train0_0001", "--json")
        a, b = json.loads(rec.stdout), json.loads(rec_local.stdout)
        a.pop("cache"), b.pop("cache")
        assert a == b
    finally:
        fs.rm("/inspect-test", recursive=True)
    for other in (f, m):
        assert other["cache"] != local["cache"]
        other.pop("cache")
    local.pop("cache")
    assert f == local
    assert m == local


def test_incomplete_and_missing_shards(cache, tmp_path):
    c = tmp_path / "cache.zarr"
    shutil.copytree(cache, c)
    root = zarr.open_group(str(c), mode="r+")
    root["train-000001"].attrs["complete"] = False  # as if precompute were interrupted mid-shard
    shutil.rmtree(c / "train-000001" / "logprobs")
    shutil.rmtree(c / "train-000002")  # never started
    exp = expected_summary(c)
    res = run("inspect", c, "--json")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    status = {r["name"]: r["status"] for r in s["shards"]}
    assert status == {"train-000000": "complete", "train-000001": "incomplete", "train-000002": "missing"}
    inc = next(r for r in s["shards"] if r["name"] == "train-000001")
    assert inc["complete"] is False and inc["bytes"] == dir_bytes(c / "train-000001") and inc["records"] is None
    t = s["totals"]
    assert t["shards_complete"] == 1 and t["shards_incomplete"] == ["train-000001"] and t["shards_missing"] == ["train-000002"]
    assert t["records"] == 21 and t["bytes"] == exp["bytes"] == dir_bytes(c / "train-000000")
    assert t["mean_topk_mass"] == pytest.approx(exp["mass"], rel=1e-9)
    assert t["mean_entropy"] == pytest.approx(exp["entropy"], rel=1e-9)
    text = run("inspect", c)
    assert text.exit_code == 0
    assert "incomplete" in text.stdout and "missing" in text.stdout
    assert "totals over the 1 complete shards of 3" in text.stdout and "not counted" in text.stdout
    one = run("inspect", c, "--shard", "train-000001", "--key", "train1_0000")
    assert one.exit_code == 2 and "incomplete" in one.stderr


@pytest.fixture(scope="module")
def bad_cache(tmp_path_factory, teacher_weights):
    """A cache whose one shard holds an undecodable image, made with --skip-bad."""
    import webdataset as wds

    from kdcache.tools.precompute import precompute

    root = tmp_path_factory.mktemp("baddata")
    data = root / "train"
    write_dataset(data, shards=1, per_shard=5, seed=3)
    tar = data / "train-000001.tar"
    with wds.TarWriter(str(tar)) as w:
        from conftest import encode, make_image

        rng = np.random.default_rng(0)
        for i in range(4):
            w.write({"__key__": f"b_{i}", "jpg": encode(make_image(rng, 30, 40, i), "jpg"), "cls": b"1"})
        w.write({"__key__": "b_broken", "jpg": b"this is not a jpeg", "cls": b"2"})
    out = root / "cache.zarr"
    precompute(precompute_config(data, out, teacher_weights, skip_bad=True))
    return data, out


def test_bad_records_counted_and_shown(bad_cache):
    data, c = bad_cache
    exp = expected_summary(c)
    s = json.loads(run("inspect", c, "--json").stdout)
    row = {r["name"]: r for r in s["shards"]}
    assert row["train-000001"]["bad"] == 1 and row["train-000000"]["bad"] == 0
    assert row["train-000001"]["records"] == 4 * 3
    assert s["totals"]["bad_samples"] == 1 and s["totals"]["samples"] == 10
    assert s["totals"]["records"] == exp["records"] == 9 * 3
    assert s["totals"]["mean_topk_mass"] == pytest.approx(exp["mass"], rel=1e-9)
    assert s["totals"]["mean_entropy"] == pytest.approx(exp["entropy"], rel=1e-9)
    assert sum(e["count"] for e in s["totals"]["top1"]) == 27
    assert [b["key"] for b in s["bad"]] == ["b_broken"] and s["bad"][0]["shard"] == "train-000001"
    text = run("inspect", c).stdout
    assert "bad records (1)" in text and "b_broken" in text
    rec = run("inspect", c, "--shard", "train-000001", "--key", "b_broken")
    assert rec.exit_code == 0 and "bad image" in rec.stdout
    assert json.loads(run("inspect", c, "--shard", "train-000001", "--key", "b_broken", "--json").stdout)["bad"]


def test_bad_inputs_exit_2(cache, dataset, tmp_path):
    def fails(*args, needle):
        res = run(*args)
        assert res.exit_code == 2, (args, res.output)
        assert needle in res.stderr, (needle, res.stderr)
        assert "Traceback" not in res.output

    fails("inspect", tmp_path / "nowhere.zarr", needle="does not exist")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    fails("inspect", plain, needle="not a kdcache store")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=3).attrs["x"] = 1
    fails("inspect", tmp_path / "other.zarr", needle="no 'kdcache' manifest")
    fails("inspect", "memory://no-such-cache", needle="not a kdcache store")

    v99 = tmp_path / "v99.zarr"
    shutil.copytree(cache, v99)
    root = zarr.open_group(str(v99), mode="r+")
    man = dict(root.attrs["kdcache"])
    man["format_version"] = 99
    root.attrs["kdcache"] = man
    fails("inspect", v99, needle="format version 99")

    holes = tmp_path / "holes.zarr"
    shutil.copytree(cache, holes)
    shutil.rmtree(holes / "train-000000" / "logprobs")
    fails("inspect", holes, needle="lacks arrays ['logprobs']")

    fails("inspect", cache, "--shard", "train-000099", "--key", "x", needle="no shard 'train-000099'")
    fails("inspect", cache, "--shard", "train-000000", "--key", "nope", needle="no key 'nope'")
    fails("inspect", cache, "--shard", "train-000000", "--key", "train0_0000", "--view", "7", needle="view 7")
    fails("inspect", cache, "--shard", "train-000000", needle="--shard and --key")
    fails("inspect", cache, "--shard", "train-000000", "--key", "train0_0000", "--render", tmp_path / "x.png",
          needle="--render needs --data")
    fails("inspect", cache, "--shard", "train-000000", "--key", "train0_0000", "--render", tmp_path / "x.png",
          "--data", str(tmp_path / "none-*.tar"), needle="matched no shards")
    fails("inspect", cache, "--shard", "train-000000", "--key", "train0_0000", "--render", tmp_path / "x.png",
          "--data", str(tmp_path / "nothing.tar"), needle="nothing.tar does not exist")
    assert not (tmp_path / "x.png").exists()
