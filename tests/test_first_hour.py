"""What a new user trips over in the first hour: each case here failed before its fix."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from conftest import NUM_CLASSES, TEACHER, precompute_config, with_aug, write_dataset, write_imagefolder
from kdcache.cli import cli
from kdcache.errors import KdcacheError, count
from kdcache.learn.trainer import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
STUDENT = "py:kdcache.models.zoo:tiny_cnn"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def config(dataset, out, **kw) -> TrainConfig:
    base = dict(data=str(dataset), student=STUDENT, out=str(out), epochs=1, batch_size=4, lr=1e-2, workers=0,
                device="cpu", progress=False, log_every=2)
    base.update(kw)
    return TrainConfig(**with_aug(base))


# ---- 1. a teacher without weights -------------------------------------------------------------------------


def test_live_training_rebuilds_the_caches_seeded_random_teacher(dataset, tmp_path):
    """A cache made with --random-init: a live teacher with no weights is rebuilt from the cache's
    seed, so live and cached training agree bit for bit."""
    from kdcache.tools.precompute import precompute

    c = tmp_path / "c.zarr"
    precompute(precompute_config(dataset, c, None, teacher_weights=None, random_init=11))
    kw = dict(res=32, epochs=1, label_weight=0.0)
    train(config(dataset, tmp_path / "cached", cache=str(c), **kw))
    train(config(dataset, tmp_path / "live", cache=str(c), teacher=TEACHER, **kw))
    a = torch.load(tmp_path / "cached" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "live" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # without the cache's seed, the live teacher is refused
    with pytest.raises(Exception, match="has random weights"):
        train(config(dataset, tmp_path / "live2", teacher=TEACHER, **kw))


# ---- 2. Pillow-SIMD replaced by Pillow -------------------------------------------------------------------


def _pretend_plain_pillow(monkeypatch):
    import kdcache.data.render as render

    monkeypatch.setattr(render, "render_backend",
                        lambda: {"pil": "Pillow", "pil_version": "13.0.0", "resample": "bilinear"})


def test_a_replaced_pillow_simd_is_named_with_the_fix(dataset, cache, teacher_weights, tmp_path, monkeypatch, capsys):
    recorded = zarr.open_group(str(cache), mode="r").attrs["kdcache"]["render"]
    assert recorded["pil"] == "Pillow-SIMD"  # what `make` installs
    _pretend_plain_pillow(monkeypatch)
    # train says so at the start
    train(config(dataset, tmp_path / "run", cache=str(cache)))
    err = capsys.readouterr().err
    assert "warning: the cache was rendered with Pillow-SIMD" in err
    assert f"pillow-simd=={recorded['pil_version']}" in err
    # verify, when records disagree, gives the cause and the fix as a hint
    c = tmp_path / "c.zarr"
    shutil.copytree(cache, c)
    g = zarr.open_group(str(c), mode="r+")["train-000000"]
    lp = g["logprobs"][:]
    lp[0, 0, 0] -= 0.5
    g["logprobs"][:] = lp
    res = run("verify", c, "--data", dataset, "--teacher", TEACHER, "--teacher-weights", teacher_weights, "--device",
              "cpu", "--samples", 1000)
    assert res.exit_code == 1
    assert "hint: the cache was rendered with Pillow-SIMD" in res.stdout and "--force-reinstall pillow-simd==" in res.stdout


# ---- 3. resume with other settings ----------------------------------------------------------------------


def test_resume_refuses_changed_settings_and_records_allowed_ones(dataset, cache, tmp_path):
    out = tmp_path / "run"
    base = dict(cache=str(cache), epochs=2, lr=1e-2)
    s = train(config(dataset, out, stop_after=3, **base))
    assert s["stopped_at"] == 3
    with pytest.raises(Exception) as ei:
        train(config(dataset, out, resume=True, **{**base, "lr": 5e-2}))
    assert "lr: the run has 0.01, this command 0.05" in str(ei.value) and "cannot resume" in str(ei.value)
    train(config(dataset, out, resume=True, **{**base, "epochs": 3, "log_every": 1}))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["epochs"] == 3 and cfg["lr"] == 1e-2
    changes = cfg["resumes"][0]["changes"]
    assert cfg["resumes"][0]["step"] == 3 and changes["epochs"] == [2, 3] and changes["log_every"] == [2, 1]
    assert changes["stop_after"] == [3, None]


def test_resuming_a_finished_run_says_it_is_complete(dataset, cache, tmp_path, capsys):
    out = tmp_path / "run"
    first = train(config(dataset, out, cache=str(cache)))
    capsys.readouterr()
    again = train(config(dataset, out, cache=str(cache), resume=True))
    err = capsys.readouterr().err
    assert "is already complete" in err and "at epoch" not in err
    assert again == json.loads(json.dumps(first))


# ---- 4. the demo's commands in a fresh shell --------------------------------------------------------------


def test_demo_commands_say_how_to_reach_kdcache(monkeypatch):
    from kdcache.tools.demo import kdcache_command

    bindir = Path(sys.executable).parent
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a fresh shell: the venv is not activated
    exe, how = kdcache_command()
    assert Path(exe).resolve() == (bindir / "kdcache").resolve()
    if (bindir / "activate").exists():
        assert "source" in how and "activate" in how
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    assert kdcache_command() == ("kdcache", "")


# ---- 5. finding a key --------------------------------------------------------------------------------------


def test_keys_are_listed_found_and_suggested(cache):
    res = run("inspect", cache, "--keys", "--shard", "train-000001")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert len(lines) == 7 and all(line.startswith("train-000001\t") for line in lines)
    key = lines[3].split("\t")[1]
    res = run("inspect", cache, "--key", key, "--json")  # no --shard: the group is found
    assert res.exit_code == 0 and json.loads(res.stdout)["shard"] == "train-000001"
    res = run("inspect", cache, "--shard", "train-000001", "--key", key[:-1] + "9x")
    assert res.exit_code == 2 and "close ones:" in res.stderr and "--keys --shard train-000001" in res.stderr
    everything = json.loads(run("inspect", cache, "--keys", "--json").stdout)
    assert sorted(everything) == ["train-000000", "train-000001", "train-000002"]


# ---- 6. defaults that fit the machine --------------------------------------------------------------------------


def test_default_workers_leave_a_core_to_the_main_process():
    from kdcache.runtime import default_workers

    cores = len(os.sched_getaffinity(0))
    assert default_workers() == max(0, min(4, cores - 1))
    assert TrainConfig(data="d", student="s", out="o").workers == default_workers()


# ---- 7. Ctrl-C ----------------------------------------------------------------------------------------------


# Run a Python command with SIGINT at its default: a test run from a background job (`make test &`,
# nohup, some CI runners) inherits SIGINT ignored, and kdcache, like any program, then leaves it so.
WITH_CTRL_C = [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
               "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"]


def _interrupt(args, when, hold: Path, hold_at: int) -> subprocess.CompletedProcess:
    """Run a command whose slow_cnn holds on its ``hold_at``-th forward pass, and press Ctrl-C once
    it holds and ``when()`` is true: the run is then surely at work, however slow the machine."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]), KD_TEST_HOLD=str(hold),
               KD_TEST_HOLD_AT=str(hold_at))
    p = subprocess.Popen([*WITH_CTRL_C, "-m", "kdcache", *map(str, args)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and p.poll() is None and not (hold.exists() and when()):
            time.sleep(0.05)
        assert p.poll() is None, f"the run ended before it was interrupted: {p.communicate()[1][-2000:]}"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:  # it did not stop: do not leave it holding
            p.kill()
            p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_ctrl_c_exits_130_and_says_how_to_resume(dataset, teacher_weights, tmp_path):
    out = tmp_path / "c.zarr"
    args = ["precompute", "--data", dataset, "--teacher", "py:testmodels:slow_cnn", "--teacher-weights",
            teacher_weights, "--num-classes", NUM_CLASSES, "--out", out, "-V", 2, "-k", 3, "--res", 32, "-b", 4,
            "--workers", 0, "--device", "cpu", "--no-progress"]
    # held in the teacher's 4th batch: the cache's root exists and the first shard group is under way
    res = _interrupt(args, lambda: (out / "zarr.json").exists(), tmp_path / "held-precompute", hold_at=4)
    assert res.returncode == 130, res.stderr
    assert "interrupted (precompute): finished shard groups are kept; re-run the same command" in res.stderr
    assert "Traceback" not in res.stderr and "Aborted!" not in res.stderr
    run_dir = tmp_path / "run"
    args = ["train", "--data", dataset, "--student", "py:testmodels:slow_cnn", "--out", run_dir, "--res", 32,
            "--epochs", 3, "-b", 4, "--workers", 0, "--device", "cpu", "--no-progress", "--checkpoint-every", 1,
            "--num-classes", NUM_CLASSES]
    # held in step 3's forward pass: the checkpoints of steps 1 and 2 are written
    res = _interrupt(args, lambda: (run_dir / "checkpoint.pt").exists(), tmp_path / "held-train", hold_at=3)
    assert res.returncode == 130, res.stderr
    assert "interrupted (train): re-run the same command with --resume" in res.stderr and "Traceback" not in res.stderr


# ---- 8. late checks -----------------------------------------------------------------------------------------------


def test_val_data_with_other_classes_fails_before_training(dataset, cache, tmp_path):
    from conftest import encode, make_image, write_tar
    import numpy as np

    rng = np.random.default_rng(0)
    val = tmp_path / "val"
    write_tar(val / "val-000000.tar", [("a.png", encode(make_image(rng, 20, 20, 1), "png")), ("a.cls", b"1"),
                                       ("b.png", encode(make_image(rng, 20, 20, 1), "png")), ("b.cls", b"9")])
    out = tmp_path / "run"
    with pytest.raises(Exception, match=r"sample 'b' in shard .*val-000000.tar has cls 9, outside the run's 5 classes"):
        train(config(dataset, out, cache=str(cache), val_data=str(val)))
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()


# ---- 9. defaults that surprise ------------------------------------------------------------------------------


def test_res_defaults_to_the_caches_and_the_start_line_comes_before_the_bar(dataset, cache, tmp_path, capsys):
    s = train(config(dataset, tmp_path / "run", cache=str(cache), progress=True))
    err = capsys.readouterr().err
    assert "note: --res not given: the student trains at the cache's resolution, 32px" in err
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["res"] is None and cfg["resolved"]["res"] == 32 and s["steps"] == 6
    # the weights are "model.pt" (a teacher trained this way is not called a student in its cache)
    assert (tmp_path / "run" / "model.pt").exists() and not (tmp_path / "run" / "student.pt").exists()
    assert err.index("kdcache train: mode cached") < err.index("train (cached)")  # not inside the bar's line


def test_precompute_bar_counts_views(dataset, teacher_weights, tmp_path, capsys):
    from kdcache.tools.precompute import precompute

    precompute(precompute_config(dataset, tmp_path / "c.zarr", teacher_weights, progress=True))
    err = capsys.readouterr().err
    assert "view" in err and "63/63" in err  # 21 images x 3 views, counted as they are computed


# ---- 10. small things ------------------------------------------------------------------------------------------


def test_small_things():
    assert count(1, "shard") == "1 shard" and count(3, "shard") == "3 shards" and count(1, "other") == "1 other"
    from kdcache.runtime import default_workers

    for command in ("precompute", "train", "demo"):
        text = " ".join(run(command, "--help").stdout.split())
        assert ".pt2" in text or command == "demo"
        # --workers shows its rule and what it comes to here, as one default (not two that disagree)
        workers = text[text.index("--workers INTEGER"):].split(" -", 1)[0]
        assert workers.endswith(f"[default: (the cores but one, at most 4; {default_workers()} here)]"), workers
        assert workers.count("default") == 1, workers


def test_class_count_error_names_where_the_count_came_from(dataset, cache, tmp_path):
    with pytest.raises(Exception, match=r"outputs 7 classes but 5 were asked for \(the cache's teacher has 5 "
                                        r"classes\); use a model whose head has that many classes"):
        train(config(dataset, tmp_path / "r", cache=str(cache), student="py:testmodels:fixed_cnn"))
    res = CliRunner().invoke(cli, ["precompute", "--data", str(dataset), "--teacher", "py:testmodels:fixed_cnn",
                                   "--random-init", "0", "--num-classes", "5", "--out", str(tmp_path / "c.zarr")])
    assert res.exit_code == 2 and "(--num-classes); if the model is right, pass --num-classes 7" in res.stderr


def test_pack_refuses_an_output_with_shards_and_overwrite_replaces_them(tmp_path):
    src = tmp_path / "folder"
    write_imagefolder(src)
    out = tmp_path / "data"
    assert run("pack", src, out, "--shard-size", 2).exit_code == 0
    many = sorted((out / "train").glob("*.tar"))
    res = run("pack", src, out, "--shard-size", 100)
    assert res.exit_code == 2 and "already holds shards" in res.stderr and "--overwrite" in res.stderr
    assert sorted((out / "train").glob("*.tar")) == many  # untouched
    assert run("pack", src, out, "--shard-size", 100, "--overwrite").exit_code == 0
    assert [p.name for p in (out / "train").glob("*.tar")] == ["train-000000.tar"]  # no stale shard left


def test_eval_epochs_evaluates_every_nth_epoch_and_the_last(dataset, cache, tmp_path):
    out = tmp_path / "run"
    train(config(dataset, out, cache=str(cache), epochs=5, eval_epochs=2, val_data=str(dataset)))
    evals = [json.loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines() if "val_top1" in l]
    assert evals == [1, 3, 4]


_SWALLOW = """
import os, sys, time, click
import kdcache.cli
from kdcache.cli import cli

kdcache.cli.INTERRUPT_GRACE_S = float(os.environ["GRACE_S"])


@cli.command("swallow")
@click.option("--finish", is_flag=True)
def swallow(finish):
    try:  # "ready" is said inside the try: a Ctrl-C sent as soon as it is read lands here too
        print("ready", flush=True)
        time.sleep(600)
    except KeyboardInterrupt:
        pass  # as Python does with an interrupt that lands in a finaliser or weakref callback
    print("swallowed", flush=True)
    if not finish:
        time.sleep(600)

cli(["swallow"] + sys.argv[1:])
"""


def _swallowing(*flags, presses=1, grace_s):
    env = dict(os.environ, PYTHONPATH=str(ROOT), GRACE_S=str(grace_s))
    p = subprocess.Popen([*WITH_CTRL_C, "-c", _SWALLOW, *flags], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    for press in range(presses):
        if press:  # the first was handled (two signals before Python runs its handler count as one)
            assert p.stdout.readline().strip() == "swallowed"
        p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err, time.monotonic() - t0


@pytest.mark.parametrize("flags,presses,by_timer", [((), 1, True), (("--finish",), 1, False), ((), 2, False)])
def test_an_interrupt_python_swallowed_still_ends_the_run(flags, presses, by_timer):
    """A Ctrl-C that Python could not raise where it landed still ends the command with 130 and the
    interrupted line, without a traceback: when the command returns anyway, or on a second Ctrl-C,
    at once; otherwise when the grace period is over. The grace is set per case (short where the timer
    must end the run, far longer than any slow machine needs where it must not), so no case depends on
    how fast the machine is."""
    grace_s = 1.0 if by_timer else 200.0
    code, err, seconds = _swallowing(*flags, presses=presses, grace_s=grace_s)
    assert code == 130, err
    assert "interrupted (swallow): nothing was changed" in err and err.count("interrupted (") == 1, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    if by_timer:
        assert seconds >= grace_s  # the timer starts after the signal is sent, so the run took at least that
    else:
        assert seconds < grace_s  # it did not wait for the timer


# ==== the second hour (issue 21): what a new user still tripped over ==========================================


def one_error(res, *needles) -> str:
    """The command failed as docs/cli.md promises: exit code 2 and one `error:` line on stderr naming
    each of ``needles``; no traceback."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def precompute_args(data, out, weights, *extra):
    return ["precompute", "--data", data, "--teacher", TEACHER, "--num-classes", NUM_CLASSES, "--out", out, "-V", 2,
            "-k", 3, "--res", 32, "-b", 8, "--workers", 0, "--device", "cpu", "--no-progress",
            *(["--teacher-weights", weights] if weights is not None else []), *extra]


def train_args(data, out, *extra):
    """Labels only, at 32 px: no note precedes an error."""
    return ["train", "--data", data, "--student", STUDENT, "--out", out, "--res", 32, "--epochs", 1, "-b", 4,
            "--workers", 0, "--device", "cpu", "--no-progress", *extra]


def _unwritable(tmp_path: Path, kind: str) -> Path:
    if kind == "under a file":
        (tmp_path / "a-file").write_text("not a folder")
        return tmp_path / "a-file" / "out"
    if kind == "proc":
        return Path("/proc/kdcache-no-such-place/out")
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "out"


@pytest.mark.parametrize("kind", ["under a file", "proc", "read-only folder"])
def test_an_unwritable_output_is_one_line_naming_it(kind, dataset, cache, teacher_weights, tmp_path):
    """1. precompute --out, train --out and inspect --render on a path nobody can write."""
    if kind == "read-only folder" and os.geteuid() == 0:
        pytest.skip("root writes into a read-only folder")
    bad = _unwritable(tmp_path, kind)
    line = one_error(run(*precompute_args(dataset, bad / "c.zarr", teacher_weights)), f"--out {bad / 'c.zarr'}")
    assert "Traceback" not in line
    one_error(run(*train_args(dataset, bad / "run")), f"--out {bad / 'run'}")
    key = run("inspect", cache, "--keys", "--shard", "train-000000").stdout.split()[1]
    one_error(run("inspect", cache, "--shard", "train-000000", "--key", key, "--render", bad / "r.png", "--data", dataset),
              f"--render {bad / 'r.png'}")
    if kind == "under a file":
        assert (tmp_path / "a-file").read_text() == "not a folder"
        assert "Not a directory" in line  # the system's reason


def test_weights_that_are_not_valid_safetensors_are_named(dataset, tmp_path):
    """1. A .safetensors file that is not one, as teacher or as student weights."""
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(np.random.default_rng(0).bytes(1000))
    one_error(run(*precompute_args(dataset, tmp_path / "c.zarr", bad)), f"weights file {bad}", "not a valid .safetensors")
    assert not (tmp_path / "c.zarr").exists()
    one_error(run(*train_args(dataset, tmp_path / "run", "--student-weights", bad)), f"{bad}", "not a valid .safetensors")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,needle", [
    (("--lr", "-1"), "--lr must be > 0, got -1.0"),
    (("--optimizer", "sgd", "--momentum", "-0.5"), "--momentum must be in [0, 1), got -0.5"),
    (("--min-lr", "5", "--lr", "1e-3"), "--min-lr 5 is above the peak learning rate 0.001"),
    (("--weight-decay", "-1"), "--weight-decay must be >= 0"),
    (("--warmup-steps", "-5"), "--warmup-steps must be at least 0"),
    (("--lr", "nan"), "--lr must be > 0, got nan"),
])
def test_train_refuses_senseless_numbers_before_making_the_run_folder(flags, needle, dataset, tmp_path):
    """1 and 2. Optimiser values torch would reject (after config.json was written) or, worse, accept."""
    one_error(run(*train_args(dataset, tmp_path / "run", *flags)), needle)
    assert not (tmp_path / "run").exists()


def test_every_numeric_setting_is_checked_in_the_config():
    """2. One table per config, checked when it is made: the CLI and the Python API alike."""
    from kdcache.learn.config import TRAIN_NUMBERS
    from kdcache.tools.config import PRECOMPUTE_NUMBERS, PrecomputeConfig

    bad = {"at least 0": -1, "at least 1": 0, "at least 8": 7, "> 0": 0.0, ">= 0": -0.5, "in [0, 1]": 1.5,
           "in [0, 1)": 1.0}
    base = dict(data="d", student="s", out="o")
    for name, (want, _) in TRAIN_NUMBERS:
        with pytest.raises(KdcacheError, match=re.escape(f"--{name.replace('_', '-')} must be {want}")):
            TrainConfig(**base, **{name: bad[want]})
        with pytest.raises(KdcacheError, match=re.escape(f"--{name.replace('_', '-')} must be {want}")):
            TrainConfig(**base, **{name: float("nan")})
    for name, (want, _) in PRECOMPUTE_NUMBERS:
        with pytest.raises(KdcacheError, match=re.escape(f"--{name.replace('_', '-')} must be {want}")):
            PrecomputeConfig(data="d", teacher="t", out="o", **{name: bad[want]})
    numeric = ("int", "float", "int | None", "float | None", "int | list[int] | None")  # lists: one per teacher
    fields = {f.name for f in dataclasses.fields(TrainConfig) if f.type in numeric}
    seeds = {"seed", "view_seed", "teacher_random_init"}
    assert fields - seeds == {name for name, _ in TRAIN_NUMBERS}  # every number has its rule
    pfields = {f.name for f in dataclasses.fields(PrecomputeConfig) if f.type in numeric}
    assert pfields - {"seed", "random_init", "samples", "shard_index", "num_shard_groups", "teacher_res"} == \
        {name for name, _ in PRECOMPUTE_NUMBERS}  # (samples, the shard split and each member have their own checks)
    for res in (7, [32, 7]):
        with pytest.raises(KdcacheError, match=re.escape("--teacher-res (or --res) must be at least 8, got 7")):
            PrecomputeConfig(data="d", teacher=["t"] * (1 if res == 7 else 2), out="o", teacher_res=res)
    with pytest.raises(KdcacheError, match=re.escape("--teacher-res must be at least 8, got 7")):
        TrainConfig(**base, teacher=["t", "u"], teacher_res=[32, 7])
    with pytest.raises(KdcacheError, match="--std values divide the pixels"):
        PrecomputeConfig(data="d", teacher="t", out="o", std=(0.2, 0.0, 0.2))
    with pytest.raises(KdcacheError, match="--lr must be > 0, got '0.1'"):
        TrainConfig(**base, lr="0.1")
    assert TrainConfig(**base, min_lr=1e-3, lr=1e-3).min_lr == 1e-3  # a constant rate is fine
    with pytest.raises(KdcacheError, match=r"--min-lr 0.5 is above the peak learning rate 0.1 \(the sgd default\)"):
        TrainConfig(**base, optimizer="sgd", min_lr=0.5)


def test_precompute_checks_its_data_before_making_the_cache(dataset, teacher_weights, tmp_path):
    """4. A text file as --data: refused before the cache exists, so the corrected command works."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not a shard\n")
    out = tmp_path / "c.zarr"
    one_error(run(*precompute_args(notes, out, teacher_weights)), f"cannot read shard {notes}", "not a readable tar")
    assert not out.exists()
    res = run(*precompute_args(dataset, out, teacher_weights))
    assert res.exit_code == 0, res.output
    # A run that failed after the cache was made (a sample without an image, found while decoding)
    # leaves a cache with no shard group: the refusal of other settings says it may simply be deleted.
    from conftest import write_tar

    data = tmp_path / "noimage"
    write_tar(data / "s-0.tar", [("a.txt", b"hello"), ("a.cls", b"1")])
    out2 = tmp_path / "c2.zarr"
    one_error(run(*precompute_args(data, out2, teacher_weights)), "has no image")
    res = run(*precompute_args(dataset, out2, teacher_weights))
    assert res.exit_code == 2 and "It holds no shard group yet" in res.stderr and f"delete {out2}" in res.stderr


@pytest.mark.parametrize("content", ["random", "text", "zip", "objects"])
def test_a_file_that_is_no_state_dict_gets_one_line(content, dataset, tmp_path):
    """5. Teacher weights, student weights and a run's checkpoint that torch.load cannot read safely:
    one line naming the file, and never the advice to pass weights_only=False (that runs pickled code)."""
    import argparse
    import zipfile

    bad = tmp_path / "bad.pt"
    if content == "random":
        bad.write_bytes(np.random.default_rng(1).bytes(1000))
    elif content == "text":
        bad.write_text("epoch 3, loss 0.1\n")
    elif content == "zip":
        with zipfile.ZipFile(bad, "w") as z:
            z.writestr("notes", "not torch")
    else:
        torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, bad)
    what = ("is a PyTorch file that holds Python objects besides tensors" if content == "objects"
            else "is not a PyTorch state dict or checkpoint")
    for res in (run(*precompute_args(dataset, tmp_path / "c.zarr", bad)),
                run(*train_args(dataset, tmp_path / "run", "--student-weights", bad))):
        line = one_error(res, f"weights file {bad} {what}")
        assert "weights_only" not in line
    # a run whose checkpoint.pt is damaged
    out = tmp_path / "stopped"
    assert run(*train_args(dataset, out, "--stop-after", 2)).exit_code == 0
    shutil.copy(bad, out / "checkpoint.pt")
    line = one_error(run(*train_args(dataset, out, "--resume")), f"checkpoint {out / 'checkpoint.pt'} {what}")
    assert "weights_only" not in line


def test_verify_shows_a_bar_over_its_samples_and_reports_its_seed(cache, dataset, teacher_weights):
    """6 and 7. verify was silent for a minute, and reported `seed None`."""
    args = ["verify", cache, "--data", dataset, "--teacher", TEACHER, "--teacher-weights", teacher_weights, "--device",
            "cpu", "--samples", 40, "--seed", 5]
    res = run(*args, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["seed"] == 5
    assert "verify" in res.stderr and "40/40" in res.stderr and "sample" in res.stderr  # the bar, on stderr
    res = run(*args, "--no-progress")
    assert res.exit_code == 0 and "(seed 5)" in res.stdout and res.stderr == ""
    res = run(*args[:-2], "--seed", -1)
    one_error(res, "--seed must be at least 0")


def test_precompute_notes_an_upscale_and_says_what_it_does_before_the_bar(dataset, teacher_weights, tmp_path, capsys):
    """6. Images of 24-63 px rendered at 128 px: one note; at 32 px: none. The start line comes first."""
    from kdcache.tools.precompute import precompute

    precompute(precompute_config(dataset, tmp_path / "big.zarr", teacher_weights, res=128, views=1, progress=True))
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--res 128" in notes[0] and "upscaled at least" in notes[0], err
    assert err.index("kdcache precompute: 3 of 3 shards to write") < err.index("precompute: ")  # then the bar
    precompute(precompute_config(dataset, tmp_path / "fit.zarr", teacher_weights, progress=False))
    assert "note:" not in capsys.readouterr().err


def test_the_resume_refusal_names_the_settings_the_code_lets_change(dataset, cache, tmp_path):
    """9. The list in the message is made from the list the check uses, and docs/cli.md agrees."""
    from kdcache.cli.train import train as train_command
    from kdcache.learn.trainer import API_ONLY, RESUME_MAY_CHANGE, resume_may_change

    out = tmp_path / "run"
    train(config(dataset, out, cache=str(cache), epochs=2, stop_after=2))
    with pytest.raises(KdcacheError) as ei:
        train(config(dataset, out, cache=str(cache), epochs=2, resume=True, lr=0.5))
    listed = str(ei.value).split("Only ")[1].split(" may change")[0]
    assert listed == resume_may_change()
    flags = listed.split(" (and ")[0].split(", ")
    assert listed.endswith(f"(and {', '.join(API_ONLY)} in the Python API)") and "storage_options" in API_ONLY
    assert {"--device", "--compile", "--threads", "--loss-backend", "--spot-check"} <= set(flags) and not {"--progress", "--resume"} & set(flags)
    options = {o for p in train_command.params for o in p.opts}
    assert set(flags) <= options and len(flags) == len(RESUME_MAY_CHANGE) - len(API_ONLY)
    docs = " ".join((ROOT / "docs" / "cli.md").read_text().split())
    bullet = docs[docs.index("- **Resume:** `--resume` continues"):].split("- **", 2)[1]
    assert all(f"`{name}`" in bullet for name in flags + list(API_ONLY)), bullet


def test_a_copied_run_folder_resumes(dataset, cache, tmp_path):
    """10. The folder's path is where the run lives, not one of its settings."""
    base = dict(cache=str(cache), epochs=2)
    train(config(dataset, tmp_path / "a", stop_after=3, **base))
    moved = tmp_path / "elsewhere" / "b"
    shutil.copytree(tmp_path / "a", moved)
    s = train(config(dataset, moved, resume=True, **base))
    assert s["steps"] == 12
    resumed = json.loads((moved / "config.json").read_text())
    assert resumed["out"] == str(moved) and resumed["resumes"][0]["changes"]["out"] == [str(tmp_path / "a"), str(moved)]
    whole = train(config(dataset, tmp_path / "whole", **base))  # the same weights as a run never stopped or moved
    a, b = (torch.load(p / "model.pt", weights_only=True) for p in (moved, tmp_path / "whole"))
    assert whole["steps"] == 12 and all(torch.equal(a[k], b[k]) for k in a)


def test_a_closed_pipe_ends_quietly_with_0(cache):
    """10. `kdcache inspect --keys ... | head`: the reader goes away; kdcache stops as Unix tools do."""
    r, w = os.pipe()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "kdcache", "inspect", str(cache), "--keys"], stdout=w,
                         stderr=subprocess.PIPE, env=env)
    os.close(w)
    os.close(r)  # nobody reads: the first line kdcache writes meets a closed pipe
    err = p.communicate(timeout=300)[1].decode()
    assert p.returncode == 0 and err == "", (p.returncode, err)


def test_a_deleted_array_description_is_one_line_without_zarr_warnings(cache, tmp_path):
    """10. zarr warned twice about the folder before kdcache named the missing array (a real process:
    pytest would catch the warnings itself)."""
    c = tmp_path / "c.zarr"
    shutil.copytree(cache, c)
    (c / "train-000001" / "logprobs" / "zarr.json").unlink()
    res = subprocess.run([sys.executable, "-m", "kdcache", "inspect", str(c)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"error: shard 'train-000001' in cache {c} lacks arrays ['logprobs']; re-run precompute on it"]


def test_render_makes_the_folder_it_is_given(cache, dataset, tmp_path):
    """10. `inspect --render DIR/NAME.png` (README's example) writes where it is told, folders included."""
    key = run("inspect", cache, "--keys", "--shard", "train-000002").stdout.split()[1]
    png = tmp_path / "views" / f"{key}.png"
    res = run("inspect", cache, "--key", key, "--render", png, "--data", dataset)
    assert res.exit_code == 0, res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (ROOT / "README.md").read_text()
    assert "--render record.png" not in readme and "--render views/SOMEKEY.png" in readme


def test_the_editable_install_prints_no_setuptools_banner(tmp_path):
    """10. `pip install -e .` printed setuptools' `!!` / `****` banner about the editable layout. The
    editable wheel is built here the way pip has setuptools build it (PEP 660's build_editable, with the
    environment's setuptools, as `make` installs without build isolation) into a scratch folder:
    nothing is installed, so the test environment stays as it is (a real `pip install -e --prefix`
    would uninstall the environment's own kdcache first)."""
    pytest.importorskip("setuptools")
    build = "import sys; from setuptools import build_meta; print(build_meta.build_editable(sys.argv[1]))"
    res = subprocess.run([sys.executable, "-c", build, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / res.stdout.split()[-1]).exists()
    assert "!!" not in res.stderr and "*****" not in res.stderr, res.stderr[-3000:]


def test_the_docs_quote_the_demo_and_its_times_as_they_are():
    """9. docs/study.md quoted other demo figures than the README; the README's times held on an idle
    machine only and did not say so."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    study = " ".join((ROOT / "docs" / "study.md").read_text().split())
    figures = re.search(r"\(one run: ([\d.]+) % and ([\d.]+) %, best epochs", readme)
    quoted = re.search(r"the README's demo figures \(one run: ([\d.]+) % and ([\d.]+) %\)", study)
    assert figures and quoted and quoted.groups() == figures.groups()
    times = readme[readme.index("`make test` takes"):].split(". ")[0]
    assert re.search(r"\d+ to \d+ minutes", times) and "load average" in times, times
