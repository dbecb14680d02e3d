"""``kdcache evaluate``: a finished run's student on validation shards, exit by exit.

``evaluate_run(run_dir, val_data, ...)`` rebuilds the student from ``RUN_DIR/config.json`` (spec,
classes, resolution, normalisation, and the self-distillation settings that shape the multi-exit
wrapper) and ``RUN_DIR/model.pt``, runs the centre view of every validation image at the run's
resolution (``validation.val_logits``, the trainer's own evaluation loop) and reports:

- **per exit**: top-1, and the compute of running it alone (FLOPs of the backbone up to its stage
  plus its head) relative to the plain network's forward;
- **the ensemble** of the exits: the argmax of the mean of their softmaxes (it runs every exit);
- **early exit**: a sample leaves at the first shallow exit whose max softmax is ≥ that exit's
  threshold, else at the deepest. Accuracy, the share leaving at each exit, and the mean compute
  per sample: an exit's cost is the backbone up to its stage plus every exit head evaluated on the
  way (its own included), over the plain network's FLOPs (``torch.utils.flop_counter``, one image
  at the run's resolution). A sample that reaches the deepest exit costs more than 1.0: it paid
  for the shallow heads it passed.
- with ``sweep``: the accuracy/compute curve over a grid of shared thresholds (and the given
  per-exit ones), and a PNG of it.

A plain single-exit run reports its one exit (compute 1.0); ``thresholds`` and ``sweep`` are refused
for it (there is nothing to leave early from). The early-exit decisions are simulated
from one pass of every exit over the data (the accuracy and the shares are exactly those of a real
early-exit forward; the compute is counted, not timed).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from ..data.shards import expand_urls
from ..errors import KdcacheError
from .config import EvaluateConfig
from ..learn.config import run_self_distill
from ..learn.replay import prepare_shards
from ..learn.student import build_student
from ..learn.tasks import StudentInput
from ..learn.validation import ValStream, val_logits
from ..models.exits import exit_costs, is_multi_exit, plain_cost_profile
from ..models.factory import normalization, torch_load
from ..runtime import resolve_device

SWEEP_GRID = tuple(sorted({round(0.05 * i, 2) for i in range(21)} | {0.975, 0.99, 0.995, 0.999, 1.01}))
DEFAULT_THRESHOLD = 0.9


def early_exit(conf: torch.Tensor, correct: torch.Tensor, thresholds, costs, full: float) -> dict:
    """Early-exit bookkeeping over N samples and E exits (shallow to deep).

    ``conf`` (N, E): each exit's max softmax; ``correct`` (N, E): whether its argmax is the label;
    ``thresholds``: E−1 values (one per shallow exit; a single value is used for all); ``costs``: E
    FLOPs of reaching each exit (``exits.exit_costs(...)["cumulative"]``); ``full``: the plain
    network's FLOPs. A sample leaves at the first shallow exit i with ``conf[:, i] >= thresholds[i]``,
    else at the deepest. Returns ``top1``, ``share`` (E fractions summing to 1), ``compute`` (mean
    cost over ``full``), ``flops_per_sample`` and ``thresholds``."""
    N, E = conf.shape
    th = [float(t) for t in (thresholds if isinstance(thresholds, (list, tuple)) else [thresholds])]
    if E == 1:
        th = []  # a single exit: every sample leaves there
    elif len(th) == 1:
        th = th * (E - 1)
    if len(th) != E - 1:
        raise KdcacheError(f"{len(th)} thresholds for {E - 1} shallow exit{'s' if E != 2 else ''}; give one value or one "
                           "per shallow exit")
    where = torch.full((N,), E - 1, dtype=torch.long)
    left = torch.zeros(N, dtype=torch.bool)
    for i in range(E - 1):
        go = ~left & (conf[:, i] >= th[i])
        where[go] = i
        left |= go
    hits = correct.gather(1, where.unsqueeze(1)).squeeze(1)
    counts = torch.bincount(where, minlength=E).double()
    share = (counts / max(N, 1)).tolist()
    c = torch.tensor([float(x) for x in costs], dtype=torch.float64)
    flops = float((counts * c).sum() / max(N, 1))
    return {"thresholds": th, "top1": float(hits.double().mean()) if N else 0.0, "share": share,
            "compute": flops / float(full), "flops_per_sample": flops}


def _read_run(run_dir: str) -> dict:
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise KdcacheError(f"{run_dir} is not a kdcache run directory: it has no config.json")
    with open(path) as f:
        cfg = json.load(f)
    if "resolved" not in cfg or "student" not in cfg:
        raise KdcacheError(f"{path} is not a kdcache train config (no student or resolved settings)")
    return cfg


def load_student(run_dir: str, device: str | torch.device = "cpu"):
    """The run's student, weights loaded, in eval mode: ``(model, config)``; a ``exits.MultiExit``
    for a self-distilled run, else the plain model."""
    cfg = _read_run(run_dir)
    weights = os.path.join(run_dir, "model.pt")
    if not os.path.isfile(weights) and os.path.isfile(os.path.join(run_dir, "student.pt")):
        weights = os.path.join(run_dir, "student.pt")  # runs of kdcache before 2026-11-24 named it so
    if not os.path.isfile(weights):
        more = (" (the run has a checkpoint.pt: it was stopped before its end; finish it with `kdcache train ... "
                "--resume`)") if os.path.isfile(os.path.join(run_dir, "checkpoint.pt")) else ""
        raise KdcacheError(f"{run_dir} has no model.pt{more}")
    r = cfg["resolved"]
    num_classes, res = int(r["num_classes"]), int(r["res"])
    sd = run_self_distill(cfg)
    _, model = build_student(cfg["student"], num_classes, res, classes_from=f"{run_dir}/config.json says {num_classes}",
                             exits=sd.exits if sd is not None else None)
    state = torch_load(weights, "weights file")
    try:
        model.load_state_dict(state)
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KdcacheError(f"{weights} does not fit the student config.json describes: {detail}") from None
    return model.to(resolve_device(str(device))).eval(), cfg


@torch.no_grad()
def collect(model, cfg: dict, val_data, batch_size: int = 128, workers: int = 0, device=None):
    """One pass over the validation shards (``validation.val_logits``, the trainer's loop): per exit
    the max softmax and whether the argmax is right, and whether the ensemble (mean softmax) is
    right. Returns ``(conf, correct, ens_correct)``."""
    r = cfg["resolved"]
    C, res = int(r["num_classes"]), int(r["res"])
    mean, std = r.get("student_mean"), r.get("student_std")
    if mean is None or std is None:
        mean, std = normalization(getattr(model, "model", model))
    device = device or next(model.parameters()).device
    shards = prepare_shards(expand_urls(val_data), None, True, 0, 1, num_classes=C)
    stream = ValStream(shards, res, batch_size, 0, 1)
    confs, rights, ens = [], [], []
    for zs, y in val_logits(model, stream, StudentInput(tuple(mean), tuple(std), device), C, workers):
        ps = [F.softmax(z, dim=-1) for z in zs]
        c, a = zip(*[p.max(dim=-1) for p in ps])
        confs.append(torch.stack(c, 1).cpu())
        rights.append(torch.stack([ai.eq(y) for ai in a], 1).cpu())
        ens.append(torch.stack(ps).mean(0).argmax(-1).eq(y).cpu())
    if not confs:
        raise KdcacheError(f"--val-data {val_data} holds no images")
    return torch.cat(confs), torch.cat(rights), torch.cat(ens)


def evaluate_run(run_dir: str, val_data, **options) -> dict:
    """The report of ``kdcache evaluate`` (module doc). ``options`` are ``EvaluateConfig``'s fields
    (thresholds, sweep, plot, batch_size, workers, device; their defaults are there); with ``sweep``
    the report also holds ``sweep`` (a list of points) and ``plot`` (the PNG's path, default
    ``RUN_DIR/early_exit.png``)."""
    ec = EvaluateConfig(run_dir, val_data, **options)
    thresholds, sweep, plot = ec.thresholds, ec.sweep, ec.plot
    model, cfg = load_student(run_dir, ec.device)
    res = int(cfg["resolved"]["res"])
    multi = is_multi_exit(model)
    if not multi and (sweep or thresholds is not None):
        given = " and ".join(f for f, on in (("--thresholds", thresholds is not None), ("--sweep", sweep)) if on)
        raise KdcacheError(
            f"{given}: {run_dir} is a single-exit run (trained without --self-distill), where every image leaves at "
            "its one exit, so there is no early exit to tune; evaluate it without them, or train with --self-distill "
            "for a multi-exit student")
    names = model.exit_names if multi else ["exit"]
    stages = model.exit_stages + [len(model.stage_modules)] if multi else [None]
    costs = exit_costs(model.cost_profile(res) if multi else plain_cost_profile(model, res))
    full = costs["full"]
    if thresholds is None:
        thresholds = [DEFAULT_THRESHOLD] * (len(names) - 1)
    conf, correct, ens = collect(model, cfg, val_data, batch_size=ec.batch_size, workers=ec.workers)
    E = len(names)
    ee = early_exit(conf, correct, thresholds, costs["cumulative"], full)
    report = {
        "run": run_dir, "student": cfg["student"], "self_distill": bool(cfg.get("self_distill")), "res": res,
        "num_classes": int(cfg["resolved"]["num_classes"]), "val_images": int(conf.shape[0]),
        "device": str(next(model.parameters()).device), "flops_full": full,
        "exits": [{"name": names[i], "stage": stages[i], "top1": float(correct[:, i].double().mean()),
                   "compute_alone": costs["alone"][i] / full, "compute_cumulative": costs["cumulative"][i] / full,
                   "flops_alone": costs["alone"][i], "flops_cumulative": costs["cumulative"][i]} for i in range(E)],
        "ensemble": {"top1": float(ens.double().mean()), "compute": costs["cumulative"][-1] / full},
        "early_exit": ee,
    }
    if sweep:
        points = [dict(early_exit(conf, correct, t, costs["cumulative"], full), shared=True) for t in SWEEP_GRID]
        report["sweep"] = points
        report["plot"] = plot_sweep(report, plot or os.path.join(run_dir, "early_exit.png"))
    return report


def plot_sweep(report: dict, path: str) -> str:
    """Accuracy against compute: the shared-threshold curve, each exit alone, the ensemble, and the
    given thresholds. Returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    pts = sorted(report["sweep"], key=lambda p: p["compute"])
    ax.plot([p["compute"] for p in pts], [100 * p["top1"] for p in pts], marker=".", label="early exit (one threshold)")
    for e in report["exits"]:
        ax.scatter([e["compute_alone"]], [100 * e["top1"]], marker="s", zorder=3)
        ax.annotate(e["name"], (e["compute_alone"], 100 * e["top1"]), textcoords="offset points", xytext=(4, -10))
    ens = report["ensemble"]
    ax.scatter([ens["compute"]], [100 * ens["top1"]], marker="D", color="k", zorder=3, label="ensemble of exits")
    ee = report["early_exit"]
    ax.scatter([ee["compute"]], [100 * ee["top1"]], marker="*", s=120, color="r", zorder=4,
               label="thresholds " + ",".join(f"{t:g}" for t in ee["thresholds"]))
    ax.set_xlabel("compute per image (FLOPs / the plain network's)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(f"early exit: {os.path.basename(os.path.normpath(report['run']))}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def format_report(r: dict) -> str:
    """The report for people."""
    kind = f"self-distilled, {len(r['exits'])} exits" if r["self_distill"] else "single exit"
    lines = [f"{r['run']}: {r['student']} ({kind}), {r['val_images']} val images at {r['res']} px, "
             f"{r['flops_full'] / 1e6:.2f} MFLOPs per image (plain network)",
             f"{'exit':10s} {'stage':>5s} {'top-1':>7s} {'compute alone':>14s} {'reaching it':>12s}"]
    for e in r["exits"]:
        lines.append(f"{e['name']:10s} {str(e['stage'] or '-'):>5s} {100 * e['top1']:6.1f}% {e['compute_alone']:14.3f} "
                     f"{e['compute_cumulative']:12.3f}")
    lines.append(f"{'ensemble':10s} {'':>5s} {100 * r['ensemble']['top1']:6.1f}% {r['ensemble']['compute']:14.3f}")
    ee = r["early_exit"]
    shares = ", ".join(f"{e['name']} {100 * s:.1f}%" for e, s in zip(r["exits"], ee["share"]))
    th = ",".join(f"{t:g}" for t in ee["thresholds"]) or "-"
    lines.append(f"early exit (thresholds {th}): top-1 {100 * ee['top1']:.1f}%, compute {ee['compute']:.3f} of the "
                 f"plain network; leaving at {shares}")
    if "sweep" in r:
        lines.append("sweep (one threshold for every shallow exit):")
        lines.append(f"  {'threshold':>9s} {'top-1':>7s} {'compute':>8s}")
        for p in r["sweep"]:
            lines.append(f"  {p['thresholds'][0] if p['thresholds'] else float('nan'):9g} {100 * p['top1']:6.1f}% "
                         f"{p['compute']:8.3f}")
        lines.append(f"plot: {r['plot']}")
    return "\n".join(lines)
