"""The `kdcache` command: a thin click layer over the Python API.

Each sub-command lives in its own module here and only parses flags and calls the library.
User errors (``KdcacheError``) print one clear line and exit with code 2; no traceback.
"""

from __future__ import annotations

import errno
import sys

import click

from .. import __version__
from ..errors import KdcacheError


# Storage that ran out: no space, a quota, a file-size limit (RLIMIT_FSIZE / `ulimit -f`; Python
# ignores SIGXFSZ, so such a write fails with EFBIG instead of killing the process).
_FULL = {
    errno.ENOSPC: ("no space left on device", "free some space"),
    getattr(errno, "EDQUOT", -1): ("disk quota exceeded", "free some space or raise the quota"),
    errno.EFBIG: ("file too large (a file-size limit, e.g. `ulimit -f`, or the filesystem's largest file)",
                  "raise the limit"),
}


def storage_full(e: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT / EFBIG OSError in an exception or its causes, if there is one."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL:
            return e
        e = e.__cause__ or e.__context__
    return None


def storage_full_message(e: OSError) -> str:
    what, advice = _FULL[e.errno]
    where = f" while writing {e.filename}" if e.filename else ""
    return (f"{what}{where} ([Errno {e.errno}] {e.strerror}); {advice}, then re-run the same command: it resumes "
            "(precompute keeps every finished shard group and redoes the unfinished one; nothing half written is "
            "kept as finished)")


class KdcacheGroup(click.Group):
    """A click group that turns ``KdcacheError`` into a message and its exit code, and a full
    disk, a quota or a file-size limit into one clean message (exit code 2)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KdcacheError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except Exception as e:
            full = storage_full(e)
            if full is None:
                raise
            click.echo(f"error: {storage_full_message(full)}", err=True)
            sys.exit(KdcacheError.exit_code)


@click.group(cls=KdcacheGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kdcache")
def cli():
    """Consistent knowledge distillation from a cache of teacher outputs.

    \b
    Typical flow:
      kdcache pack IMAGEFOLDER data/ --val-fraction 0.05     ImageFolder -> WebDataset shards
      kdcache precompute --data data/train --teacher timm:resnet50 \\
          --teacher-weights r50.safetensors --out cache.zarr   teacher top-k on V seeded views
      kdcache inspect cache.zarr                             look inside the cache
      kdcache train --data data/train --cache cache.zarr --student timm:resnet18 --out runs/r18
      kdcache verify cache.zarr --data data/train --teacher ...   prove the replay is exact

    Run `kdcache demo` for the whole flow on bundled data, and `kdcache COMMAND --help` for details.
    """


def main():
    cli(prog_name="kdcache")


# Sub-commands register themselves on `cli` when imported.
from . import demo, info, inspect, pack, precompute, train, verify  # noqa: E402,F401
