"""The `kdcache` command: a thin click layer over the Python API.

Each sub-command lives in its own module here and only parses flags and calls the library.
User errors (``KdcacheError``) print one clear line and exit with code 2; no traceback.
"""

from __future__ import annotations

import sys

import click

from .. import __version__
from ..errors import KdcacheError


class KdcacheGroup(click.Group):
    """A click group that turns ``KdcacheError`` into a message and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KdcacheError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)


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
