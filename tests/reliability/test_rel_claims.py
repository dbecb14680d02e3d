"""Fault: two precompute processes on the same output (two `--shard-index` jobs given the same
index, a job restarted while the old one still runs, two users).

Both wrote every group: one died mid-write (`Directory not empty`, `ContainsArrayError`) and once
a group was left marked complete with 7 of its 8 arrays missing. Now a group is claimed
atomically before it is written (``CacheWriter.claim``), ``write_shard`` needs the claim, checks
that every array's data is on disk before it marks the group complete, and never overwrites a
complete group. A claim whose holder died is taken over, so a re-run after a kill resumes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections import Counter

import numpy as np
import pytest
import zarr

from kdcache.errors import KdcacheError
from kdcache.cache.store import CLAIM_LEASE_S, CacheReader, CacheWriter, ShardClaimedError
from relhelpers import manifest, records, same, spawn

GROUPS = [f"g{i}" for i in range(8)]


def _race(out, mode, workers=4, groups=GROUPS):
    start = time.time() + 2.0  # every worker is up and waiting by then: they start together
    ps = [spawn("race", out, w, ",".join(groups), start, mode) for w in range(workers)]
    logs = []
    for w, p in enumerate(ps):
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0 and "Traceback" not in stderr, f"worker {w} failed:\n{stderr}"
        logs += [dict(json.loads(line), worker=w) for line in stdout.splitlines()]
    return logs


def _check_outcome(out, logs, groups=GROUPS):
    errors = [x for x in logs if x["outcome"] == "error"]
    assert not errors, errors
    wrote = [x for x in logs if x["outcome"] == "wrote"]
    counts = Counter(x["group"] for x in wrote)
    assert all(counts[g] == 1 for g in groups), f"groups not written exactly once: {counts}"
    r = CacheReader(str(out))
    for x in wrote:
        assert r.is_complete(x["group"])
        assert same(r.read_shard(x["group"]), records(x["n"], x["seed"])), x  # exactly what its writer wrote
    assert not (out / ".claims").exists() or not os.listdir(out / ".claims")


def test_racing_writers_with_claims_write_every_group_once(tmp_path):
    out = tmp_path / "cache.zarr"
    logs = _race(out, "claim")
    _check_outcome(out, logs)
    assert {x["outcome"] for x in logs} <= {"wrote", "skipped"}


def test_racing_writers_calling_write_shard_directly(tmp_path):
    """What precompute does today (is_complete, then write_shard without a claim): write_shard
    claims the group itself, so a collision ends in ShardClaimedError for the late writer, never
    in a half-written group or a crash inside zarr."""
    out = tmp_path / "cache.zarr"
    logs = _race(out, "direct")
    _check_outcome(out, logs)
    assert {x["outcome"] for x in logs} <= {"wrote", "skipped", "claimed"}
    for x in logs:
        if x["outcome"] == "claimed":
            assert "claimed by another writer" in x["msg"] or "already complete" in x["msg"], x


def test_racing_writers_take_over_stale_claims_once(tmp_path):
    """Stale claims (dead holders on this host, an expired lease from another host) for every
    group, then four writers race for them: still exactly one writer per group."""
    out = tmp_path / "cache.zarr"
    CacheWriter(str(out), manifest(GROUPS))
    claims = out / ".claims"
    claims.mkdir()
    dead = _dead_pid()
    for i, g in enumerate(GROUPS):
        if i % 2:
            _fake_claim(claims / g, host=socket.gethostname(), pid=dead)
        else:
            _fake_claim(claims / g, host="elsewhere.example", pid=1, age=CLAIM_LEASE_S + 60)
    logs = _race(out, "claim")
    _check_outcome(out, logs)


def _dead_pid() -> int:
    p = spawn("race", "/nonexistent", 0, "g0", 0, "claim")
    p.kill()
    p.communicate()
    return p.pid


def _pidns():
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _fake_claim(path, host, pid, age=0.0, token="t" * 32):
    info = {"host": host, "pid": pid, "pidns": _pidns(), "started": time.time() - age, "token": token}
    path.write_text(json.dumps(info))
    t = time.time() - age
    os.utime(path, (t, t))


def test_killed_holder_is_taken_over(tmp_path):
    """SIGKILL a process that holds claims (one group half written): the next run takes both
    claims over, rewrites the half-written group and finishes."""
    out = tmp_path / "cache.zarr"
    CacheWriter(str(out), manifest(["g0", "g1"]))
    p = spawn("hold", out, "g0,g1", "writing")
    assert p.stdout.readline().strip() == "writing"
    # while the holder lives, nobody else gets its groups
    w = CacheWriter(str(out), manifest(["g0", "g1"]))
    assert w.claim("g0") is None and w.claim("g1") is None
    with pytest.raises(ShardClaimedError, match="claimed by another writer"):
        w.write_shard("g1", source="/d/g1.tar", **records(3, 5))
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert not zarr.open_group(str(out / "g0"), mode="r").attrs["complete"]  # it died mid-write
    for g, seed in (("g0", 7), ("g1", 8)):
        c = w.claim(g)
        assert c is not None, g
        w.write_shard(g, source=f"/d/{g}.tar", claim=c, **records(4, seed))
    r = CacheReader(str(out))
    assert same(r.read_shard("g0"), records(4, 7)) and same(r.read_shard("g1"), records(4, 8))
    assert not (out / ".claims").exists()


def test_live_holder_on_this_host_keeps_its_claim(tmp_path):
    out = tmp_path / "cache.zarr"
    CacheWriter(str(out), manifest(["g0"]))
    p = spawn("hold", out, "g0", "claimed")
    try:
        assert p.stdout.readline().strip() == "claimed"
        held = json.loads((out / ".claims" / "g0").read_text())
        assert held["pid"] == p.pid and held["host"] == socket.gethostname() and len(held["token"]) >= 16
        # even with an old mtime: a live process on this host is never robbed
        os.utime(out / ".claims" / "g0", (time.time() - 10 * CLAIM_LEASE_S,) * 2)
        w = CacheWriter(str(out), manifest(["g0"]))
        assert w.claim("g0") is None
    finally:
        p.kill()
        p.communicate()
    assert w.claim("g0") is not None


def test_claim_of_another_host(tmp_path):
    out = tmp_path / "cache.zarr"
    w = CacheWriter(str(out), manifest(["g0"]))
    (out / ".claims").mkdir()
    _fake_claim(out / ".claims" / "g0", host="elsewhere.example", pid=os.getpid(), age=CLAIM_LEASE_S - 60)
    assert w.claim("g0") is None  # its holder refreshed it within the lease: alive
    _fake_claim(out / ".claims" / "g0", host="elsewhere.example", pid=os.getpid(), age=CLAIM_LEASE_S + 60)
    c = w.claim("g0")
    assert c is not None and json.loads((out / ".claims" / "g0").read_text())["token"] == c.token
    # the old holder comes back: its claim is gone, it must not write
    with pytest.raises(KdcacheError, match="no longer holds the claim"):
        w.write_shard("g0", source="/d/g0.tar", claim=_stolen(w, c), **records(3, 1))
    w.write_shard("g0", source="/d/g0.tar", claim=c, **records(3, 2))
    assert same(CacheReader(str(out)).read_shard("g0"), records(3, 2))


def _stolen(w, c):
    import dataclasses

    return dataclasses.replace(c, token="x" * 32)


def test_refresh_keeps_a_claim_alive_and_notices_loss(tmp_path):
    out = tmp_path / "cache.zarr"
    w = CacheWriter(str(out), manifest(["g0"]))
    c = w.claim("g0")
    path = out / ".claims" / "g0"
    os.utime(path, (time.time() - 300,) * 2)
    c.refresh()
    assert time.time() - path.stat().st_mtime < 5
    w.refresh_claims()  # every claim this writer holds
    path.unlink()  # taken over by someone who judged it stale
    with pytest.raises(KdcacheError, match="no longer holds the claim"):
        c.refresh()


def test_write_shard_never_overwrites_a_complete_group(tmp_path):
    out = tmp_path / "cache.zarr"
    w = CacheWriter(str(out), manifest(["g0", "g1"]))
    w.write_shard("g0", source="/d/g0.tar", claim=w.claim("g0"), **records(3, 1))
    assert w.is_complete("g0") and w.claim("g0") is None
    with pytest.raises(KdcacheError, match="'g0' .* is already complete"):
        w.write_shard("g0", source="/d/g0.tar", **records(3, 2))
    c1 = w.claim("g1")
    with pytest.raises(KdcacheError, match="claim is for group 'g1', not 'g0'"):
        w.write_shard("g0", source="/d/g0.tar", claim=c1, **records(3, 2))
    assert same(CacheReader(str(out)).read_shard("g0"), records(3, 1))
    c1.release()
    assert not (out / ".claims").exists()


def test_group_whose_data_vanishes_is_never_marked_complete(tmp_path, monkeypatch):
    """The failure that was seen: a racing writer removed the arrays of a group while its first
    writer was finishing it, and the group was marked complete with 7 of 8 arrays missing. Here
    the arrays vanish (another process's rmtree) after they were written."""
    import shutil

    out = tmp_path / "cache.zarr"
    w = CacheWriter(str(out), manifest(["g0"]))
    orig = zarr.Group.create_array

    def create_then_lose_others(self, name, **kw):
        arr = orig(self, name, **kw)
        if name == "mix_lam":
            for a in ("keys", "size", "logprobs", "classes", "box", "flip", "mix_with"):
                shutil.rmtree(out / "g0" / a)
        return arr

    monkeypatch.setattr(zarr.Group, "create_array", create_then_lose_others)
    with pytest.raises(KdcacheError, match=r"group 'g0' .*: array 'keys' .* missing after it was written"):
        w.write_shard("g0", source="/d/g0.tar", claim=w.claim("g0"), **records(3, 1))
    monkeypatch.undo()
    assert not zarr.open_group(str(out / "g0"), mode="r").attrs["complete"]
    assert not w.is_complete("g0")
    w.write_shard("g0", source="/d/g0.tar", claim=w.claim("g0"), **records(3, 1))  # a re-run redoes it
    assert same(CacheReader(str(out)).read_shard("g0"), records(3, 1))


def test_remote_cache_has_no_exclusive_claims_but_works(tmp_path):
    """fsspec caches (no O_EXCL): claim() returns a non-exclusive claim; one writer per group is
    the user's job there (--shard-index / torchrun ranks), as documented. Nothing crashes."""
    url = f"memory://kdcache-rel-claims-{os.getpid()}/cache.zarr"
    w = CacheWriter(url, manifest(["g0"]))
    c = w.claim("g0")
    assert c is not None and not c.exclusive
    c.refresh()
    w.write_shard("g0", source="/d/g0.tar", claim=c, **records(3, 4))
    assert w.is_complete("g0") and w.claim("g0") is None
    r = CacheReader(url)
    assert same(r.read_shard("g0"), records(3, 4))
    assert np.asarray(r.read_view("g0", 1).logprobs).shape == (3, 3)
