"""`train --views-used N`: one cache of V views replayed as if it held its first N."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import kdcache
from kdcache.cli import cli

STUDENT = "py:kdcache.models.zoo:tiny_cnn"


def test_the_loader_replays_view_e_mod_n(dataset, cache):
    loader = kdcache.ReplayLoader(str(dataset), str(cache), 7, device="cpu", views_used=2)
    assert loader.num_views == 2
    for epoch, want in ((0, 0), (1, 1), (2, 0), (3, 1)):
        assert loader.plan(epoch).view == want
        loader.set_epoch(epoch)
        assert all(torch.equal(b.views, torch.full((len(b),), want)) for b in loader)
    # the student's own crops (--student-view fresh) against the targets of view e mod N
    fresh = kdcache.ReplayLoader(str(dataset), str(cache), 7, device="cpu", views_used=2, student_view="fresh")
    assert fresh.plan(3).view == 1
    # all V: epoch 2 is view 2
    assert kdcache.ReplayLoader(str(dataset), str(cache), 7, device="cpu").plan(2).view == 2


def test_views_used_must_lie_within_the_cache(dataset, cache):
    with pytest.raises(kdcache.KdcacheError, match="holds 3 views per record; use 1..3"):
        kdcache.ReplayLoader(str(dataset), str(cache), 7, device="cpu", views_used=4)
    with pytest.raises(kdcache.KdcacheError, match="without a cache use views="):
        kdcache.ReplayLoader(str(dataset), None, 7, device="cpu", views_used=2)


def test_train_records_the_views_it_used(dataset, cache, tmp_path):
    args = ["train", "--data", str(dataset), "--cache", str(cache), "--student", STUDENT, "--epochs", "3",
            "--batch-size", "7", "--workers", "0", "--device", "cpu", "--no-progress"]
    res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "run"), "--views-used", "1"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert summary["views_used"] == 1 and summary["views"] == 1 and summary["views_reused"]
    assert config["views_used"] == 1 and config["resolved"]["cache_views"] == 3
    assert "views are reused from epoch 1 on" in res.output
    bad = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "bad"), "--views-used", "5"])
    assert bad.exit_code == 2 and "use 1..3" in bad.output
    none = CliRunner().invoke(cli, ["train", "--data", str(dataset), "--student", STUDENT, "--out",
                                    str(tmp_path / "none"), "--views-used", "2"])
    assert none.exit_code == 2 and "needs --cache" in none.output
