"""`kdcache verify`: re-run the teacher on sampled replayed views and prove the cache matches. Read-only."""

from __future__ import annotations

import json
import sys

import click


from ..tools.config import VerifyConfig
from .options import parse_storage_options, storage_options_option
from .options import config_default, per_teacher, per_teacher_option


@click.command()
@click.argument("cache")
@click.option("--data", required=True, help="The data shards the cache was made from (pattern, glob or folder).")
@click.option("--teacher", required=True, multiple=True,
              help="Teacher spec, as given to precompute; for an ensemble cache, each member's, in the same order.")
@per_teacher_option("--teacher-weights", "Teacher weights file, as given to precompute.", type=click.Path())
@click.option("--num-classes", type=int, default=None, help="Teacher class count (default: the cache's).")
@click.option("--pretrained", is_flag=True, help="As for precompute: let timm/torchvision fetch their weights.")
@click.option("--samples", "-n", default=config_default(VerifyConfig, "samples"), show_default=True, help="(record, view) pairs to re-run.")
@click.option("--device", default=config_default(VerifyConfig, "device"), show_default=True, help="cuda, cuda:1, cpu, or auto.")
@click.option("--seed", default=config_default(VerifyConfig, "seed"), show_default=True, help="Seed for choosing the sampled records.")
@click.option("--batch-size", "-b", default=config_default(VerifyConfig, "batch_size"), show_default=True,
              help="Teacher batch size for format-1 caches; newer caches record precompute's, and verify reruns "
                   "exactly those batches.")
@click.option("--atol", default=config_default(VerifyConfig, "atol"), show_default=True,
              help="Absolute log-prob tolerance, on top of one float16 step (2^-10 x |stored|). The tail mass "
                   "outside the top-k is checked too.")
@click.option("--allow-teacher-mismatch", is_flag=True,
              help="Only warn (do not fail) when the teacher spec or weights hash differ from the cache's.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (fields in docs/cli.md) instead of text.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@storage_options_option
def verify(cache, data, teacher, teacher_weights, num_classes, pretrained, samples, device, seed, batch_size, atol,
           allow_teacher_mismatch, as_json, no_progress, storage_options):
    """Re-run the teacher on randomly chosen replayed views of CACHE and compare with what is stored.

    \b
    Exit codes:
      0  every sampled record agrees within tolerance and the cache covers the data
      1  a record disagrees (listed), or a shard group is missing or incomplete, or a data
         shard has no group in the cache
      2  unusable input (no cache, bad flags, ...)
    Never writes to the cache.
    """
    from ..tools import verify as api

    out = api.verify(
        cache, data, per_teacher(teacher), teacher_weights=per_teacher(teacher_weights), num_classes=num_classes,
        pretrained=pretrained,
        samples=samples,
        device=device, seed=seed, batch_size=batch_size, atol=atol,
        allow_teacher_mismatch=allow_teacher_mismatch, storage_options=parse_storage_options(storage_options),
        progress=not no_progress,
    )
    click.echo(json.dumps(out, indent=2) if as_json else api.format_verify(out))
    sys.exit(0 if out["ok"] else 1)
