"""Faults: the disk fills up (ENOSPC), a quota is reached (EDQUOT), a file grows past the size
limit (EFBIG, e.g. RLIMIT_FSIZE / `ulimit -f`).

Each used to end in a Python traceback (or, for RLIMIT_FSIZE, in the process being killed by
SIGXFSZ). The command line now prints one `error:` line naming the path, what to do, and that
re-running the same command resumes; exit code 2. `kdcache pack` leaves no temporary file.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from conftest import write_imagefolder
from relhelpers import REPO, env


def _pack(src, out, limit=None):
    def preexec():
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "kdcache", "pack", str(src), str(out), "--shard-size", "5"],
                          cwd=str(REPO), env=env(), capture_output=True, text=True, timeout=300, preexec_fn=preexec)


def _files(root):
    return sorted(os.path.relpath(os.path.join(dp, f), root) for dp, _, fs in os.walk(root) for f in fs)


def test_file_size_limit_is_a_clean_error(tmp_path):
    src = tmp_path / "imgs"
    write_imagefolder(src, per_class=(6, 5, 4))
    out = tmp_path / "shards"
    res = _pack(src, out, limit=20_000)  # each image is a few KB: the first shard outgrows it
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    msg = lines[0]
    assert "file too large" in msg.lower() and str(out / "train" / "train-000000.tar.tmp") in msg
    assert "raise the limit" in msg and "re-run the same command" in msg
    # no shard is left behind, final or temporary
    assert [f for f in _files(out) if f.endswith((".tar", ".tmp"))] == []
    # with the limit lifted, the same command works
    res = _pack(src, out)
    assert res.returncode == 0, res.stderr
    assert [f for f in _files(out) if f.endswith(".tar")] == [f"train/train-00000{i}.tar" for i in range(3)]


def test_no_space_left_is_a_clean_error(tmp_path):
    """A real ENOSPC from the kernel: the shard's temporary file is /dev/full."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    src = tmp_path / "imgs"
    write_imagefolder(src, per_class=(3, 3))
    out = tmp_path / "shards"
    (out / "train").mkdir(parents=True)
    os.symlink("/dev/full", out / "train" / "train-000000.tar.tmp")
    res = _pack(src, out)
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    msg = lines[0]
    assert "no space left on device" in msg.lower() and "train-000000.tar.tmp" in msg
    assert "free some space" in msg and "re-run the same command" in msg
    assert not os.path.lexists(out / "train" / "train-000000.tar.tmp")
    assert [f for f in _files(out) if f.endswith(".tar")] == []


def test_error_mapping_for_every_space_errno(tmp_path):
    """The CLI's mapping itself, for the three errnos, wrapped or not (e.g. raised from inside
    zarr while precompute writes a group), through a real click command."""
    import errno

    import click
    from click.testing import CliRunner

    from kdcache.cli import KdcacheGroup

    @click.group(cls=KdcacheGroup)
    def app():
        pass

    @app.command()
    @click.argument("code")
    @click.option("--wrapped", is_flag=True)
    def fail(code, wrapped):
        e = OSError(getattr(errno, code), os.strerror(getattr(errno, code)), str(tmp_path / "cache.zarr" / "g0" / "c"))
        if wrapped:
            try:
                raise e
            except OSError as inner:
                raise RuntimeError("zarr could not store the chunk") from inner
        raise e

    for code, words in (("ENOSPC", "no space left on device"), ("EDQUOT", "quota"), ("EFBIG", "file too large")):
        for wrapped in (False, True):
            res = CliRunner().invoke(app, ["fail", code] + (["--wrapped"] if wrapped else []))
            assert res.exit_code == 2, (code, res.output)
            assert words in res.output.lower() and str(tmp_path / "cache.zarr" / "g0" / "c") in res.output, res.output
            assert "re-run the same command" in res.output and res.output.startswith("error: ")
    res = CliRunner().invoke(app, ["fail", "EACCES"])  # other OS errors are not disguised as this
    assert res.exit_code != 2 and isinstance(res.exception, PermissionError)
