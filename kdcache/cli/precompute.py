"""`kdcache precompute`: run the teacher once on V seeded views of every image, into a cache."""

from __future__ import annotations

import json

import click

from ..errors import KdcacheError, count
from ..data.views import AugSpec

from ..tools.config import PrecomputeConfig

from .options import (RGB, augmentation, augmentation_options, config_default, per_teacher, per_teacher_option,
                      threads_option, worker_timeout_option, workers_option)


@click.command()
@click.option("--data", required=True, help="Shards: a brace pattern (data/train-{000000..000099}.tar), a glob, or a directory.")
@click.option("--teacher", required=True, multiple=True,
              help="Teacher spec: timm:NAME, torchvision:NAME, py:MODULE:FACTORY, a torch.export .pt2 file "
                   "(exported in eval mode with a dynamic batch dimension) or a TorchScript file. Repeat it for an "
                   "ensemble: every member sees the same views and the cache keeps the top-k of their mean "
                   "probability.")
@per_teacher_option("--teacher-weights", "Teacher weights: a .pt/.pth state dict or .safetensors.", type=click.Path())
@per_teacher_option("--teacher-res", "A teacher's own input resolution [default: --res]; each teacher renders the same "
                    "crop box at its own size.", type=int)
@click.option("--pretrained", is_flag=True, help="Let timm/torchvision fetch their pretrained weights (needs network).")
@per_teacher_option("--random-init", "Use a randomly initialised teacher on purpose (benchmarks, tests), built under "
                    "SEED and recorded in the cache so resume and verify rebuild the same network. A teacher without "
                    "weights is refused otherwise.", type=int, metavar="SEED")
@click.option("--num-classes", type=int, default=None, help="Expected teacher class count (checked; passed to py: factories).")
@click.option("--out", required=True, help="Cache path (a local directory or an fsspec URL), e.g. cache.zarr.")
@click.option("--views", "-V", default=config_default(PrecomputeConfig, 'views'), show_default=True, help="Seeded views per image. Training epoch e replays view e mod V, so a schedule of E epochs uses each "
                   "view E/V times; in docs/study.md a student gained with V up to about E/4 (V=1 was worse than no "
                   "teacher). Cost grows linearly in V: teacher time and cache bytes. View v does not depend on V, "
                   "so re-running on an existing cache with a larger --views grows it in place: only the new views "
                   "are computed (docs/cli.md, 'Growing a cache'). A smaller --views is refused.")
@click.option("--topk", "-k", default=config_default(PrecomputeConfig, 'topk'), show_default=True, help="Teacher outputs kept per view (--targets topk).")
@click.option("--targets", type=click.Choice(["topk", "sample"]), default=config_default(PrecomputeConfig, "targets"),
              show_default=True,
              help="What the cache keeps of the teacher: its top-k log-probs (the loss models the rest by --tail, a "
                   "bias), or --samples classes drawn from its distribution with their counts (Random-Sampling KD: "
                   "unbiased, no tail). The draws are seeded by (--seed, key, view); train reads the kind from the cache.")
@click.option("--samples", default=config_default(PrecomputeConfig, "samples"), show_default=True,
              help="--targets sample: classes drawn per record (with replacement).")
@click.option("--sample-temperature", default=config_default(PrecomputeConfig, "sample_temperature"), show_default=True,
              help="--targets sample: draw from softmax(logits / T). The targets are unbiased for distillation at "
                   "this temperature; train must use the same --temperature.")
@click.option("--compact", is_flag=True,
              help="Compact layout (about half the bytes): log-probs quantised to 1/16 nat against the top-1 (top-k "
                   "mass kept), class ids coded against a per-image class list or stored as they are (the smaller, per "
                   "group), views not stored but re-derived from the seed. Lossy for top-k log-probs (docs/format.md "
                   "gives the bound); plain by default.")
@click.option("--seed", default=config_default(PrecomputeConfig, 'seed'), show_default=True, help="Seed of the view sampler.")
@click.option("--res", default=config_default(PrecomputeConfig, 'res'), show_default=True, help="Teacher input resolution (square).")
@augmentation_options()
@click.option("--center-crop", is_flag=True,
              help="Store the teacher on the evaluation view instead of random crops: the centre square "
                   "(0.875 of the short side), one view per image (--views 1). With `train --student-view fresh` "
                   "this is the fixed-teacher baseline.")
@click.option("--batch-size", "-b", default=config_default(PrecomputeConfig, 'batch_size'), show_default=True, help="Teacher batch size.")
@click.option("--device", default=config_default(PrecomputeConfig, 'device'), show_default=True, help="cuda, cuda:1, cpu, or auto.")
@workers_option("DataLoader workers (each owns whole shards).")
@threads_option()
@worker_timeout_option(PrecomputeConfig)
@per_teacher_option("--mean", "Override input mean R,G,B (default: timm config or ImageNet).", type=RGB)
@per_teacher_option("--std", "Override input std R,G,B.", type=RGB)
@click.option("--shard-index", default=config_default(PrecomputeConfig, 'shard_index'), show_default=True, help="With --num-shard-groups: which group this process writes.")
@click.option("--num-shard-groups", default=config_default(PrecomputeConfig, 'num_shard_groups'), show_default=True, help="Split the shards into this many disjoint groups.")
@click.option("--skip-bad", is_flag=True, help="Record undecodable images in the shard's attributes and go on.")
@click.option("--render", type=click.Choice(["pil", "torch"]), default=config_default(PrecomputeConfig, "render"),
              show_default=True,
              help="Render backend: pil (PIL decodes and resizes in the data workers), or torch (torchvision "
                   "decodes, torch ops crop; on CUDA both run on the GPU, nvJPEG for JPEGs, and the workers only "
                   "read the tar). Recorded in the cache; train, verify and inspect replay with the same backend.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def precompute(**kw):
    """Run the teacher once on seeded views of every image and store its top-k (or classes drawn
    from it, --targets sample) in a Zarr cache.

    Re-running the same command resumes: complete shards are skipped, interrupted ones redone.
    A cache made with another teacher, seed, V, k or augmentation is refused. Under
    `torchrun --nproc_per_node N -m kdcache precompute ...` each rank writes disjoint shards.
    """
    from ..tools.precompute import precompute as run

    given = click.get_current_context().get_parameter_source
    only_for = {"topk": "topk", "samples": "sample", "sample_temperature": "sample"}
    for name, kind in only_for.items():
        if kw["targets"] != kind and given(name) is click.core.ParameterSource.COMMANDLINE:
            flag = "--" + name.replace("_", "-")
            click.echo(f"note: {flag} applies to --targets {kind} only; this run stores --targets {kw['targets']} "
                       f"and does not use it", err=True)
    kw["progress"] = not kw.pop("no_progress")
    for name in ("teacher", "teacher_weights", "teacher_res", "random_init", "mean", "std"):
        kw[name] = per_teacher(kw[name])
    aug = augmentation(kw)
    if kw.pop("center_crop"):
        if aug.mixup:
            raise KdcacheError("--center-crop stores one fixed view per image; it cannot be mixed (drop --mixup)")
        aug = AugSpec(name="center_crop", flip=False)
    s = run(PrecomputeConfig(aug=aug, **kw))
    if s["shards_written"] == 0 and s["shards_skipped"]:
        click.echo(f"all {count(s['shards_skipped'], 'shard')} of this process are already complete in {s['cache']}", err=True)
    else:
        click.echo(
            f"precompute: wrote {count(s['shards_written'], 'shard')} ({count(s['images'], 'image')} x {count(kw['views'], 'view')}"
            f"{', %d bad' % s['bad'] if s['bad'] else ''}) in {s['seconds']:.1f} s, {s['images_per_s']:.1f} img/s"
            f"{'; %d already complete' % s['shards_skipped'] if s['shards_skipped'] else ''} -> {s['cache']}",
            err=True,
        )
    if s["shards_grown"]:
        click.echo(f"precompute: grew {count(s['shards_grown'], 'shard group')} to {kw['views']} views (only the new "
                   "views were computed)" + (f"; {s['cache']} now holds {kw['views']} views per image"
                                             if s["growth_finished"] else
                                             "; other groups are still to grow: re-run this command (or wait for the "
                                             "other processes) to finish the growth"), err=True)
    elif s["growth_finished"]:
        click.echo(f"precompute: {s['cache']} now holds {kw['views']} views per image (growth finished)", err=True)
    if s["shards_held_elsewhere"]:
        held = s["shards_held_elsewhere"]
        click.echo(f"note: {count(len(held), 'shard group')} ({', '.join(held[:5])}{' ...' if len(held) > 5 else ''}) "
                   "are being written by another process and were left to it; re-run this command once it is done "
                   "to make sure every group is complete", err=True)
    click.echo(json.dumps(s))  # the machine-readable summary on stdout
