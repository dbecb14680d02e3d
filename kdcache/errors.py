"""The one exception type users see: a message that names what is wrong and what to do."""


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
