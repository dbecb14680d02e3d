"""Flag types shared by several commands."""

from __future__ import annotations

import click


class FloatTuple(click.ParamType):
    """``MIN,MAX`` (or ``A,B,C``): a fixed number of comma-separated floats."""

    def __init__(self, n: int, what: str):
        self.n, self.name = n, what

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            parts = tuple(float(x) for x in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not {self.n} comma-separated numbers", param, ctx)
        if len(parts) != self.n:
            self.fail(f"{value!r} has {len(parts)} values; expected {self.n} ({self.name})", param, ctx)
        return parts


RANGE = FloatTuple(2, "MIN,MAX")
RGB = FloatTuple(3, "R,G,B")


def config_default(config_cls, name: str):
    """The default of a config dataclass field, so a flag and the Python API default alike."""
    import dataclasses

    f = {f.name: f for f in dataclasses.fields(config_cls)}[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def workers_option(help_text: str):
    """-j/--workers with the default every command uses (``runtime.default_workers``); ``--help`` shows
    the rule and what it comes to on this machine."""
    from ..runtime import default_workers

    value = default_workers()
    return click.option("--workers", "-j", default=value, show_default=f"the cores but one, at most 4; {value} here",
                        help=help_text)


def threads_option():
    """--threads: the main process's torch threads (``runtime.set_threads`` picks the default)."""
    return click.option("--threads", type=int, default=None,
                        help="torch threads of the main process [default: the cores less one per --workers, at least "
                             "1]: more threads than cores slows everything down.")


def worker_timeout_option(config_cls):
    """--worker-timeout with the default of ``config_cls``'s ``worker_timeout`` field."""
    return click.option("--worker-timeout", type=float, default=config_default(config_cls, "worker_timeout"),
                        show_default=True,
                        help="Seconds to wait for a batch from the data workers; then stop with the likely cause (a "
                             "worker that cannot ship a batch, e.g. with /dev/shm full, would otherwise stall the job).")


def augmentation_options(what: str = ""):
    """--scale, --ratio, --flip/--no-flip, --mixup/--no-mixup, with ``views.AugSpec``'s defaults.
    ``what`` prefixes each help text (e.g. "Without a cache: "). ``augmentation(kw)`` turns the
    parsed flags into an AugSpec."""
    from ..data.views import AugSpec

    d = AugSpec()

    def deco(f):
        for opt in reversed([
            click.option("--scale", type=RANGE, default=",".join(map(repr, d.scale)), show_default=True,
                         help=f"{what}crop area fraction range MIN,MAX."),
            click.option("--ratio", type=RANGE, default=",".join(map(repr, d.ratio)), show_default=True,
                         help=f"{what}crop aspect-ratio range MIN,MAX."),
            click.option("--flip/--no-flip", default=d.flip, show_default=True, help=f"{what}random horizontal flips."),
            click.option("--mixup/--no-mixup", default=d.mixup, show_default=True,
                         help=f"{what}mix pairs inside each shard (function matching)."),
        ]):
            f = opt(f)
        return f

    return deco


def augmentation(kw: dict):
    """Pop the augmentation flags from a command's keyword arguments; return the AugSpec."""
    from ..data.views import AugSpec

    return AugSpec(scale=tuple(kw.pop("scale")), ratio=tuple(kw.pop("ratio")), flip=kw.pop("flip"),
                   mixup=kw.pop("mixup"))
