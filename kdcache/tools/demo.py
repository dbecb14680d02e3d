"""The end-to-end demo on scikit-learn's handwritten digits, with no download.

Stages, each an ordinary kdcache call whose outputs stay in ``OUT`` for you to explore:

1. data      digits → JPEG pictures → ``OUT/data/{train,val}/*.tar`` + classes.json   (``pack``'s writer)
2. teacher   a CNN trained on labels                         → ``OUT/runs/teacher``  (``train``, labels only)
3. cache     the teacher on V seeded views with mixup        → ``OUT/cache.zarr``    (``precompute``)
4. students  a small CNN from the cache, and the same CNN on labels, same budget
                                                             → ``OUT/runs/student-kd``, ``OUT/runs/student-labels``
5. report    a table read back from the runs' files, and ``OUT/curves.png``

Re-running into the same ``OUT`` reuses every finished stage (each command's own resume) and
says so.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import click

from ..errors import KdcacheError
from ..data.views import AugSpec

TEACHER = "py:kdcache.models.zoo:teacher_cnn"
STUDENT = "py:kdcache.models.zoo:student_cnn"


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and budgets of one demo run."""

    images: int | None  # None = all 1,797 scans
    shard_size: int
    teacher_epochs: int
    student_epochs: int
    views: int
    topk: int = 5
    res: int = 32
    batch_size: int = 64
    seed: int = 0


FULL = DemoPlan(images=None, shard_size=250, teacher_epochs=12, student_epochs=16, views=8)
QUICK = DemoPlan(images=480, shard_size=120, teacher_epochs=3, student_epochs=2, views=2)

# The digits are small and not mirror-symmetric: milder crops, no flips.
SCALE = (0.35, 1.0)


def _say(msg: str) -> None:
    click.echo(click.style("==> ", fg="cyan", bold=True) + msg)


class _Stages:
    """Wall time per stage, kept in OUT/stages.json so a re-run reports what it reused."""

    def __init__(self, out: Path):
        self.path = out / "stages.json"
        self.times = json.loads(self.path.read_text()) if self.path.exists() else {}

    def run(self, name: str, done: bool, fn):
        if done and name in self.times:
            _say(f"{name}: already done in an earlier run, reusing it")
            self.times[name]["reused"] = True
            return None
        t0 = time.perf_counter()
        result = fn()
        self.times[name] = {"seconds": time.perf_counter() - t0, "reused": False}
        self.path.write_text(json.dumps(self.times, indent=1))
        return result


def _train_config(plan: DemoPlan, out: Path, name: str, student: str, epochs: int, device: str, workers: int,
                  progress: bool, **kw):
    from ..learn.trainer import TrainConfig

    run = out / "runs" / name
    return TrainConfig(
        data=str(out / "data" / "train"), student=student, out=str(run), num_classes=10, epochs=epochs,
        batch_size=plan.batch_size, lr=3e-3, weight_decay=0.01, warmup_steps=20, res=plan.res,
        val_data=str(out / "data" / "val"), workers=workers, device=device, seed=plan.seed,
        aug=AugSpec(scale=SCALE, flip=False), resume=True, progress=progress, **kw,
    )


def _finished(run: Path) -> bool:
    return (run / "summary.json").exists()


def _cache_complete(path: Path) -> bool:
    """True when a cache exists and every shard its manifest lists is complete."""
    from ..cache.store import CacheReader

    if not path.exists():
        return False
    try:
        reader = CacheReader(str(path))
    except KdcacheError:
        return False
    return all(reader.is_complete(name) for name in reader.manifest["shards"])


def _read_summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _val_curve(run: Path) -> list[tuple[int, float]]:
    """(epoch, val top-1) pairs from a run's metrics.jsonl."""
    points = {}
    with open(run / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if row.get("val_top1") is not None:
                points[int(row["epoch"])] = float(row["val_top1"])
    return sorted(points.items())


def plot_curves(out: Path, runs: dict[str, Path]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, run in runs.items():
        pts = _val_curve(run)
        ax.plot([e + 1 for e, _ in pts], [100 * a for _, a in pts], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("student on digits: cached KD vs labels only")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def run_demo(out: str | Path = "kdcache-demo", quick: bool = False, device: str = "auto", workers: int | None = None,
             progress: bool = True) -> dict:
    """Run every stage (reusing finished ones) and return the report's figures."""
    from .demo_data import build_digits_dataset
    from .inspection import format_summary, summarize
    from .precompute import PrecomputeConfig, precompute
    from ..learn.trainer import train

    from ..runtime import default_workers

    workers = default_workers() if workers is None else workers
    plan = QUICK if quick else FULL
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan_file = out / "plan.json"
    plan_dict = plan.__dict__
    if plan_file.exists() and json.loads(plan_file.read_text()) != plan_dict:
        raise KdcacheError(
            f"{out} holds a demo run with other settings ({'quick' if not quick else 'full'} mode); "
            "use another --out or delete it"
        )
    plan_file.write_text(json.dumps(plan_dict, indent=1))
    stages = _Stages(out)
    data, runs, cache = out / "data", out / "runs", out / "cache.zarr"

    _say(f"1/5 data: scikit-learn digits as JPEG shards in {data}")
    stages.run(
        "data", (data / "val" / "classes.json").exists(),
        lambda: build_digits_dataset(data, shard_size=plan.shard_size, seed=plan.seed, limit=plan.images),
    )

    _say(f"2/5 teacher: {TEACHER} trained on labels for {plan.teacher_epochs} epochs")
    stages.run(
        "teacher", _finished(runs / "teacher"),
        lambda: train(_train_config(plan, out, "teacher", TEACHER, plan.teacher_epochs, device, workers, progress)),
    )

    _say(f"3/5 cache: the teacher on {plan.views} seeded views per image, with mixup, top-{plan.topk}")
    pc = PrecomputeConfig(
        data=str(data / "train"), teacher=TEACHER, teacher_weights=str(runs / "teacher" / "model.pt"),
        num_classes=10, out=str(cache), views=plan.views, topk=plan.topk, seed=plan.seed, res=plan.res,
        aug=AugSpec(scale=SCALE, flip=False, mixup=True), batch_size=256, workers=workers, device=device,
        progress=progress,
    )
    stages.run("cache", _cache_complete(cache), lambda: precompute(pc))
    summary = summarize(str(cache))
    click.echo(format_summary(summary))

    kd_epochs = plan.student_epochs
    _say(f"4/5 students: {STUDENT} for {kd_epochs} epochs, from the cache and from labels")
    kd = _train_config(plan, out, "student-kd", STUDENT, kd_epochs, device, workers, progress, cache=str(cache))
    stages.run("student-kd", _finished(runs / "student-kd"), lambda: train(kd))
    stages.run(
        "student-labels", _finished(runs / "student-labels"),
        # Same views (mixup included) from the same cache, cross-entropy on the (mixed) labels only.
        lambda: train(_train_config(plan, out, "student-labels", STUDENT, kd_epochs, device, workers, progress,
                                    cache=str(cache), mode="labels")),
    )

    _say("5/5 report")
    report = build_report(out, summary)
    click.echo(format_report(report))
    if quick:
        click.echo(QUICK_NOTE)
    curves = plot_curves(out, {"cached KD": runs / "student-kd", "labels only": runs / "student-labels"})
    click.echo(f"\nvalidation curves: {curves}")
    click.echo(next_steps(out, kd, pc))
    return report


QUICK_NOTE = (f"\nnote: --quick is a smoke run, not a result: {QUICK.images} images and {QUICK.student_epochs} student "
              "epochs show that every stage works, but the accuracies above are noise (distillation may land below "
              "labels). Run `kdcache demo` without --quick for figures that mean something.")


def build_report(out: Path, cache_summary: dict) -> dict:
    """The demo's table, read back from the runs' summary files and stages.json."""
    runs = out / "runs"
    stages = json.loads((out / "stages.json").read_text())
    rows = {}
    for name, label in (("teacher", "teacher (labels)"), ("student-labels", "student, labels only"),
                        ("student-kd", "student, cached KD")):
        s = _read_summary(runs / name)
        rows[name] = {
            "label": label, "val_top1": s["final_val_top1"], "best_val_top1": s.get("best_val_top1"),
            "images_per_s": s["images_per_s"], "epochs": s["epochs"],
        }
    totals = cache_summary["totals"]
    report = {
        "rows": rows,
        "stage_seconds": {k: v["seconds"] for k, v in stages.items()},
        "stage_reused": {k: v.get("reused", False) for k, v in stages.items()},
        "cache_bytes_per_record": totals.get("bytes_per_record"),
        "cache_records": totals.get("records"),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def format_report(r: dict) -> str:
    lines = ["", f"{'model':26s} {'val top-1':>10s} {'best':>8s} {'img/s':>8s}", "-" * 56]
    for row in r["rows"].values():
        best = row["best_val_top1"]
        lines.append(
            f"{row['label']:26s} {100 * row['val_top1']:9.1f}% "
            f"{(100 * best if best is not None else float('nan')):7.1f}% {row['images_per_s']:8.0f}"
        )
    lines += ["", "stage wall time:"]
    for name, sec in r["stage_seconds"].items():
        lines.append(f"  {name:16s} {sec:7.1f} s" + ("   (reused)" if r["stage_reused"].get(name) else ""))
    bpr = r["cache_bytes_per_record"]
    lines.append(f"cache: {r['cache_records']} records, {bpr:.1f} bytes per record on disk" if bpr else "")
    return "\n".join(lines)


def kdcache_command() -> tuple[str, str]:
    """How to run ``kdcache`` from the user's shell: the bare name when it is on the PATH (the
    same executable as this one), else the path to this environment's script, with a hint."""
    import shutil
    import sys

    here = Path(sys.executable).parent / "kdcache"
    found = shutil.which("kdcache")
    if found and Path(found).resolve() == here.resolve():
        return "kdcache", ""
    rel = os.path.relpath(here)
    exe = str(here) if rel.startswith("..") else rel
    activate = Path(sys.executable).parent / "activate"
    how = (f"  (`kdcache` is not on your PATH: run `source {os.path.relpath(activate)}` first to type it bare, "
           "or copy the commands as they are)\n") if activate.exists() else ""
    return exe, how


def train_flags(cfg, always=("workers",)) -> list[str]:
    """The `kdcache train` arguments that make ``cfg`` (a TrainConfig): every setting that differs from
    its default, and those in ``always`` (the data workers decide the batch order, so a command
    printed for another machine must carry them). ``--resume`` is left out: a printed command starts
    its own run."""
    import dataclasses

    from ..data.views import AugSpec

    args: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name == "resume" or (value == default and f.name not in always):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "aug":
            base = AugSpec()
            for part in ("scale", "ratio"):
                if getattr(value, part) != getattr(base, part):
                    args += [f"--{part}", ",".join(repr(float(x)) for x in getattr(value, part))]
            for part in ("flip", "mixup"):
                if getattr(value, part) != getattr(base, part):
                    args.append(f"--{'' if getattr(value, part) else 'no-'}{part}")
        elif f.name == "progress":
            args.append("--no-progress")
        elif isinstance(value, bool):
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            args += [flag, ",".join(str(x) for x in value)]
        else:
            args += [flag, str(value)]
    return args


def shell_lines(words: list[str], indent: str = "  ", width: int = 100) -> str:
    """A command for the shell, quoted, broken with backslashes before a flag when a line gets long."""
    import shlex

    lines, line = [], indent
    for i, word in enumerate(words):
        piece = shlex.quote(word)
        starts_flag = word.startswith("--") and i > 1
        if starts_flag and len(line) + len(piece) + 20 > width:
            lines.append(line + " \\")
            line = indent + "    "
        line += ("" if line.endswith(" ") else " ") + piece
    return "\n".join(lines + [line])


def next_steps(out: Path, kd_cfg=None, pc_cfg=None) -> str:
    """What the demo prints at its end: commands on its own files. The train command is the demo's
    cached-KD student (``kd_cfg``, the TrainConfig the demo ran) into a new run folder, so it
    reproduces the demo's figure; verify runs on the device the cache was made on (``pc_cfg``)."""
    import dataclasses

    from ..cache.store import CacheReader

    rel = os.path.relpath(out)
    rel = str(out) if rel.startswith("..") else rel
    reader = CacheReader(str(out / "cache.zarr"))
    shard = reader.shard_names()[0]
    key = str(reader.keys(shard)[0])
    kd, how = kdcache_command()
    device = getattr(pc_cfg, "device", "auto")
    verify = [kd, "verify", f"{rel}/cache.zarr", "--data", f"{rel}/data/train", "--teacher", TEACHER,
              "--teacher-weights", f"{rel}/runs/teacher/model.pt", "--num-classes", "10"]
    verify += ["--device", device] if device != "auto" else []
    text = f"""
Everything is in {rel}/. Explore it with the other commands:
{how}  {kd} inspect {rel}/cache.zarr
  {kd} inspect {rel}/cache.zarr --shard {shard} --key {key} --view 1
  {kd} inspect {rel}/cache.zarr --shard {shard} --key {key} --render {rel}/record.png --data {rel}/data/train
{shell_lines(verify)}
"""
    if kd_cfg is not None:
        mine = dataclasses.replace(
            kd_cfg, data=f"{rel}/data/train", cache=f"{rel}/cache.zarr", val_data=f"{rel}/data/val",
            out=f"{rel}/runs/my-student", progress=True)
        text += ("The cached-KD student again, with the demo's settings, into a run of its own (add --mode labels for "
                 "the labels-only one; change one flag at a time to see what it does):\n"
                 f"{shell_lines([kd, 'train', *train_flags(mine)])}\n")
    return text
