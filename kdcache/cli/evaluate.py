"""`kdcache evaluate`: a run's student on validation shards, exit by exit, with early-exit inference."""

from __future__ import annotations

import json

import click

from ..tools.config import EvaluateConfig
from .options import config_default, workers_option


class FloatList(click.ParamType):
    """``A`` or ``A,B,C``: comma-separated numbers."""

    name = "T1,T2,..."

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        try:
            return [float(x) for x in str(value).split(",")]
        except ValueError:
            self.fail(f"{value!r} is not comma-separated numbers", param, ctx)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--val-data", required=True, help="Validation shards with cls labels (pattern, glob or folder).")
@click.option("--thresholds", type=FloatList(), default=None,
              help="Early exit: a sample leaves at the first shallow exit whose max softmax reaches its threshold; "
                   "one value for every shallow exit or one per exit, comma-separated [default: 0.9 each].")
@click.option("--sweep", is_flag=True,
              help="Also trace accuracy against compute over a grid of shared thresholds and write a PNG "
                   "(RUN_DIR/early_exit.png, or --plot).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Where --sweep writes its PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON (fields in docs/cli.md).")
@click.option("--batch-size", "-b", default=config_default(EvaluateConfig, "batch_size"), show_default=True,
              help="Evaluation batch size.")
@workers_option("DataLoader workers decoding the shards.")
@click.option("--device", default=config_default(EvaluateConfig, "device"), show_default=True,
              help="cuda, cuda:1, cpu, or auto.")
def evaluate(run_dir, val_data, thresholds, sweep, plot, as_json, batch_size, workers, device):
    """Evaluate the student of RUN_DIR (a finished `kdcache train` run) on --val-data.

    \b
    Rebuilds the student from RUN_DIR/config.json and model.pt and reports, at the run's
    resolution on the centre view of every image:
      per exit       top-1 and compute (FLOPs relative to the plain network)
      ensemble       top-1 of the mean of the exits' softmaxes
      early exit     top-1, the share of images leaving at each exit, mean compute per image
    A run without --self-distill has one exit (compute 1.0).
    """
    from ..tools import evaluate as api

    report = api.evaluate_run(run_dir, val_data, thresholds=list(thresholds) if thresholds else None, sweep=sweep,
                              batch_size=batch_size, device=device, workers=workers, plot=plot)
    click.echo(json.dumps(report, indent=2) if as_json else api.format_report(report))
