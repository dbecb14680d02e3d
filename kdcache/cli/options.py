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
