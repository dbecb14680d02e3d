"""The one exception type users see: a message that names what is wrong and what to do."""

import errno
from contextlib import contextmanager


class KdcacheError(Exception):
    """A problem with the user's input (data, cache, model spec, flags).

    The CLI prints the message without a traceback and exits with ``exit_code`` (2 by default).
    """

    exit_code = 2


class BadImageError(KdcacheError):
    """An image in a shard could not be decoded. Carries the shard URL and sample key."""

    def __init__(self, shard: str, key: str, cause: str):
        self.shard, self.key, self.cause = shard, key, cause
        super().__init__(
            f"cannot decode image {key!r} in shard {shard}: {cause}. "
            "Fix or remove the sample, or pass --skip-bad to record it and continue."
        )


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``1 shard``, ``3 shards`` (``plural`` for irregular nouns)."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"


def size_text(width: int, height: int) -> str:
    """An image size as every message writes it: width first, like PIL and image viewers."""
    return f"{width}x{height} px (WxH)"


# Storage that ran out (no space, a quota, a file-size limit): the CLI reports these itself, with how
# to resume (kdcache.cli.storage_full_message), so ``writing`` lets them through.
STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG})


@contextmanager
def writing(path, flag: str):
    """Turn an OSError raised while kdcache first writes to ``path`` (a read-only file system, a path
    under a regular file, a folder without write permission, ``/proc``) into one message naming the
    path, the flag that gave it and the system's reason."""
    try:
        yield
    except OSError as e:
        if e.errno in STORAGE_FULL_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
        reason = e.strerror or type(e).__name__
        raise KdcacheError(f"cannot write {flag} {path}: {reason}{where}; choose a path where you can create files")\
            from None
