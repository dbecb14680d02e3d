"""Helpers for the fault-injection tests.

- small manifests and records, and worker processes that use CacheWriter directly (run as
  ``python relhelpers.py <role> ...``; the ``race``/``hold`` roles import kdcache.cache.store only, so
  they start in a fraction of a second);
- real command-line runs: ``run_cmd`` (SIGKILL of the process group at a chosen moment,
  RLIMIT_FSIZE, hang detection), ``cli_inproc`` (the command line in this process);
- ``cache_diff``/``assert_no_loss``: two caches compared record by record, bit for bit;
- roles that run the kdcache command line with one function instrumented: ``logged-cli``
  (records every write_shard), ``kill-on-replace``, ``kill-on-release`` and ``kill-at-writer``
  (SIGKILL at that call);
- ``tally``: the suite's totals (docs/reliability.md), summed with ``python relhelpers.py tally FILE``.
"""

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
    from kdcache.cache.store import make_manifest

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


def spawn(*args, env_: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "relhelpers.py"), *map(str, args)], env=env_ or env(),
                            cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(p: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    """``p.communicate`` that kills the process (and fails) when it runs past ``timeout``."""
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        raise Hung(f"process {p.args[2:4]} still running after {timeout} s:\n{err[-3000:]}") from None


# ---- worker roles ------------------------------------------------------------------------------


def _race(out: str, worker: int, groups: str, start_at: float, mode: str) -> None:
    """Wait for the common start time, then try to write every group: with claims (``claim``:
    the API precompute is to use) or by calling write_shard directly (``direct``: what precompute
    does today). One JSON line per group on stdout."""
    from kdcache.cache import store
    from kdcache.errors import KdcacheError
    from kdcache.cache.store import CacheWriter

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

    from kdcache.cache.store import CacheWriter

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



# ---- real command-line runs: start, kill, compare ------------------------------------------------

TESTS = REPO / "tests"
NC = 5  # classes of the tiny teachers and students below (tests/conftest.py's datasets)


def cli_env(delay: float = 0.0) -> dict:
    """Environment of a `python -m kdcache` subprocess: tests/ on the path (for py:testmodels:slow_cnn,
    whose forward pass sleeps KD_TEST_DELAY seconds: slow enough to be killed mid-run, same outputs)."""
    e = env()
    e["PYTHONPATH"] = os.pathsep.join([str(TESTS), e["PYTHONPATH"]])
    e["KD_TEST_DELAY"] = str(delay)
    e.setdefault("TRITON_INTERPRET", "1")
    return e


def precompute_cmd(data, out, weights, *extra, workers: int = 0, teacher: str = "py:testmodels:slow_cnn") -> list[str]:
    """`kdcache precompute` with the suite's small settings (V=2, k=3, 32 px, mixup)."""
    return [sys.executable, "-m", "kdcache", "precompute", "--data", str(data), "--teacher", teacher,
            "--teacher-weights", str(weights), "--num-classes", str(NC), "--out", str(out), "-V", "2", "-k", "3",
            "--seed", "5", "--res", "32", "--mixup", "-b", "8", "--workers", str(workers), "--device", "cpu",
            "--no-progress", *map(str, extra)]


def train_cmd(data, cache, out, *extra, workers: int = 0, student: str = "py:testmodels:slow_cnn") -> list[str]:
    """`kdcache train` (cached KD) with the suite's small settings; every step logged."""
    return [sys.executable, "-m", "kdcache", "train", "--data", str(data), "--cache", str(cache), "--student", student,
            "--out", str(out), "--epochs", "2", "-b", "4", "--lr", "0.01", "--weight-decay", "0", "--label-weight",
            "0.3", "--workers", str(workers), "--device", "cpu", "--no-progress", "--log-every", "1",
            *map(str, extra)]


class Hung(AssertionError):
    pass


def run_cmd(cmd, env_=None, kill_after: float | None = None, timeout: float = 120, fsize: int | None = None,
            kill_when=None, shm_left: list | None = None):
    """Run a command in its own session. ``kill_after``: SIGKILL its whole process group (the main
    process and any data workers, as a job scheduler or the OOM killer would) that many seconds
    after it started, or after ``kill_when(pid)`` first returned true (the command is at work:
    so that the moment does not depend on how long imports take on a loaded machine), unless it
    ended first. ``fsize``: RLIMIT_FSIZE for it. Raises ``Hung`` past ``timeout``. ``shm_left``:
    a list that receives the names of the empty /dev/shm files the run's data workers left (they
    are removed; see ``remove_dead_shm``).
    Returns ``(returncode, stdout, stderr, killed)``; a killed run's returncode is -9."""
    import threading

    argv = list(map(str, cmd))
    if fsize is not None:  # set the limit in the child, then exec the command (no preexec_fn: threads)
        argv = [sys.executable, "-c", "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
                f"({fsize}, {fsize})); os.execv(sys.argv[1], sys.argv[1:])", *argv]
    shm = shm_files() if shm_left is not None else set()
    # pipes, not files: a file-size limit also applies to a file that stdout/stderr go to
    p = subprocess.Popen(argv, env=env_ or cli_env(), cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    chunks: dict[str, list[str]] = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda f, k: chunks[k].extend(iter(f.readline, "")), args=(f, k), daemon=True)
               for f, k in ((p.stdout, "out"), (p.stderr, "err"))]
    for t in readers:
        t.start()
    t0 = time.monotonic()
    deadline = t0 + timeout
    kill_at = t0 + kill_after if kill_after is not None and kill_when is None else None
    killed = False
    try:
        while p.poll() is None:
            now = time.monotonic()
            if kill_at is None and kill_when is not None and kill_after is not None and kill_when(p.pid):
                kill_at = now + kill_after
            if kill_at is not None and now >= kill_at:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                killed = True
                break
            if now >= deadline:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                for t in readers:
                    t.join(5)
                what = " ".join(map(str, cmd[2:5]))
                raise Hung(f"{what}... still running after {timeout} s:\n{''.join(chunks['err'])[-3000:]}")
            time.sleep(0.01)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        else:
            try:  # data workers left behind by a main process that ended (they would hold the pipes)
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for t in readers:
            t.join(30)
        p.stdout.close()
        p.stderr.close()
    out, err = "".join(chunks["out"]), "".join(chunks["err"])
    if shm_left is not None:
        shm_left.extend(remove_dead_shm(shm, p.pid))
    # a process that finished on its own just before the kill counts as not killed
    return p.returncode, out, err, killed and p.returncode == -signal.SIGKILL


def holds_a_claim(out):
    """For ``run_cmd(kill_when=...)``: precompute process ``pid`` has claimed a group of ``out``
    (it claims every unfinished group before it runs the teacher)."""
    def check(pid):
        d = Path(out) / ".claims"
        try:
            for f in d.iterdir():
                try:
                    if json.loads(f.read_text()).get("pid") == pid:
                        return True
                except (ValueError, OSError):
                    pass
        except OSError:
            pass
        return False
    return check


def started_training(out):
    """For ``run_cmd(kill_when=...)``: this train run has written its config.json (it does so
    once setup is done, just before the first step)."""
    t0 = time.time()

    def check(pid):
        try:
            return os.stat(Path(out) / "config.json").st_mtime >= t0
        except OSError:
            return False
    return check


def shm_files() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def remove_dead_shm(before: set[str], main_pid: int) -> list[str]:
    """Remove the empty torch_<pid>_* files in /dev/shm that appeared since ``before``, made by a
    data worker of the run whose main process was ``main_pid`` (forked just after it: a pid a
    little above it) and now gone: what a worker leaves when it cannot size a shared-memory
    segment (torch does not unlink it). Returns their names."""
    gone = []
    for f in sorted(shm_files() - before):
        parts = f.split("_")
        if (len(parts) >= 3 and parts[0] == "torch" and parts[1].isdigit()
                and main_pid < int(parts[1]) < main_pid + 200 and not os.path.exists(f"/proc/{parts[1]}")):
            p = os.path.join("/dev/shm", f)
            try:
                if os.path.getsize(p) == 0:
                    os.remove(p)
                    gone.append(f)
            except OSError:
                pass
    return gone


def error_line(stderr: str) -> str:
    """The `error: ...` line of a failed command; fails the test on a traceback or without one."""
    assert "Traceback" not in stderr, stderr[-4000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, stderr[-4000:]
    return lines[0]


def summary_of(stdout: str) -> dict:
    """The JSON summary a successful precompute prints last on stdout."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    assert lines, stdout
    return json.loads(lines[-1])


def _rows(a: np.ndarray, n: int) -> np.ndarray:
    """Each record's bytes, one row per record (bitwise comparison; -inf == -inf, NaN == NaN)."""
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).reshape(n, -1) if n else np.zeros((0, 0), np.uint8)


def cache_diff(ref, got) -> dict:
    """Compare cache ``got`` with the reference ``ref`` group by group, array by array, record by
    record. Returns ``records`` (in the reference), ``lost`` (records of a group that is missing,
    incomplete or unreadable in ``got``, or rows it lacks), ``misaligned`` (records present whose
    key, any array row or bad-record status differs, bitwise), ``extra`` (records ``got`` holds
    beyond the reference), the groups concerned and whether the manifests agree."""
    from kdcache.errors import KdcacheError
    from kdcache.cache.store import ARRAYS, CacheReader

    ra = CacheReader(str(ref))
    try:
        rb = CacheReader(str(got))
    except KdcacheError:
        rb = None
    out = {"records": 0, "lost": 0, "misaligned": 0, "extra": 0, "groups_lost": [], "groups_misaligned": [],
           "manifest_equal": rb is not None and _manifest_core(ra.manifest) == _manifest_core(rb.manifest)}
    for name in ra.shard_names():
        da = ra.read_shard(name)
        n = len(da["keys"])
        out["records"] += n
        try:
            if rb is None or not rb.is_complete(name):
                raise KdcacheError("missing or incomplete")
            db = rb.read_shard(name)
            bad_b = rb.shard_attrs(name).get("bad", {})
        except KdcacheError:
            out["lost"] += n
            out["groups_lost"].append(name)
            continue
        m = len(db["keys"])
        common = min(n, m)
        out["lost"] += n - common
        out["extra"] += max(0, m - n)
        differ = np.zeros(common, dtype=bool)
        differ |= np.asarray(da["keys"][:common]) != np.asarray(db["keys"][:common])
        for a in ARRAYS:
            if a == "keys":
                continue
            if da[a].dtype != db[a].dtype or da[a].shape[1:] != db[a].shape[1:]:
                differ[:] = True
                continue
            differ |= (_rows(da[a][:common], common) != _rows(db[a][:common], common)).any(axis=1) if common else differ
        bad_a = ra.shard_attrs(name).get("bad", {})
        for i, k in enumerate(da["keys"][:common]):
            if bad_a.get(str(k)) != bad_b.get(str(k)):
                differ[i] = True
        if differ.any() or n != m:
            out["groups_misaligned"].append(name)
        out["misaligned"] += int(differ.sum())
    return out


def _manifest_core(m: dict) -> dict:
    """The manifest fields that must agree between two runs of the same command."""
    return {k: v for k, v in m.items() if k not in ("kdcache_version", "render")}


def assert_no_loss(ref, got) -> dict:
    """Zero records lost or misaligned (and tallied as such)."""
    d = cache_diff(ref, got)
    tally(records_compared=d["records"], records_lost=d["lost"] + d["misaligned"])
    assert d["manifest_equal"], "manifests differ"
    assert (d["lost"], d["misaligned"], d["extra"]) == (0, 0, 0), d
    return d


def complete_groups(out) -> dict[str, bool]:
    """Each shard group of a local cache and its complete flag, read from the JSON (cheap to poll)."""
    res = {}
    out = Path(out)
    if not out.is_dir():
        return res
    for d in out.iterdir():
        meta = d / "zarr.json"
        if d.is_dir() and meta.is_file():
            try:
                res[d.name] = bool(json.loads(meta.read_text())["attributes"].get("complete", False))
            except (ValueError, KeyError):
                res[d.name] = False
    return res


def leftovers(out) -> list[str]:
    """What a finished cache should not hold: claims, zarr's half-written `.partial` files, temp files."""
    found = []
    for dp, dirs, files in os.walk(out):
        for f in files + dirs:
            if f == ".claims" or f.endswith((".partial", ".tmp")) or ".tmp" in f:
                found.append(os.path.relpath(os.path.join(dp, f), out))
    return sorted(found)


def tally(**counts) -> None:
    """Add to the suite's totals (docs/reliability.md) when KDCACHE_REL_TALLY names a file:
    faults (injected), bad_inputs (tried), records_compared, records_lost."""
    path = os.environ.get("KDCACHE_REL_TALLY")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(counts) + "\n")


def _sum_tally(path: str) -> dict:
    total: dict = {}
    with open(path) as f:
        for line in f:
            for k, v in json.loads(line).items():
                total[k] = total.get(k, 0) + v
    return total


# ---- the command line in this process (click's CliRunner): no start-up cost -------------------------

TINY = "py:kdcache.models.zoo:tiny_cnn"


def cli_inproc(*args):
    """Run the kdcache command line in this process; (exit code, output). An exception that is
    not a clean exit is what the real command would print as a traceback: it fails the test."""
    from click.testing import CliRunner

    from kdcache.cli import cli as app

    res = CliRunner().invoke(app, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        import traceback

        raise AssertionError("traceback:\n" + "".join(traceback.format_exception(res.exception)) + res.output)
    return res.exit_code, res.output


def precompute_args(data, out, weights, *extra):
    return ["precompute", "--data", data, "--teacher", TINY, "--teacher-weights", weights, "--num-classes", NC,
            "--out", out, "-V", 2, "-k", 3, "--seed", 5, "--res", 32, "--mixup", "-b", 8, "--workers", 0, "--device",
            "cpu", "--no-progress", *extra]


def train_args(data, cache, out, *extra):
    return ["train", "--data", data, "--cache", cache, "--student", "py:kdcache.models.zoo:tiny_cnn", "--out", out,
            "--epochs", 2, "-b", 4, "--lr", 0.01, "--workers", 0, "--device", "cpu", "--no-progress", *extra]


def _logged_cli(log: str, argv: list[str]) -> None:
    """Run the kdcache command line with every CacheWriter.write_shard call recorded in ``log``
    (one JSON line per event, appended: {"pid", "group", "event": start|done|error}). write_shard
    is the only code that writes a shard group's arrays (docs/format.md, completion protocol), so
    the "done" lines count the writes of each group. Nothing else is changed."""
    from kdcache.cache import store
    from kdcache.cli import main

    orig = store.CacheWriter.write_shard

    def note(name, event):
        with open(log, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "group": name, "event": event, "t": time.time()}) + "\n")

    def write_shard(self, name, **kw):
        note(name, "start")
        try:
            orig(self, name, **kw)
        except BaseException:
            note(name, "error")
            raise
        note(name, "done")

    store.CacheWriter.write_shard = write_shard
    sys.argv = ["kdcache", *argv]
    main()


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "race":
        _race(sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]), sys.argv[6])
    elif role == "hold":
        _hold(sys.argv[2], sys.argv[3], sys.argv[4])
    elif role == "kill-on-publish":
        # Create a cache, dying (SIGKILL) at the moment the root zarr.json is being published:
        # after its bytes were written to a temporary file, before that file gets its final name.
        from kdcache.cache.store import CacheWriter

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
    elif role == "logged-cli":
        _logged_cli(sys.argv[2], sys.argv[3:])
    elif role == "kill-on-replace":
        # Run the kdcache command line; SIGKILL ourselves at the moment the Nth file named
        # argv[2] is renamed into place (its temporary file written in full, the old one still there).
        target, nth, seen = sys.argv[2], int(sys.argv[3]), [0]
        real_replace = os.replace

        def replace(src, dst, **kw):
            if os.path.basename(str(dst)) == target:
                seen[0] += 1
                if seen[0] == nth:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, **kw)

        os.replace = replace
        from kdcache.cli import main

        sys.argv = ["kdcache", *sys.argv[4:]]
        main()
    elif role == "kill-on-release":
        # Run the kdcache command line; SIGKILL ourselves when the first claim is released: right
        # after write_shard marked its group complete, before the claim file is removed.
        from kdcache.cache import claims

        def release(self):
            os.kill(os.getpid(), signal.SIGKILL)

        claims.ShardClaim.release = release
        from kdcache.cli import main

        sys.argv = ["kdcache", *sys.argv[2:]]
        main()
    elif role == "kill-at-writer":
        # Run the kdcache command line; SIGKILL ourselves when CacheWriter.<argv[2]> is first called
        # ("before") or has first returned ("after"): e.g. _write_arrays after (a group's arrays
        # rewritten, not yet complete), finish_growth before (every group grown, the manifest not).
        from kdcache.cache.store import CacheWriter

        method, when = sys.argv[2], sys.argv[3]
        real = getattr(CacheWriter, method)

        def killing(self, *a, **kw):
            if when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            out = real(self, *a, **kw)
            os.kill(os.getpid(), signal.SIGKILL)
            return out

        setattr(CacheWriter, method, killing)
        from kdcache.cli import main

        sys.argv = ["kdcache", *sys.argv[4:]]
        main()
    elif role == "tally":
        print(json.dumps(_sum_tally(sys.argv[2]), indent=2))
    else:
        raise SystemExit(f"unknown role {role}")
