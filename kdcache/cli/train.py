"""`kdcache train`: train a student on replayed views, from a cache, a live teacher, or labels."""

from __future__ import annotations

import json

import click

from ..learn.config import AMP_MODES, MODES, OPTIMIZERS, STUDENT_VIEWS, TrainConfig
from ..learn.live import DEFAULT_TOPK
from ..learn.losses import BACKENDS as LOSS_BACKENDS, TAIL_MODES
from ..learn.signals import SIGNALS

from .options import (augmentation, augmentation_options, config_default, per_teacher, per_teacher_option, self_distill,
                      self_distill_options, threads_option, worker_timeout_option, workers_option)


@click.command()
@click.option("--data", required=True, help="Training shards: a brace pattern, a glob, or a directory.")
@click.option("--cache", default=None, help="Cache made by `kdcache precompute` on these shards (cached-teacher mode).")
@click.option("--teacher", default=None, multiple=True,
              help="Live teacher spec (live mode), as for precompute: timm:NAME, torchvision:NAME, py:MODULE:FACTORY, "
                   "a .pt2 export or a TorchScript file; run on the same replayed views. Repeat it for a live "
                   "ensemble (the mean of the teachers' probabilities, as an ensemble cache stores it).")
@per_teacher_option("--teacher-weights", "Live teacher weights (.pt/.pth/.safetensors); with --spot-check, the cache's "
                    "teacher's weights.", type=click.Path())
@per_teacher_option("--teacher-random-init", "Live mode: a randomly initialised teacher on purpose, built under SEED "
                    "[default: the cache's seed when the cache was made with one].", type=int, metavar="SEED")
@click.option("--mode", type=click.Choice(MODES), default=config_default(TrainConfig, 'mode'), show_default=True,
              help="auto: live with --teacher, cached with --cache, else labels. `labels` with --cache trains on "
                   "the cache's views with cross-entropy only.")
@click.option("--student", required=True, help="Student spec: timm:NAME, torchvision:NAME, py:MODULE:FACTORY, a torch.export .pt2 file or a TorchScript file.")
@click.option("--student-weights", type=click.Path(), default=None, help="Initial student weights (e.g. a previous run's model.pt).")
@click.option("--num-classes", type=int, default=None, help="Class count (default: the cache's, the teacher's, or classes.json).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (config, metrics, checkpoints, summary).")
@click.option("--epochs", default=config_default(TrainConfig, 'epochs'), show_default=True, help="Epochs; epoch e replays view e mod V.")
@click.option("--batch-size", "-b", default=config_default(TrainConfig, 'batch_size'), show_default=True, help="Batch size per process.")
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: 1e-3 adamw, 0.1 sgd].")
@click.option("--min-lr", type=float, default=config_default(TrainConfig, 'min_lr'), show_default=True, help="Learning rate at the end of the cosine.")
@click.option("--weight-decay", default=config_default(TrainConfig, 'weight_decay'), show_default=True, help="Weight decay (not on biases and norm weights).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=config_default(TrainConfig, 'optimizer'), show_default=True)
@click.option("--momentum", default=config_default(TrainConfig, 'momentum'), show_default=True, help="SGD momentum.")
@click.option("--warmup-steps", default=config_default(TrainConfig, 'warmup_steps'), show_default=True, help="Linear warm-up steps before the cosine.")
@click.option("--temperature", "-T", default=config_default(TrainConfig, 'temperature'), show_default=True, help="Distillation temperature.")
@click.option("--tail", type=click.Choice(TAIL_MODES), default=config_default(TrainConfig, 'tail'), show_default=True,
              help="How the teacher's mass outside the top-k is modelled.")
@click.option("--loss-backend", type=click.Choice(LOSS_BACKENDS), default=config_default(TrainConfig, "loss_backend"),
              show_default=True,
              help="The KD loss: auto (the fused Triton kernel for CUDA logits when Triton imports, else PyTorch), "
                   "torch (the PyTorch reference everywhere), triton (the kernel; fails where it cannot run).")
@click.option("--kd-signal", type=click.Choice(tuple(SIGNALS)), default=config_default(TrainConfig, "kd_signal"),
              show_default=True,
              help="Cached mode: what the student learns from the cache. full: the stored targets. Derived from them "
                   "and the shards' cls labels (docs/losses.md): smoothing (the label smoothed by the teacher's mean "
                   "mass off the true class), relations (the teacher's mean distribution of the record's class), "
                   "reweight (the label, each record weighted by the teacher's true-class probability), and the "
                   "combinations. Not with --mixup caches.")
@click.option("--label-weight", default=config_default(TrainConfig, 'label_weight'), show_default=True, help="Weight of the cross-entropy on labels (needs cls).")
@click.option("--res", type=int, default=None, help="Student input resolution [default: the cache's, else 224].")
@per_teacher_option("--teacher-res", "Live teacher resolution [default: the cache's, else --res].", type=int)
@click.option("--topk", type=int, default=None, help=f"Live teacher top-k [default: the cache's k, else {DEFAULT_TOPK}].")
@click.option("--val-data", default=None, help="Validation shards with cls labels (top-1/top-5).")
@click.option("--val-batch-size", type=int, default=None, help="Validation batch size [default: --batch-size].")
@click.option("--eval-every", default=config_default(TrainConfig, 'eval_every'), show_default=True, help="Evaluate every N steps too (0: only at epoch ends).")
@click.option("--eval-epochs", default=config_default(TrainConfig, "eval_epochs"), show_default=True,
              help="Evaluate at the end of every N-th epoch and of the last (long schedules on small data).")
@click.option("--checkpoint-every", default=config_default(TrainConfig, 'checkpoint_every'), show_default=True, help="Checkpoint every N steps (and at each epoch end).")
@click.option("--log-every", default=config_default(TrainConfig, 'log_every'), show_default=True, help="Write a metrics line every N steps.")
@workers_option("DataLoader workers (each owns whole shards).")
@threads_option()
@worker_timeout_option(TrainConfig)
@click.option("--device", default=config_default(TrainConfig, 'device'), show_default=True, help="cuda, cuda:1, cpu, or auto.")
@click.option("--seed", default=config_default(TrainConfig, 'seed'), show_default=True, help="Seed: student init, shard order, shuffle buffer.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint (a fresh run if none).")
@click.option("--amp", type=click.Choice(AMP_MODES), default=config_default(TrainConfig, 'amp'), show_default=True,
              help="Mixed precision on CUDA (CPU always trains in float32).")
@click.option("--channels-last", is_flag=True, help="channels_last memory format.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the student.")
@click.option("--grad-clip", type=float, default=None, help="Clip the gradient norm to this value.")
@click.option("--shuffle-buffer", default=config_default(TrainConfig, 'shuffle_buffer'), show_default=True, help="Records in each worker's shuffle buffer.")
@click.option("--views", type=int, default=None,
              help="Without a cache: V views per image, epoch e uses view e mod V [default: a fresh view every epoch].")
@click.option("--views-used", type=int, default=None, metavar="N",
              help="With --cache: replay only the cache's first N views (epoch e uses view e mod N) [default: all "
                   "V]. One cache of V views then serves a sweep over the view budget; view v does not depend on V.")
@click.option("--view-seed", type=int, default=None, help="Seed of the views the trainer draws itself (without a cache, or with --student-view fresh) [default: --seed].")
@augmentation_options("The trainer's own views (without a cache, or --student-view fresh): ")
@click.option("--skip-bad", is_flag=True,
              help="Without --cache: decode every image once before training, leave the undecodable ones out "
                   "(counted and named in summary.json) and go on, instead of stopping at the first. "
                   "Changes nothing with --cache: the cache already records its bad images, which are always "
                   "left out.")
@click.option("--student-view", type=click.Choice(STUDENT_VIEWS), default=config_default(TrainConfig, "student_view"),
              show_default=True,
              help="With --cache: `cache` shows the student the view the teacher saw (consistent teaching); `fresh` "
                   "draws it its own crop each epoch (--scale/--ratio/--flip, seeded by --view-seed) against the "
                   "cache's targets (independent views; with a `precompute --center-crop` cache, the fixed-teacher "
                   "baseline).")
@click.option("--allow-edited-cache", is_flag=True,
              help="Train on cache views that no longer match the digests precompute recorded (edited after "
                   "precompute); refused otherwise. An edited manifest field and NaN/+inf targets stay refused.")
@click.option("--stop-after", type=int, default=None,
              help="Stop after N steps (global, counted from the start of the run) with a checkpoint and exit 0; "
                   "continue by re-running the same command with --resume instead of --stop-after.")
@click.option("--spot-check", type=float, default=config_default(TrainConfig, "spot_check"), show_default=True,
              metavar="FRACTION",
              help="Re-run the cache's teacher (its spec from the cache, --teacher-weights its weights) on this "
                   "fraction of the steps, on the very views being trained, and compare with the stored targets as "
                   "verify does; max/mean |delta log-prob| and top-1 agreement go to metrics.jsonl and summary.json. "
                   "A disagreement stops the run with exit 1, naming shard, key and view. 0.01 costs about 1% of a "
                   "live teacher.")
@click.option("--spot-check-warn", is_flag=True,
              help="With --spot-check: count and report disagreements instead of stopping.")
@self_distill_options()
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train(**kw):
    """Train a student on the exact views a cache was made on.

    \b
    Modes (recorded in the run):
      cached  --cache C          targets from the cache (the teacher never runs)
      live    --teacher SPEC     the teacher runs on the same replayed views (with --cache: the
                                 cache's views; without: views drawn from --view-seed)
      labels  (neither)          cross-entropy on the shards' cls labels

    Writes config.json, metrics.jsonl, checkpoint.pt, model.pt and summary.json into --out.
    Under `torchrun --nproc_per_node N -m kdcache train ...` it trains with DDP.
    """
    from ..learn.trainer import train as run

    kw["compile"] = kw.pop("compile_")
    for name in ("teacher", "teacher_weights", "teacher_random_init", "teacher_res"):
        kw[name] = per_teacher(kw[name])
    kw["progress"] = not kw.pop("no_progress")
    s = run(TrainConfig(aug=augmentation(kw), self_distill=self_distill(kw), **kw))
    if "stopped_at" in s:  # a planned stop (--stop-after): not an error
        click.echo(
            f"train ({s['mode']}): stopped after step {s['stopped_at']} of {s['total_steps']} (--stop-after "
            f"{kw['stop_after']}, epoch {s['epoch']}); checkpoint {s['checkpoint']}. To continue, re-run the same "
            f"command with --resume (in place of --stop-after {kw['stop_after']}, or with a larger N)",
            err=True,
        )
        click.echo(json.dumps(s))
        return
    if s.get("final_val_top1") is not None:
        val = f", val top-1 {100 * s['final_val_top1']:.1f}% (best {100 * s['best_val_top1']:.1f}%)"
    else:
        val = ""
    click.echo(
        f"train ({s['mode']}): {s['epochs']} epochs, {s['steps']} steps{val}, {s['images_per_s']:.0f} img/s, "
        f"{s['wall_time_s']:.1f} s -> {kw['out']}/model.pt, summary.json",
        err=True,
    )
    click.echo(json.dumps(s))  # the machine-readable summary on stdout
