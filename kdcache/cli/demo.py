"""`kdcache demo`: the whole flow on scikit-learn's bundled digits, no download."""

from __future__ import annotations

import click

from .options import workers_option




@click.command()
@click.option("--out", default="kdcache-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where every artifact goes (shards, cache, runs, curves.png). Re-running reuses finished stages.")
@click.option("--quick", is_flag=True,
              help="A smoke run that finishes in about a minute on a 2-core CPU: it shows that every stage works; "
                   "its accuracies are too small a run to mean anything.")
@click.option("--device", default="auto", show_default=True, help="cuda, cpu, or auto (a GPU when one is present).")
@workers_option("DataLoader workers per stage.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def demo(out, quick, device, workers, no_progress):
    """Pack digits into shards, train a teacher, precompute a cache, distil a student, compare.

    \b
    1. data      1,797 scikit-learn digit scans as JPEG WebDataset shards (train/val, cls labels)
    2. teacher   a CNN trained on labels
    3. cache     the teacher on V seeded views per image with mixup (then `inspect`'s summary)
    4. students  a small CNN from the cache, and the same CNN on labels only, same budget
    5. report    accuracy table, stage times, cache bytes per record, OUT/curves.png
    """
    from ..tools.demo import run_demo

    run_demo(out, quick=quick, device=device, workers=workers, progress=not no_progress)
