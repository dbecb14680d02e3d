"""Training modes as task factories: what a mode needs, resolved in one place.

A mode is a function ``factory(ctx) -> Mode``. It gets what every run knows before its mode matters
(``ModeContext``: the settings, the device, the cache reader if any, the student's resolution) and
resolves everything the mode decides: the class count and where it came from, whether the stream
ships the cache's targets or renders a second resolution for a live teacher, whether labels are
needed, what the run records about it, and how to build its task once the student exists. The
trainer's ``setup`` calls the factory and never asks which mode it runs.

- ``labels``  cross-entropy on the shards' labels (``tasks.LabelsTask``);
- ``cached``  sparse KD against the cache's targets (``tasks.CachedKDTask``): top-k, or sampled
              targets (their own tail, at their sampling temperature), or a signal derived from
              them (``--kd-signal``, ``signals.py``: ``signal_mode`` wraps ``cached_mode``);
- ``live``    the same loss against a teacher run on the replayed views (``tasks.LiveKDTask``).

Adding a mode is one factory here and one line in ``MODES``; ``auto`` picks among these three from
the flags (``pick``).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..cache.store import CacheReader
from ..data.shards import load_class_names
from ..errors import KdcacheError
from .live import LiveEnsemble, LiveTeacher
from .signals import DERIVED_TAIL, DerivedSignal, cache_stats
from .tasks import CachedKDTask, LabelsTask, LiveKDTask, StudentInput

@dataclass
class ModeContext:
    """What a mode factory starts from."""

    cfg: object  # config.TrainConfig
    rank: int
    device: torch.device
    urls: list[str]
    reader: CacheReader | None
    res: int  # the student's resolution

    @property
    def manifest(self) -> dict | None:
        return self.reader.manifest if self.reader is not None else None

    def say(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, file=sys.stderr, flush=True)


@dataclass
class Mode:
    """What a factory resolved. ``make_task(inputs)`` builds the task once the student's input is known."""

    name: str
    num_classes: int
    classes_from: str | None  # where the class count came from (None: --num-classes), for the student's errors
    make_task: Callable[[StudentInput], object]
    with_targets: bool = False  # the stream ships the cache's targets
    teacher_res: int | None = None  # the stream renders a second resolution for a live teacher
    labels_needed: bool = False  # the mode itself trains on labels
    tail: str | None = None  # the KD loss's tail (None: no KD term)
    record: dict = field(default_factory=dict)  # what the run records about its teacher (config.json "resolved")
    artifacts: dict = field(default_factory=dict)  # files for the run directory: name -> array (.npy) or dict (.json)


def _cache_record(ctx: ModeContext) -> dict:
    """What a run records of a cache it reads (any mode): its resolution, k and target kind."""
    m = ctx.manifest
    if m is None:
        return {"teacher_res": None, "topk": None, "targets": None}
    return {"teacher_res": int(m["resolution"]), "topk": int(m["topk"]), "targets": m.get("targets") or {"kind": "topk"}}


def _given_classes(ctx: ModeContext) -> tuple[int, str | None]:
    """The class count without a teacher: --num-classes, the cache's, or classes.json beside the shards."""
    cfg = ctx.cfg
    if cfg.num_classes is not None:
        return cfg.num_classes, None
    if ctx.reader is not None:
        return ctx.reader.num_classes, f"the cache's teacher has {ctx.reader.num_classes} classes"
    names = load_class_names(ctx.urls)
    if not names:
        raise KdcacheError("cannot tell the number of classes: pass --num-classes (no cache and no classes.json "
                           "beside the shards)")
    return len(names), f"classes.json beside the shards lists {len(names)} classes"


def _kd_settings(cfg, tail: str) -> dict:
    return dict(temperature=cfg.temperature, tail=tail, label_weight=cfg.label_weight, backend=cfg.loss_backend)


def labels_mode(ctx: ModeContext) -> Mode:
    C, source = _given_classes(ctx)
    return Mode("labels", C, source, lambda inputs: LabelsTask(inputs, C), labels_needed=True,
                record={**_cache_record(ctx), "tail": None})


def sampled_tail(reader: CacheReader, cfg, say) -> str:
    """The loss's tail for a cache of sampled targets (``precompute --targets sample``): ``sampled``,
    the drawn weights as the whole target. They are unbiased for distillation at the sampling
    temperature only, so ``--temperature`` must equal it."""
    t = reader.manifest["targets"]
    tau = float(t.get("temperature", 1.0))
    if not math.isclose(cfg.temperature, tau, rel_tol=1e-9):
        raise KdcacheError(
            f"cache {reader.path} holds sampled targets drawn at temperature {tau:g}: they estimate the teacher at "
            f"T = {tau:g} without bias, not at --temperature {cfg.temperature:g}. Train with --temperature {tau:g}, or "
            f"precompute a cache with --sample-temperature {cfg.temperature:g}")
    if cfg.tail != "uniform":
        say(f"note: --tail {cfg.tail} does not apply: cache {reader.path} holds sampled targets ({t['samples']} "
            "draws per record), used as they are, with no tail")
    return "sampled"


def cached_mode(ctx: ModeContext) -> Mode:
    cfg, reader = ctx.cfg, ctx.reader
    if cfg.num_classes is not None and cfg.num_classes != reader.num_classes:
        raise KdcacheError(
            f"cache {cfg.cache} holds outputs of a {reader.num_classes}-class teacher but --num-classes is "
            f"{cfg.num_classes}; the student head must match the cache's classes")
    C = reader.num_classes
    tail = sampled_tail(reader, cfg, ctx.say) if reader.kind == "sample" else cfg.tail
    kd = _kd_settings(cfg, tail)
    return Mode("cached", C, None if cfg.num_classes is not None else f"the cache's teacher has {C} classes",
                lambda inputs: CachedKDTask(inputs, C, **kd), with_targets=True, tail=tail,
                record={**_cache_record(ctx), "tail": tail})


def signal_mode(ctx: ModeContext) -> Mode:
    """Cached KD with the signal ``--kd-signal`` names (``signals.py``): ``full`` is ``cached_mode``
    itself; a derived signal takes the cache's statistics over the run's shards (one pass, made
    here, before the student), trains on targets made of the labels and those statistics with the
    ``uniform`` tail, and leaves the relation table in the run directory."""
    mode = cached_mode(ctx)
    cfg = ctx.cfg
    if cfg.kd_signal == "full":
        return replace(mode, record={**mode.record, "kd_signal": {"name": "full"}})
    stats = cache_stats(ctx.reader, ctx.urls, mode.tail, what=f"--kd-signal {cfg.kd_signal}")
    signal = DerivedSignal(cfg.kd_signal, stats)
    ctx.say(f"kd-signal {cfg.kd_signal}: over {stats.records} cached views of {stats.images} images, the teacher's mean "
            f"probability off the true class is epsilon = {stats.epsilon:.4f}")
    kd, C = {**_kd_settings(cfg, DERIVED_TAIL), "backend": signal.backend(cfg.loss_backend)}, mode.num_classes
    return replace(mode, make_task=lambda inputs: CachedKDTask(inputs, C, signal=signal, **kd), tail=DERIVED_TAIL,
                   labels_needed=True, record={**mode.record, "kd_signal": signal.record},
                   artifacts=signal.artifacts(ctx.reader.class_names or load_class_names(ctx.urls)))


def live_mode(ctx: ModeContext) -> Mode:
    """A teacher run on the replayed views (``live.LiveTeacher``: like precompute's, and with the
    cache's teacher spec, its normalisation and seeded random init, so live targets equal cached ones).
    Several --teacher, or a cache made by an ensemble, give ``live_ensemble_mode``."""
    cfg, m = ctx.cfg, ctx.manifest
    if not isinstance(cfg.teacher, str) or (m is not None and "members" in m["teacher"]):
        return live_ensemble_mode(ctx)
    live = LiveTeacher.load(cfg.teacher, weights=cfg.teacher_weights, cache=ctx.reader, num_classes=cfg.num_classes,
                            topk=cfg.topk, res=cfg.teacher_res or ctx.res, device=ctx.device,
                            random_init=cfg.teacher_random_init, random_init_flag="--teacher-random-init")
    teacher_res = cfg.teacher_res or (int(m["resolution"]) if m else ctx.res)
    C = live.num_classes
    kd = _kd_settings(cfg, cfg.tail)
    return Mode("live", C, None if cfg.num_classes is not None else f"the live teacher has {C} classes",
                lambda inputs: LiveKDTask(inputs, C, live, **kd),
                teacher_res=teacher_res if teacher_res != ctx.res else None, tail=cfg.tail,
                record={"teacher_res": teacher_res, "topk": live.topk,
                        "targets": (m.get("targets") or {"kind": "topk"}) if m else None, "tail": cfg.tail})


def live_ensemble_mode(ctx: ModeContext) -> Mode:
    """Several teachers run on the replayed views (``live.LiveEnsemble``), each at its own resolution
    (the stream renders every one that differs from the student's); with the cache's members, their
    normalisation, resolutions and seeded random inits, so live targets equal the cache's."""
    cfg, m = ctx.cfg, ctx.manifest
    specs = [cfg.teacher] if isinstance(cfg.teacher, str) else list(cfg.teacher)
    live = LiveEnsemble.load(specs, weights=cfg.teacher_weights, cache=ctx.reader, num_classes=cfg.num_classes,
                             topk=cfg.topk, res=cfg.teacher_res if cfg.teacher_res is not None else (
                                 None if m is not None else [ctx.res] * len(specs)),
                             device=ctx.device, random_init=cfg.teacher_random_init,
                             random_init_flag="--teacher-random-init")
    C = live.num_classes
    kd = _kd_settings(cfg, cfg.tail)
    others = tuple(r for r in live.resolutions if r != ctx.res)
    return Mode("live", C, None if cfg.num_classes is not None else f"the live teachers have {C} classes",
                lambda inputs: LiveKDTask(inputs, C, live, **kd), teacher_res=others or None, tail=cfg.tail,
                record={"teacher_res": live.ensemble.resolutions, "topk": live.topk,
                        "teachers": specs,
                        "targets": (m.get("targets") or {"kind": "topk"}) if m else None, "tail": cfg.tail})


MODES: dict[str, Callable[[ModeContext], Mode]] = {"cached": signal_mode, "live": live_mode, "labels": labels_mode}


def pick(cfg) -> str:
    """The mode a run's flags ask for (``auto``: live with --teacher, cached with --cache, else labels),
    with the combinations that cannot work refused."""
    mode = cfg.mode
    if mode == "auto":
        mode = "live" if cfg.teacher else ("cached" if cfg.cache else "labels")
    if mode == "cached" and not cfg.cache:
        raise KdcacheError("cached-teacher mode needs --cache (or pass --teacher for a live teacher)")
    if mode == "cached" and cfg.teacher:
        raise KdcacheError("--teacher runs a live teacher; it cannot be combined with --mode cached")
    if mode == "live" and not cfg.teacher:
        raise KdcacheError("live-teacher mode needs --teacher SPEC")
    return mode


def resolve(ctx: ModeContext) -> Mode:
    """The run's mode, resolved by its factory."""
    return MODES[pick(ctx.cfg)](ctx)
