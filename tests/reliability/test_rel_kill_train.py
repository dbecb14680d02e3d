"""Faults in a running `kdcache train`: SIGKILL at seeded random moments (then `--resume` until it
is done), a kill before the first checkpoint (then the same command again, without --resume), a
kill at the instant checkpoint.pt is published, and a file-size limit that makes the checkpoint
write fail.

On the CPU a resumed run must equal an uninterrupted one bit for bit (DESIGN §5): the final
model.pt is compared tensor by tensor with an uninterrupted run of the same command line, and
metrics.jsonl must hold every step exactly once (with the losses of the uninterrupted run).
Real processes, real files. The runs start together when the first test asks for them (``runs``),
two at a time, while the uninterrupted reference runs in this process through the same command line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import precompute_config, write_dataset
from relhelpers import (HERE, NC, REPO, cli_env, cli_inproc, error_line, run_cmd, started_training, tally,
                        train_cmd)

STEPS = 8  # 4 shards x 4 records, batch 4, 2 epochs
DELAY = 0.3  # seconds the slow student sleeps per forward pass in the runs that get killed
FSIZE = 12_000  # bytes: config.json and metrics.jsonl fit, checkpoint.pt (~25 KB) does not


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Shards and a cache of them (the cache is not under test here)."""
    from kdcache.tools.precompute import precompute
    from kdcache.models.zoo import tiny_cnn

    root = tmp_path_factory.mktemp("killtrain")
    write_dataset(root / "train", shards=4, per_shard=4, seed=11)
    torch.manual_seed(1)
    torch.save(tiny_cnn(NC).state_dict(), root / "teacher.pt")
    precompute(precompute_config(root / "train", root / "cache.zarr", root / "teacher.pt", views=2, topk=3, seed=5,
                                 res=32, mixup=True, batch_size=8))
    return root


def _cmd(setup, out, *extra, workers=0):
    return train_cmd(setup / "train", setup / "cache.zarr", out, "--checkpoint-every", "2", *extra, workers=workers)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _ckpt_step(out):
    p = out / "checkpoint.pt"
    return _weights(p)["global_step"] if p.exists() else None


# ---- the scenarios ---------------------------------------------------------------------------------


def _killed_and_resumed(setup, out, seed, kills):
    """SIGKILL the run a delay drawn from ``seed`` after it started training (``kills`` times, the
    --resume re-runs killed again at their own random moments), then --resume until it exits 0."""
    rng = np.random.default_rng(seed)
    history = []
    for attempt in range(kills + 2):
        delay = float(rng.uniform(0.0, 3.0)) if attempt < kills else None  # 8 steps take ~3 s
        rc, so, se, killed = run_cmd(_cmd(setup, out, *(("--resume",) if attempt else ())), cli_env(DELAY),
                                     kill_after=delay, kill_when=started_training(out))
        history.append({"delay": delay, "killed": killed, "rc": rc, "ckpt_step": _ckpt_step(out),
                        "steps_logged": _steps_logged(out)})
        if not killed:
            assert rc == 0 and "Traceback" not in se, se[-3000:]
            break
    else:
        raise AssertionError(f"train did not finish in {kills + 2} runs: {history}")
    n = sum(h["killed"] for h in history)
    tally(faults=n, kills_train=n, kills_mid_run=sum(h["killed"] and 0 < h["steps_logged"] < STEPS for h in history))
    return history


def _steps_logged(out):
    p = out / "metrics.jsonl"
    return sum('"loss"' in line for line in p.read_text().splitlines()) if p.exists() else 0


def _killed_before_first_checkpoint(setup, out):
    """Kill once step 1 is logged and before checkpoint.pt exists (the first is due at step 2;
    a step takes 0.6 s here), then run the same command again, without --resume."""
    p = subprocess.Popen(_cmd(setup, out), env=cli_env(0.6), cwd=str(REPO), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
    try:
        while time.monotonic() < deadline and p.poll() is None:
            if metrics.exists() and '"step": 1,' in metrics.read_text():
                os.killpg(p.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    state = {"rc": p.returncode, "ckpt": (out / "checkpoint.pt").exists(), "metrics": metrics.read_text()}
    tally(faults=1, kills_train=1)
    state["rerun"] = run_cmd(_cmd(setup, out), cli_env(0))
    return state


def _killed_publishing_checkpoint(setup, out, nth):
    argv = _cmd(setup, out)[3:]
    p = subprocess.run([sys.executable, str(HERE / "relhelpers.py"), "kill-on-replace", "checkpoint.pt", str(nth),
                        *argv],
                       env=cli_env(0), cwd=str(REPO), capture_output=True, text=True, timeout=120)
    state = {"rc": p.returncode, "stderr": p.stderr, "files": sorted(os.listdir(out)), "ckpt_step": _ckpt_step(out)}
    tally(faults=1, kills_train=1)
    state["resume"] = run_cmd(_cmd(setup, out, "--resume"), cli_env(0))
    return state


def _under_fsize(setup, out, workers):
    extra = ("--worker-timeout", "20") if workers else ()
    shm_left: list[str] = []
    rc, so, se, _ = run_cmd(_cmd(setup, out, *extra, workers=workers), cli_env(0), fsize=FSIZE, timeout=120,
                            shm_left=shm_left)
    state = {"rc": rc, "stderr": se, "files": sorted(os.listdir(out)) if out.exists() else [], "shm_left": shm_left}
    tally(faults=1)
    state["resume"] = run_cmd(_cmd(setup, out, "--resume", *extra, workers=workers), cli_env(0))
    return state


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted run: the same command line, in this process."""
    ref = tmp_path_factory.mktemp("trainref") / "reference"
    code, output = cli_inproc(*_cmd(setup, ref)[3:])
    assert code == 0, output
    return ref


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("trainruns")
    pool = ThreadPoolExecutor(2)
    futs = {
        "random": pool.submit(_killed_and_resumed, setup, tmp / "random", 0, 1),
        "early": pool.submit(_killed_before_first_checkpoint, setup, tmp / "early"),
        "publish": pool.submit(_killed_publishing_checkpoint, setup, tmp / "publish", 2),
        "fsize": pool.submit(_under_fsize, setup, tmp / "fsize", 0),
    }
    ref = request.getfixturevalue("reference")  # meanwhile, in this process
    yield tmp, ref, futs
    pool.shutdown(wait=True)


def assert_same_student(ref, out):
    """model.pt equal bit for bit, metrics.jsonl with every step once (and the same losses),
    nothing half written left."""
    a, b = _weights(ref / "model.pt"), _weights(out / "model.pt")
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k].dtype != b[k].dtype or a[k].numpy().tobytes() != b[k].numpy().tobytes()]
    assert differ == [], f"model.pt differs from the uninterrupted run in {differ}"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "loss" in x]
    assert steps == list(range(1, STEPS + 1)), steps  # every step, once, in order
    assert [x["step"] for x in lines if x.get("epoch_end")] == [STEPS // 2, STEPS]
    ref_lines = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in lines if "loss" in x] == [x["loss"] for x in ref_lines if "loss" in x]
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS
    assert [f for f in os.listdir(out) if ".tmp" in f] == []
    tally(train_steps_compared=STEPS)


# ---- the tests -------------------------------------------------------------------------------------


def test_train_killed_at_a_random_moment_resumes_bitwise(runs):
    """Seed 0: SIGKILL at a random moment, then --resume until done: model.pt equals the
    uninterrupted run's bit for bit, and metrics.jsonl holds every step once."""
    tmp, ref, futs = runs
    history = futs["random"].result()
    assert history[0]["killed"], history
    assert_same_student(ref, tmp / "random")


def test_train_killed_before_its_first_checkpoint_starts_afresh(runs):
    """Killed after step 1 was logged, before the first checkpoint: the same command (without
    --resume) starts afresh: no step twice in metrics.jsonl, no *.tmp<pid> left, bitwise equal."""
    tmp, ref, futs = runs
    state = futs["early"].result()
    assert state["rc"] == -signal.SIGKILL
    assert not state["ckpt"], "killed too late: a checkpoint was written"
    assert '"step": 1,' in state["metrics"]
    rc, so, se, _ = state["rerun"]
    assert rc == 0 and "Traceback" not in se, se[-3000:]
    assert_same_student(ref, tmp / "early")


def test_train_killed_while_publishing_a_checkpoint_resumes_bitwise(runs):
    """SIGKILL at the moment the second checkpoint.pt is renamed into place (its temporary file
    complete, the first checkpoint still there): --resume continues from step 2, removes the
    temporary file and ends bitwise equal."""
    tmp, ref, futs = runs
    state = futs["publish"].result()
    assert state["rc"] == -signal.SIGKILL, state["stderr"][-3000:]
    assert [f for f in state["files"] if f.startswith("checkpoint.pt.tmp")], state["files"]
    assert state["ckpt_step"] == 2
    rc, so, se, _ = state["resume"]
    assert rc == 0 and "Traceback" not in se, se[-3000:]
    assert "resuming" in se and "global step 2" in se, se
    assert_same_student(ref, tmp / "publish")


def test_train_under_a_file_size_limit_names_the_checkpoint_and_resumes(runs):
    """RLIMIT_FSIZE below the checkpoint's size: exit 2, one `error:` line naming checkpoint.pt
    and the limit, no traceback, no temporary file left; --resume without the limit finishes,
    bitwise equal to the uninterrupted run."""
    tmp, ref, futs = runs
    state = futs["fsize"].result()
    out = tmp / "fsize"
    assert state["rc"] == 2, state["stderr"][-3000:]
    msg = error_line(state["stderr"])
    assert str(out / "checkpoint.pt") in msg and "file-size limit" in msg and "--resume" in msg, msg
    assert [f for f in state["files"] if ".tmp" in f] == [] and "checkpoint.pt" not in state["files"], state["files"]
    rc, so, se, _ = state["resume"]
    assert rc == 0 and "Traceback" not in se, se[-3000:]
    assert_same_student(ref, out)


# ---- slow variants ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_killed_at_random_moments_many_seeds(setup, reference, tmp_path):
    """KDCACHE_REL_KILL_SEEDS seeds (default 10), each killed twice at random moments."""
    ref = reference
    n = int(os.environ.get("KDCACHE_REL_KILL_SEEDS", "10"))
    problems = []
    with ThreadPoolExecutor(2) as pool:
        futs = {seed: pool.submit(_killed_and_resumed, setup, tmp_path / f"run{seed}", seed, 2)
                for seed in range(1, 1 + n)}
        for seed, f in futs.items():  # every seed is checked; the failures are listed together
            try:
                f.result()
                assert_same_student(ref, tmp_path / f"run{seed}")
            except AssertionError as e:
                problems.append(f"seed {seed}: {e}")
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_train_killed_while_publishing_the_first_checkpoint(setup, reference, tmp_path):
    """The first checkpoint's rename is the kill: there is nothing to resume, so --resume starts afresh."""
    ref = reference
    state = _killed_publishing_checkpoint(setup, tmp_path / "run", 1)
    assert state["rc"] == -signal.SIGKILL and state["ckpt_step"] is None, state
    rc, so, se, _ = state["resume"]
    assert rc == 0 and "Traceback" not in se, se[-3000:]
    assert_same_student(ref, tmp_path / "run")


@pytest.mark.slow
def test_train_with_workers_under_a_file_size_limit_ends_cleanly(setup, tmp_path):
    """--workers 2 --worker-timeout 20 under RLIMIT_FSIZE: the workers cannot ship a batch through
    shared memory; the run must end (exit 2, one `error:` line, no traceback), and --resume
    without the limit finishes. (Workers change the batch order, so no comparison with the
    workers-0 reference; every step once in metrics.jsonl.)"""
    out = tmp_path / "run"
    state = _under_fsize(setup, out, 2)
    assert state["rc"] == 2, state["stderr"][-3000:]
    lines = [ln for ln in state["stderr"].splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "file-size limit" in lines[0], state["stderr"][-3000:]
    rc, so, se, _ = state["resume"]
    assert rc == 0 and "Traceback" not in se, se[-3000:]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(1, STEPS + 1))
    error_line(state["stderr"])  # last: no traceback in the failed run's output
