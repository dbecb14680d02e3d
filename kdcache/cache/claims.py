"""Claims: one writer per shard group, across processes and machines that share a filesystem.

A local cache (a path, or file://, on one machine or a filesystem shared by several) holds a claim
file per group being written: OUT/.claims/<group>, created with O_CREAT | O_EXCL (atomic on local
filesystems and NFS v3+), holding {host, pid, started, token}. A claim whose holder is gone is taken
over: on the same host when its pid is dead (or reused), from another host when it was not
refreshed for CLAIM_LEASE_S. The directory is removed again when its last claim is released, so a
finished cache holds no trace of it. ``store.CacheWriter.claim`` hands them out.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass

from ..errors import KdcacheError

CLAIMS_DIR = ".claims"
CLAIM_LEASE_S = 600.0  # a claim from another host that was not refreshed for this long is stale
CLAIM_REFRESH_S = 60.0  # holders refresh (touch) their claims at least this often
CLAIM_GRACE_S = 30.0  # an unreadable claim file younger than this is being written by its holder


class ShardClaimedError(KdcacheError):
    """The shard group is being written by another live writer (or was completed meanwhile)."""


class ClaimLostError(KdcacheError):
    """This writer's claim on a group was taken over (it was judged stale); it must not write."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[19].decode() if fields[0] != b"Z" else "zombie"
    except (OSError, IndexError):
        return None


def _pid_alive(pid, started: str | None) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, as another user
    now = _proc_start(pid)
    if now == "zombie":
        return False
    return not (started and now and now != started)  # the pid was reused by another process


def read_claim(path: str) -> tuple[dict | None, float] | None:
    """(holder info or None when unreadable, mtime); None when the file is gone."""
    try:
        mtime = os.stat(path).st_mtime
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(raw)
        return (info if isinstance(info, dict) else None), mtime
    except ValueError:
        return None, mtime


def _pid_namespace() -> str | None:
    """This process's pid namespace (Linux): containers that share a host name may not share pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _holder_alive(info: dict | None, mtime: float) -> bool:
    if info is None:  # created, not written yet (or its writer died in between)
        return time.time() - mtime < CLAIM_GRACE_S
    if info.get("host") == socket.gethostname() and info.get("pidns") == _pid_namespace():
        return _pid_alive(info.get("pid"), info.get("pid_start"))  # our own pids: ask the kernel
    return time.time() - mtime < CLAIM_LEASE_S  # another machine (or container): the lease decides


def describe_holder(info: dict | None) -> str:
    if not info:
        return "a writer that is starting"
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {info.get('pid')} on {info.get('host')}, since {when}"


@dataclass
class ShardClaim:
    """The right to write one shard group, held by one process.

    ``refresh()`` at least every CLAIM_REFRESH_S seconds while the group's work goes on (a claim
    of another host is taken over once it is CLAIM_LEASE_S old); ``write_shard(..., claim=c)``
    checks it, writes, marks the group complete and releases it. ``release()`` gives it up
    without writing (also fine after write_shard, which released it already).
    ``exclusive`` is False for a remote (fsspec) cache, where there is no atomic create: there,
    one writer per group is the user's job (--shard-index, torchrun ranks).
    """

    name: str
    token: str
    path: str | None  # the claim file; None on a remote cache
    host: str
    pid: int
    started: float
    released: bool = False

    @property
    def exclusive(self) -> bool:
        return self.path is not None

    def held(self) -> bool:
        """Whether the claim file still holds this claim's token."""
        if not self.exclusive:
            return not self.released
        got = read_claim(self.path)
        return not self.released and got is not None and got[0] is not None and got[0].get("token") == self.token

    def check(self) -> None:
        if self.released:
            raise ClaimLostError(f"the claim on shard group {self.name!r} was released already; claim it again")
        if not self.held():
            got = read_claim(self.path) if self.exclusive else None
            now = f"; it is now held by {describe_holder(got[0])}" if got else ""
            raise ClaimLostError(
                f"this writer no longer holds the claim on shard group {self.name!r}{now}. It was taken "
                f"over as stale (not refreshed for {CLAIM_LEASE_S:.0f} s?); the group is left to the new holder"
            )

    def refresh(self) -> None:
        """Mark the claim alive (touch its file); raises ClaimLostError when it was taken over."""
        self.check()
        if self.exclusive:
            os.utime(self.path)

    def release(self) -> None:
        if self.released:
            return
        if self.exclusive and self.held():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            try:
                os.rmdir(os.path.dirname(self.path))  # only when no other claim is in it
            except OSError:
                pass
        self.released = True

    def __enter__(self) -> "ShardClaim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def take_claim(claims_dir: str, name: str) -> tuple[ShardClaim | None, dict | None]:
    """Create claims_dir/name exclusively, taking over a stale claim. Returns (claim, None), or
    (None, holder info) when a live writer holds it."""
    path = os.path.join(claims_dir, name)
    host, pid = socket.gethostname(), os.getpid()
    for _ in range(100):
        try:
            os.makedirs(claims_dir, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            got = read_claim(path)
            if got is None:
                continue  # released just now: try again
            info, mtime = got
            if _holder_alive(info, mtime):
                return None, info
            # Stale: move it out of the way under a unique name. Only one process's rename of
            # this file succeeds; the others find it gone and start over.
            aside = f"{path}.stale.{uuid.uuid4().hex}"
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            moved = read_claim(aside)
            if moved is not None and (moved[0] or {}).get("token") != (info or {}).get("token"):
                # a new claim was made between our look and our rename: give it back
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
            try:
                os.unlink(aside)
            except FileNotFoundError:
                pass
            continue
        except FileNotFoundError:
            continue  # the directory was removed by a release in between
        claim = ShardClaim(name=name, token=uuid.uuid4().hex, path=path, host=host, pid=pid, started=time.time())
        info = {"host": host, "pid": pid, "pid_start": _proc_start(pid), "pidns": _pid_namespace(),
                "started": claim.started, "token": claim.token}
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
            f.flush()
            os.fsync(f.fileno())
        return claim, None
    raise KdcacheError(f"could not claim shard group {name!r}: its claim file {path} keeps changing; re-run")


def clear_stale(claims_dir: str, done) -> list[str]:
    """Remove the claim files of groups that are complete (``done(name)``) and whose holder is
    gone: a writer killed between marking its group complete and releasing the claim leaves one,
    and nothing else would ever look at it again. Removes the directory when it ends up empty.
    Returns the groups whose claims were removed."""
    removed = []
    try:
        names = os.listdir(claims_dir)
    except FileNotFoundError:
        return removed
    for name in names:
        path = os.path.join(claims_dir, name)
        if ".stale." in name or not done(name):
            continue
        got = read_claim(path)
        if got is None or _holder_alive(*got):
            continue
        try:
            os.unlink(path)
            removed.append(name)
        except FileNotFoundError:
            pass
    try:
        os.rmdir(claims_dir)  # only when empty
    except OSError:
        pass
    return removed
