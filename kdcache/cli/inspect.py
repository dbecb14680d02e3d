"""`kdcache inspect`: look inside a cache (summary, one record, a rendered picture). Read-only."""

from __future__ import annotations

import json

import click

from ..learn.losses import TAIL_MODES
from .options import parse_storage_options, storage_options_option
from ..tools.inspection import RELATIONS_TAIL, RELATIONS_TOP, SUMMARY_TOP


@click.command()
@click.argument("cache")
@click.option("--shard", default=None, help="Show one record: the shard group (the data shard's file stem).")
@click.option("--key", default=None, help="Show one record: its sample key (--shard optional: the group holding it is found).")
@click.option("--keys", "list_keys", is_flag=True, help="List the sample keys (of --shard, or of every shard), tab-separated.")
@click.option("--view", type=int, default=None, help="Only this view of the record (default: all; --render: 0).")
@click.option("--render", "render_out", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG of the record's view (needs --shard, --key and --data).")
@click.option("--data", default=None, help="The data shards (pattern, glob or folder); needed by --render.")
@click.option("--top", default=None, type=int,
              help=f"How many of the most frequent top-1 classes to list [{SUMMARY_TOP}]; with --relations, how many "
                   f"of the most confused class pairs [{RELATIONS_TOP}].")
@click.option("--relations", "relations_out", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG of the class relations: the teacher's mean distribution per true class (labels from "
                   "--data's cls), as a heatmap with related classes side by side, or for more than 100 classes the "
                   "most confused pairs ranked. With --json, the numbers.")
@click.option("--tail", type=click.Choice(TAIL_MODES), default=RELATIONS_TAIL, show_default=True,
              help="With --relations: how each record's mass outside its top-k is spread (as train --tail).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (fields in docs/cli.md) instead of text.")
@storage_options_option
def inspect(cache, shard, key, list_keys, view, render_out, data, top, relations_out, tail, as_json, storage_options):
    """Summarise the cache CACHE (a path or an fsspec URL), or show one record.

    \b
    kdcache inspect cache.zarr                                  manifest, shard table, totals
    kdcache inspect cache.zarr --keys --shard train-000003      the keys of one shard
    kdcache inspect cache.zarr --shard train-000003 --key k42   one record, all views
    kdcache inspect cache.zarr --shard S --key K --view 2 --render v.png --data data/train
    kdcache inspect cache.zarr --relations rel.png --data data/train  class relations

    Never writes to the cache.
    """
    from ..tools import inspection as api
    from ..errors import KdcacheError

    opts = parse_storage_options(storage_options)
    if relations_out is not None:
        if data is None:
            raise KdcacheError("--relations needs --data: the shards the cache was made from, for their cls labels")
        if shard is not None or key is not None or list_keys or render_out is not None:
            raise KdcacheError("--relations summarises the whole cache: it does not take --shard, --key, --keys or --render")
        out = api.relations(cache, data, relations_out, tail=tail, top=RELATIONS_TOP if top is None else top,
                            storage_options=opts)
        click.echo(json.dumps(out, indent=2) if as_json else api.format_relations(out))
        return
    if list_keys:
        found = api.list_keys(cache, shard, storage_options=opts)
        if as_json:
            click.echo(json.dumps(found, indent=2))
        else:
            for name, keys in found.items():
                for k in keys:
                    click.echo(f"{name}\t{k}")
        return
    if key is not None and shard is None:
        shard = api.find_key(cache, key, storage_options=opts)
    if shard is not None and key is None:
        raise KdcacheError("--shard and --key go together: --shard needs --key (one record) or --keys (its keys)")
    if shard is None and (view is not None or render_out is not None):
        raise KdcacheError("--view and --render need a record: pass --shard and --key")
    if render_out is not None and data is None:
        raise KdcacheError("--render needs --data: the shards holding the source images")
    if render_out is not None:
        out = api.render_record(cache, shard, key, data, render_out, view=0 if view is None else view,
                                storage_options=opts)
        if as_json:
            click.echo(json.dumps(out, indent=2))
        else:
            click.echo(api.format_record(out))
            for w in out["warnings"]:
                click.echo(f"warning: {w}", err=True)
            click.echo(f"wrote {out['png']} ({out['width']}x{out['height']} px)")
        return
    if shard is not None:
        out = api.record_info(cache, shard, key, view, storage_options=opts)
        click.echo(json.dumps(out, indent=2) if as_json else api.format_record(out))
        return
    out = api.summarize(cache, storage_options=opts, top=SUMMARY_TOP if top is None else top)
    click.echo(json.dumps(out, indent=2) if as_json else api.format_summary(out))
    damaged = [f"shard {e['shard']} views {e['views']} were changed after precompute" for e in out["totals"]["edited"]]
    damaged += [f"shard {e['shard']} has {e['records']} records with {e['what']}" for e in out["totals"]["impossible"]]
    if damaged:
        raise KdcacheError(f"the cache {cache} is damaged: {'; '.join(damaged[:3])}{' ...' if len(damaged) > 3 else ''}. "
                           "Re-run precompute on those shards (delete their groups first)")
