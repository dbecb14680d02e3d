"""Faults while `kdcache precompute` grows a cache's views (docs/cli.md, "Growing a cache").

A cache made at V = 2 is grown to V = 4 by the real command line in a real process, which is
SIGKILLed (the whole process group) at a seeded random moment, or at a precise one: right after a
group's arrays were rewritten (the group not yet complete), or after every group was grown and
before the manifest says so. The same command is then re-run until it exits 0, and the cache must
equal the one made at V = 4 in one go: record by record through ``CacheReader``
(``relhelpers.cache_diff``) and array by array, attribute by attribute as stored
(``conftest.stored``; in the compact layout the class codes are re-encoded, and must still come
out as the one-go run's).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from conftest import precompute_config, stored, write_dataset
from relhelpers import (NC, assert_no_loss, cli_env, complete_groups, error_line, finish, holds_a_claim, leftovers,
                        precompute_cmd, run_cmd, spawn, summary_of, tally)

SHARDS = 4
DELAY = 0.25  # seconds the slow teacher sleeps per batch: a growing run takes a few seconds


def _make(train, out, weights, views: int, compact: bool) -> dict:
    from kdcache.tools.precompute import precompute

    cfg = precompute_config(train, out, weights, teacher="py:testmodels:slow_cnn", views=views, topk=3, seed=5,
                            res=32, mixup=True, batch_size=8, compact=compact)
    return precompute(cfg)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 shards x 4 images, a tiny teacher's weights, and per layout the cache at V = 2 (to grow) and
    the one made at V = 4 in one go (in-process; the teacher's sleep does not change its outputs)."""
    from kdcache.models.zoo import tiny_cnn

    root = tmp_path_factory.mktemp("grow_runs")
    write_dataset(root / "train", shards=SHARDS, per_shard=4, seed=6)
    torch.manual_seed(2)
    torch.save(tiny_cnn(NC).state_dict(), root / "teacher.pt")
    for layout, compact in (("plain", False), ("compact", True)):
        for v in (2, 4):
            assert _make(root / "train", root / f"{layout}-{v}.zarr", root / "teacher.pt", v, compact)[
                "shards_written"] == SHARDS
    return root


def _grow_cmd(data, out, layout: str, workers: int = 0) -> list[str]:
    extra = ("-V", 4) + (("--compact",) if layout == "compact" else ())
    return precompute_cmd(data / "train", out, data / "teacher.pt", *extra, workers=workers)


def _views_of_groups(out) -> dict[str, int]:
    import json

    return {d.name: json.loads((d / "zarr.json").read_text())["attributes"].get("views", 0)
            for d in sorted(out.iterdir()) if d.is_dir() and (d / "zarr.json").is_file() and not d.name.startswith(".")}


def _finish(data, out, layout: str) -> None:
    """Re-run the growing command until it exits 0 (at most twice), then compare with the one-go cache."""
    for _ in range(2):
        rc, so, se, _ = run_cmd(_grow_cmd(data, out, layout), cli_env(0))
        if rc == 0:
            break
    assert rc == 0 and "Traceback" not in se, se[-3000:]
    assert summary_of(so)["growth_finished"] or "growing" not in stored(out)["manifest"]
    assert leftovers(out) == [], leftovers(out)
    assert_no_loss(data / f"{layout}-4.zarr", out)
    assert stored(out) == stored(data / f"{layout}-4.zarr")


def _killed_at(data, tmp_path, layout: str, method: str, when: str):
    """A copy of the layout's V = 2 cache, grown by a process SIGKILLed at CacheWriter.<method>."""
    out = tmp_path / "c.zarr"
    shutil.copytree(data / f"{layout}-2.zarr", out)
    p = spawn("kill-at-writer", method, when, *_grow_cmd(data, out, layout)[3:], env_=cli_env(0))
    finish(p)
    assert p.returncode == -9
    tally(faults=1, kills_precompute=1)
    return out


def _kill_growth_and_finish(data, out, seed: int, workers: int) -> bool:
    """Grow a copy of the V = 2 cache, SIGKILLed a seeded random delay after it holds a claim, then
    finish it and compare with the one-go cache. Returns whether the kill landed."""
    shutil.copytree(data / "plain-2.zarr", out)
    rng = np.random.default_rng(seed)
    rc, _, se, killed = run_cmd(_grow_cmd(data, out, "plain", workers), cli_env(DELAY),
                                kill_after=float(rng.uniform(0.0, 1.5)), kill_when=holds_a_claim(out))
    assert killed or rc == 0, se[-3000:]
    tally(faults=int(killed), kills_precompute=int(killed))
    grown = _views_of_groups(out)
    assert set(grown.values()) <= {0, 2, 4}, grown  # 0: a group being rewritten (incomplete)
    _finish(data, out, "plain")
    return killed


@pytest.mark.parametrize("seed,workers", [(0, 0), (1, 2)])
def test_growth_killed_at_a_random_moment_resumes_to_the_one_go_cache(data, tmp_path, seed, workers):
    # the seeds are chosen so that the kill hits the running growth
    assert _kill_growth_and_finish(data, tmp_path / "c.zarr", seed, workers)


@pytest.mark.slow
def test_growth_killed_at_random_moments_many_seeds(data, tmp_path):
    """KDCACHE_REL_KILL_SEEDS seeds (default 10), every third with --workers 2."""
    n = int(os.environ.get("KDCACHE_REL_KILL_SEEDS", "10"))
    problems = []
    for seed in range(2, 2 + n):
        try:
            _kill_growth_and_finish(data, tmp_path / f"c{seed}.zarr", seed, 2 if seed % 3 == 0 else 0)
        except AssertionError as e:
            problems.append(f"seed {seed}: {e}")
    assert not problems, "\n".join(problems)


def test_growth_killed_after_a_group_was_rewritten_and_before_it_was_complete(data, tmp_path):
    """Compact layout: the first group's arrays are rewritten with 4 views (its old views gone from
    disk) and the process dies before marking it complete. The group is incomplete, so readers and
    the re-run never take it for data: the re-run redoes it from scratch at 4 views (view v does not
    depend on V), grows the others, and the cache equals the one-go cache."""
    # on these shards some groups code their classes directly at 2 views and with lists at 4, so the
    # growth changes their coding too (class_coding.py) while their first views keep their digests
    codings = [{n: g["attrs"]["class_coding"] for n, g in stored(data / f"compact-{v}.zarr").items() if n != "manifest"}
               for v in (2, 4)]
    assert codings[0] != codings[1], codings
    out = _killed_at(data, tmp_path, "compact", "_write_arrays", "after")
    state = complete_groups(out)
    assert sorted(state.values()) == [False] + [True] * (SHARDS - 1), state
    _finish(data, out, "compact")


def test_growth_killed_after_a_complete_group_was_marked_incomplete(data, tmp_path):
    """Replacing a group deletes its files one by one, so a group being grown is first marked
    incomplete (one atomic metadata write). Killed right after that mark: the group says incomplete
    with all its old files still there (the moment a random kill found as "complete, lacks arrays"
    before the mark existed); the re-run redoes it and the cache equals the one-go cache."""
    out = _killed_at(data, tmp_path, "plain", "_uncomplete", "after")
    state = complete_groups(out)
    assert sorted(state.values()) == [False] + [True] * (SHARDS - 1), state
    assert set(_views_of_groups(out).values()) == {2}  # nothing rewritten yet
    _finish(data, out, "plain")


def test_growth_killed_before_the_manifest_says_it_is_finished(data, tmp_path):
    """Every group grown, the process killed before the manifest's `growing` is removed: readers
    refuse the cache (one line, naming the command to finish), the same command computes nothing
    and ends the growth."""
    from kdcache.cache.store import CacheReader
    from kdcache.errors import KdcacheError

    out = _killed_at(data, tmp_path, "plain", "finish_growth", "before")
    assert set(_views_of_groups(out).values()) == {4}
    with pytest.raises(KdcacheError, match="is being grown from 2 to 4 views"):
        CacheReader(str(out))
    rc, so, se, _ = run_cmd(_grow_cmd(data, out, "plain"), cli_env(0))
    assert rc == 0, se[-3000:]
    s = summary_of(so)
    assert (s["shards_written"], s["shards_skipped"], s["growth_finished"]) == (0, SHARDS, True), s
    _finish(data, out, "plain")


def test_shrinking_is_refused_with_one_line(data, tmp_path):
    out = tmp_path / "c.zarr"
    shutil.copytree(data / "plain-4.zarr", out)
    before = stored(out)
    rc, _, se, _ = run_cmd(precompute_cmd(data / "train", out, data / "teacher.pt"), cli_env(0))  # -V 2
    tally(bad_inputs=1)
    assert rc == 2 and "Traceback" not in se, se
    assert "holds 4 views per image and this run asks for 2" in error_line(se) and str(out) in error_line(se)
    assert stored(out) == before
