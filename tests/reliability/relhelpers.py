"""Helpers for the fault-injection tests: small manifests and records, and worker processes that
use CacheWriter directly (run as ``python relhelpers.py <role> ...``; they import kdcache.store
only, so they start in a fraction of a second)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
V, K, NUM_CLASSES = 2, 3, 10


def manifest(shards, **over):
    from kdcache.store import make_manifest

    base = dict(
        teacher={"spec": "x", "weights": None, "weights_sha256": None, "num_classes": NUM_CLASSES,
                 "mean": [0, 0, 0], "std": [1, 1, 1]},
        augmentation={"scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "flip": True, "mixup": False,
                      "name": "inception_crop", "version": 1},
        seed=0, views=V, topk=K, resolution=32, render={"pil": "Pillow", "pil_version": "x", "resample": "bilinear"},
        shards=list(shards), sources=[f"/d/{s}.tar" for s in shards],
        compute={"batch_size": 8, "device": "cpu", "precision": "fp32"},
    )
    base.update(over)
    return make_manifest(**base)


def records(n: int, seed: int) -> dict:
    """Records whose every value depends on ``seed``: a group's data says who wrote it."""
    rng = np.random.default_rng(seed)
    side = 50 + seed % 200
    return dict(
        keys=[f"s{seed}_k{i}" for i in range(n)], size=np.full((n, 2), side, np.int32),
        logprobs=-np.sort(rng.random((n, V, K)), -1) - seed % 7, classes=rng.integers(0, NUM_CLASSES, (n, V, K)),
        box=np.tile(np.array([0, 0, side, side]), (n, V, 1)), flip=rng.random((n, V)) < 0.5,
        mix_with=np.full((n, V), -1, np.int32), mix_lam=np.ones((n, V), np.float16),
    )


def same(stored: dict, rec: dict) -> bool:
    for a, want in rec.items():
        got = stored[a]
        if a == "keys":
            if got.tolist() != list(want):
                return False
        elif not np.array_equal(got, np.asarray(want).astype(got.dtype)):
            return False
    return True


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    return e


def spawn(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "relhelpers.py"), *map(str, args)], env=env(), cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# ---- worker roles ------------------------------------------------------------------------------


def _race(out: str, worker: int, groups: str, start_at: float, mode: str) -> None:
    """Wait for the common start time, then try to write every group: with claims (``claim``:
    the API precompute is to use) or by calling write_shard directly (``direct``: what precompute
    does today). One JSON line per group on stdout."""
    from kdcache import store
    from kdcache.errors import KdcacheError
    from kdcache.store import CacheWriter

    ShardClaimedError = getattr(store, "ShardClaimedError", ())  # noqa: N806 (absent before the claims)

    names = groups.split(",")
    while time.time() < start_at:
        time.sleep(0.001)
    w = CacheWriter(out, manifest(names))
    for gi, name in enumerate(names):
        seed = 1000 * worker + gi
        try:
            if mode == "claim":
                c = w.claim(name)
                if c is None:
                    print(json.dumps({"group": name, "outcome": "skipped"}), flush=True)
                    continue
                w.write_shard(name, source=f"/d/{name}.tar", claim=c, **records(5 + gi, seed))
            else:
                if w.is_complete(name):
                    print(json.dumps({"group": name, "outcome": "skipped"}), flush=True)
                    continue
                w.write_shard(name, source=f"/d/{name}.tar", **records(5 + gi, seed))
        except ShardClaimedError as e:
            print(json.dumps({"group": name, "outcome": "claimed", "msg": str(e)}), flush=True)
            continue
        except KdcacheError as e:  # any other refusal is a failure of the test
            print(json.dumps({"group": name, "outcome": "error", "msg": str(e)}), flush=True)
            continue
        print(json.dumps({"group": name, "outcome": "wrote", "seed": seed, "n": 5 + gi}), flush=True)


def _hold(out: str, names: str, phase: str) -> None:
    """Claim groups (``phase`` = claimed: then wait) or claim one and die in the middle of writing
    it (``phase`` = writing: the arrays are being written when the parent kills us)."""
    import zarr

    from kdcache.store import CacheWriter

    names_l = names.split(",")
    w = CacheWriter(out, manifest(names_l))
    claims = [w.claim(n) for n in names_l]
    assert all(c is not None for c in claims), claims
    if phase == "claimed":
        print("claimed", flush=True)
        time.sleep(600)
    created = []
    orig = zarr.Group.create_array

    def slow_create_array(self, name, **kw):
        arr = orig(self, name, **kw)
        created.append(name)
        if len(created) == 4:
            print("writing", flush=True)
            time.sleep(600)
        return arr

    zarr.Group.create_array = slow_create_array
    w.write_shard(names_l[0], source="/d/x.tar", claim=claims[0], **records(6, 99))


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "race":
        _race(sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]), sys.argv[6])
    elif role == "hold":
        _hold(sys.argv[2], sys.argv[3], sys.argv[4])
    elif role == "kill-on-publish":
        # Create a cache, dying (SIGKILL) at the moment the root zarr.json is being published:
        # after its bytes were written to a temporary file, before that file gets its final name.
        from kdcache.store import CacheWriter

        out = os.path.abspath(sys.argv[2])
        target = os.path.join(out, "zarr.json")

        def die_if_root(dst):
            if os.path.abspath(str(dst)) == target:
                os.kill(os.getpid(), signal.SIGKILL)

        real_replace, real_link, real_rename = os.replace, os.link, os.rename
        import pathlib

        real_path_replace = pathlib.Path.replace
        os.replace = lambda s, d, **kw: (die_if_root(d), real_replace(s, d, **kw))[1]
        os.rename = lambda s, d, **kw: (die_if_root(d), real_rename(s, d, **kw))[1]
        os.link = lambda s, d, **kw: (die_if_root(d), real_link(s, d, **kw))[1]
        pathlib.Path.replace = lambda self, d: (die_if_root(d), real_path_replace(self, d))[1]
        CacheWriter(out, manifest(["s0"]))
        print("not killed", flush=True)
    else:
        raise SystemExit(f"unknown role {role}")
