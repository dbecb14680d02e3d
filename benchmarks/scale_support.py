"""What the scale benchmark's child processes import: a request-counting fsspec filesystem, the
cheap teacher and student, and a launcher that runs the kdcache CLI with both in place.

- ``countfs://PATH``: the local filesystem seen as object storage would see it. Every call that
  would be a request there is counted once (a read, a write, a listing, a head/exists, a delete),
  however the local implementation does it: ``find`` is one list request per 1000 keys (S3/GCS
  page size), ``cat_ranges`` one read per range, ``mkdir`` none (object stores have no
  directories). Each counted call first sleeps ``KDCACHE_BENCH_LATENCY_MS`` milliseconds (default
  0): a fixed latency per request, concurrent requests waiting in parallel as they do on S3.
  Every request, also one that fails (a missing key: a 404 is a request too), appends one line
  ``time kind count method what path ok|failed pid`` to the file named by
  ``KDCACHE_BENCH_REQUESTS`` (O_APPEND: forked DataLoader workers and torchrun ranks log too).
- ``py:scale_support:teacher`` / ``py:scale_support:student``: C = 1000 classes, a linear map of
  the image average-pooled to 2 x 2 (12 numbers), fixed weights (deterministic, so kdcache does
  not refuse the teacher as random). Each process appends ``first_forward TIME`` at the first
  forward pass on real pixels (not kdcache's all-zero probe of the class count) and
  ``forward_total SECONDS CALLS`` at exit to ``KDCACHE_BENCH_MARKS``; the launcher adds
  ``peak_rss_kb`` (``ru_maxrss`` of the process and of the workers it reaped) at exit.
- ``python benchmarks/scale_support.py ARGS``: registers ``countfs`` and runs ``kdcache ARGS``
  (also under ``python -m torch.distributed.run``); ``python benchmarks/scale_support.py --open
  URL`` opens a cache the way every command starts (``CacheReader`` and its shard list).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "countfs"
ENV_REQUESTS = "KDCACHE_BENCH_REQUESTS"
ENV_LATENCY = "KDCACHE_BENCH_LATENCY_MS"
ENV_MARKS = "KDCACHE_BENCH_MARKS"
PAGE = 1000  # keys per list request on S3 and GCS

# method -> kind of request it is on object storage
KINDS = {
    "cat_file": "read", "cat": "read", "cat_ranges": "read", "get_file": "read", "head": "read", "tail": "read",
    "read_block": "read", "pipe_file": "write", "pipe": "write", "put_file": "write", "touch": "write",
    "ls": "list", "find": "list", "glob": "list", "du": "list", "listdir": "list",
    "info": "head", "exists": "head", "lexists": "head", "isfile": "head", "isdir": "head", "size": "head",
    "modified": "head", "created": "head", "checksum": "head",
    "rm_file": "delete", "rm": "delete", "rmdir": "delete", "mv": "write", "copy": "write", "cp_file": "write",
}

_local = threading.local()
_fd: list = [None, None]  # ((pid, log name), fd) of the request log


def _log(kind: str, n: int, method: str, path, outcome: str = "ok") -> None:
    name = os.environ.get(ENV_REQUESTS)
    if not name:
        return
    if _fd[0] != (os.getpid(), name):  # a forked worker, or another log named since
        _fd[0], _fd[1] = (os.getpid(), name), os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    p = str(path[0] if isinstance(path, (list, tuple)) and path else path)
    what = "meta" if p.endswith("zarr.json") else ("claim" if "/.claims" in p else "data")
    os.write(_fd[1], f"{time.time():.6f}\t{kind}\t{n}\t{method}\t{what}\t{p}\t{outcome}\t{os.getpid()}\n".encode())


def _counted(method: str, kind: str):
    base = getattr(LocalFileSystem, method)

    def wrapper(self, *args, **kwargs):
        depth = getattr(_local, "depth", 0)
        if depth:  # a call the local implementation makes inside a counted one: not a request
            return base(self, *args, **kwargs)
        _local.depth = 1
        n, failed = 1, "ok"
        try:
            latency = float(os.environ.get(ENV_LATENCY, "0") or 0) / 1000.0
            if latency:
                time.sleep(latency)
            out = base(self, *args, **kwargs)
            if method in ("find", "ls", "listdir"):
                n = max(1, -(-len(out) // PAGE))
            elif method == "cat_ranges":
                n = len(args[0]) if args else len(kwargs.get("paths", []))
            return out
        except Exception:
            failed = "failed"  # a 404 is a request too
            raise
        finally:
            _local.depth = 0
            _log(kind, n, method, args[0] if args else kwargs.get("path", ""), failed)

    wrapper.__name__ = method
    return wrapper


class CountingFileSystem(LocalFileSystem):
    """The local filesystem under ``countfs://``, counting (and optionally slowing) requests."""

    protocol = (PROTOCOL,)
    root_marker = "/"

    def __init__(self, *args, **kwargs):
        kwargs.pop("asynchronous", None)  # zarr asks for an async filesystem; it wraps this one itself
        kwargs["auto_mkdir"] = True  # object stores need no directories
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith(f"{PROTOCOL}://"):
            path = path[len(PROTOCOL) + 3:]
        return LocalFileSystem._strip_protocol(path)

    def unstrip_protocol(self, name: str) -> str:
        return f"{PROTOCOL}://{self._strip_protocol(name)}"

    def open(self, path, mode="rb", *args, **kwargs):
        depth = getattr(_local, "depth", 0)
        if depth:
            return super().open(path, mode, *args, **kwargs)
        _local.depth = 1
        try:
            latency = float(os.environ.get(ENV_LATENCY, "0") or 0) / 1000.0
            if latency:
                time.sleep(latency)
            try:
                f = super().open(path, mode, *args, **kwargs)
            except Exception:
                _log("write" if any(c in mode for c in "wax") else "read", 1, "open", path, "failed")
                raise
            _log("write" if any(c in mode for c in "wax") else "read", 1, "open", path)
            return f
        finally:
            _local.depth = 0


for _m, _k in KINDS.items():
    if hasattr(LocalFileSystem, _m):
        setattr(CountingFileSystem, _m, _counted(_m, _k))


def register() -> None:
    fsspec.register_implementation(PROTOCOL, CountingFileSystem, clobber=True)


register()


# ---- the models -----------------------------------------------------------------------------

_marks = {"calls": 0, "seconds": 0.0, "pid": None}


def _mark(line: str) -> None:
    name = os.environ.get(ENV_MARKS)
    if name:
        with open(name, "a") as f:
            f.write(line + "\n")


def _at_exit() -> None:
    if _marks["pid"] == os.getpid() and _marks["calls"]:
        _mark(f"forward_total\t{_marks['seconds']:.6f}\t{_marks['calls']}\t{os.getpid()}")


class PooledLinear(torch.nn.Module):
    """Logits = W · (the image average-pooled to 2 x 2) + b, with W, b fixed by ``seed``."""

    def __init__(self, num_classes: int, seed: int, scale: float):
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(2)
        self.fc = torch.nn.Linear(12, num_classes)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(num_classes, 12, generator=g) * scale)
            self.fc.bias.copy_(torch.randn(num_classes, generator=g))

    def forward(self, x):
        t0 = time.perf_counter()
        if _marks["pid"] != os.getpid():
            if not bool(x.any()):  # kdcache's probe of the class count (zeros), not a real batch
                return self.fc(self.pool(x).flatten(1))
            _marks.update(calls=0, seconds=0.0, pid=os.getpid())
            _mark(f"first_forward\t{time.time():.6f}\t{os.getpid()}")
            atexit.register(_at_exit)
        out = self.fc(self.pool(x).flatten(1))
        _marks["calls"] += 1
        _marks["seconds"] += time.perf_counter() - t0
        return out


def teacher(num_classes: int = 1000) -> PooledLinear:
    return PooledLinear(num_classes, seed=0, scale=3.0)


def student(num_classes: int = 1000) -> PooledLinear:
    return PooledLinear(num_classes, seed=1, scale=0.1)


# ---- the launcher ---------------------------------------------------------------------------


def open_cache(url: str) -> None:
    """Open a cache as every command starts: the reader (manifest) and its shard groups."""
    from kdcache.cache.store import CacheReader

    r = CacheReader(url)
    print(len(r.shard_names()))


def _report_rss() -> None:
    """At exit: this process's peak RSS and its reaped children's (DataLoader workers), in kB."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    _mark(f"peak_rss_kb\t{max(own, kids)}\t{own}\t{kids}\t{os.getpid()}")


def main(argv: list[str]) -> None:
    atexit.register(_report_rss)
    if argv[:1] == ["--open"]:
        open_cache(argv[1])
        return
    from kdcache.cli import cli

    cli(args=argv, prog_name="kdcache")


if __name__ == "__main__":
    main(sys.argv[1:])
