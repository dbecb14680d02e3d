"""`kdcache pack`: ImageFolder tree → WebDataset train/val shards + classes.json."""

from __future__ import annotations

import click

from ..errors import count




@click.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--shard-size", default=1000, show_default=True, help="Samples per shard.")
@click.option("--val-fraction", default=0.0, show_default=True, help="Fraction of each class held out as val shards.")
@click.option("--seed", default=0, show_default=True, help="Seed for the shuffle and the val split.")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images (listed at the end) instead of stopping.")
@click.option("--overwrite", is_flag=True, help="Replace the shards OUT already holds (they are removed first).")
def pack(src, out, shard_size, val_fraction, seed, skip_bad, overwrite):
    """Convert an ImageFolder tree SRC/<class>/<image> into shards in OUT.

    Writes OUT/train/train-000000.tar ... (and OUT/val/ with --val-fraction), each folder with a
    classes.json. Images are copied byte for byte; samples carry `cls` labels.
    """
    from ..data.shards import pack_imagefolder

    s = pack_imagefolder(src, out, shard_size=shard_size, val_fraction=val_fraction, seed=seed, skip_bad=skip_bad,
                         overwrite=overwrite)
    click.echo(
        f"packed {count(s['train_samples'], 'train sample')} into {count(len(s['train_shards']), 'shard')}"
        + (f" and {count(s['val_samples'], 'val sample')} into {count(len(s['val_shards']), 'shard')}" if s["val_shards"] else "")
        + f" ({s['classes']} classes) under {out}"
    )
    for p in s["skipped"]:
        click.echo(f"skipped unreadable image: {p}", err=True)
