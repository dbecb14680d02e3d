"""The student trainer: replayed views in, one task's loss out (cached KD, live KD, or labels).

Read top to bottom:

1. ``TrainConfig`` holds the settings and checks them when it is made (CLI and Python API alike).
2. ``setup(cfg)`` lets the mode's factory (``modes.py``: ``cached``, ``live`` or ``labels``) resolve
   what the mode needs, builds the student and the mode's task, and checks everything it can
   before the first step: cache against data (shard groups, keys), class counts against the
   student head, labels present when needed, the student spec, the validation classes. It
   returns a ``Run``: the model, the task (``tasks.py``), the loader, the step plan.
3. The loader (``loader.ReplayLoader``: the library's, so the trainer is its first user) yields the
   same batches for a given ``(seed, epoch)`` whatever happened before, so a checkpoint only has to record ``(epoch, step in epoch)``
   (``run_state.RunState``): a resumed run skips the epoch's first batches (without rendering
   them) and continues with the same weights, optimizer state and RNG state — on CPU the final
   weights are bitwise those of an uninterrupted run.
4. ``train(cfg)`` is the loop: learning rate, ``task(model, batch)``, backward, clip, step; the
   log, evaluation and checkpoints at their intervals; ``finish`` writes ``model.pt`` and
   ``summary.json``.

Under ``torchrun`` every rank runs the same number of steps per epoch (see ``replay``), the model
is wrapped in DistributedDataParallel (NCCL on CUDA, gloo on CPU) and ``--batch-size`` is per process.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from ..cache.store import CacheReader
from ..data.render import render_mismatch
from ..data.shards import expand_urls
from ..errors import KdcacheError, count, writing
from ..models.exits import is_multi_exit
from ..models.factory import ModelInfo, torch_load
from ..runtime import barrier, init_distributed, resolve_device, set_threads
from . import modes
from .config import SD_LEGACY_FIELDS, TrainConfig, run_self_distill
from .loader import ReplayLoader
from .replay import prepare_shards
from .run_state import MetricsLog, Meter, RunState, atomic_json, atomic_npy, atomic_save, restore
from .selfdistill import SelfDistillTask
from .spotcheck import SpotCheck, spot_totals
from .student import build_student
from .tasks import StudentInput
from .validation import ValStream, val_logits

CHECKPOINT = "checkpoint.pt"
DEFAULT_RES = 224  # the student's resolution without --res and without a cache
BAD_KEYS_SHOWN = 20  # bad records named on stderr and in summary.json (all are counted)
# Settings a resumed run may change. They are recorded in config.json ("resumes": step, old and new
# value); every other setting must stay as the run started, or the resume is refused. The refusal
# names them (``resume_may_change``), and docs/cli.md lists the same flags.
RESUME_MAY_CHANGE = ("epochs", "workers", "worker_timeout", "threads", "log_every", "eval_every", "eval_epochs",
                     "checkpoint_every", "val_data", "val_batch_size", "stop_after", "spot_check", "spot_check_warn",
                     "device", "loss_backend", "compile", "storage_options")
API_ONLY = ("storage_options",)  # settings of TrainConfig that `kdcache train` has no flag for
# Not settings of the run, so free to change too (and recorded): where its folder is (a run may be
# copied or moved), whether a bar is shown, and --resume itself. ``cache`` may name another path when
# the cache there is the run's (the same manifest and targets digests, checked in the resolved settings).
RESUME_NOT_SETTINGS = ("out", "progress", "resume")
# Of the resolved settings, these describe the machine or follow from the above: recorded, not checked.
RESOLVED_MAY_CHANGE = ("device", "amp", "torch", "steps_per_epoch", "total_steps", "threads")


def manifest_digest(manifest: dict) -> str:
    """sha256 of the canonical JSON of a cache manifest (sorted keys, no spaces)."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_targets_digest(reader: CacheReader, shards) -> str | None:
    """sha256 of the targets a run trains on: the recorded view digests of its shards' cache groups
    (every view read is checked against them). None for caches made before digests were recorded."""
    from ..cache.store import targets_digest

    groups = {s.name: reader.view_digests(s.name) for s in shards}
    return None if any(d is None for d in groups.values()) else targets_digest(groups)


# Reuse of each stored view beyond which the note advises more views (docs/study.md, "How many views":
# 15 uses of each of 16 views cost 1.5 points against a fresh view every epoch; 4 uses of 64 cost 0.6).
MANY_REUSES = 8


def views_reuse_note(epochs: int, views: int) -> str:
    """The one-line notice for a run of ``epochs`` over ``views`` stored views (epochs > views)."""
    note = (f"note: training for {epochs} epochs over {views} views: views are reused from epoch {views} on "
            f"(epoch e replays view e mod {views})")
    if epochs >= MANY_REUSES * views:
        note += (f"; each view comes back about {epochs // views} times, and docs/study.md measured a cost at that "
                 f"much reuse: a cache with --views {max(views * 4, -(-epochs // 4))} or more (same --seed: its first "
                 f"{views} views are these) keeps each view to about 4 uses")
    return note


def lr_at(step: int, base: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """The learning rate of step ``step`` (0-based) of ``total`` (docs/training.md, *Schedule*).

    Steps ``s < warmup`` ramp linearly, ``base·(s+1)/(warmup+1)``, strictly below the peak. From
    step ``warmup`` on, a cosine from ``base`` to ``min_lr``: ``t = (s−warmup)/max(1, total−1−warmup)``,
    ``min_lr + (base−min_lr)·(1+cos πt)/2``. So ``base`` is used exactly once (step ``warmup``) and
    the last step runs at exactly ``min_lr`` (when ``total−1 > warmup``).
    """
    if step < warmup:
        return base * (step + 1) / (warmup + 1)
    t = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    w = 0.5 * (1.0 + math.cos(math.pi * t))  # 1 at the peak, 0 at the end (both exact in floating point)
    return base * w + min_lr * (1.0 - w)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum; no weight decay on biases and normalisation weights (1-D)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.base_lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.base_lr)


def _unwrap(model):
    model = getattr(model, "_orig_mod", model)  # torch.compile
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)


def _say(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, file=sys.stderr, flush=True)


# ---- setup -----------------------------------------------------------------------------------


@dataclass
class Run:
    """What ``setup`` resolved: the pieces the loop uses, and the run's recorded configuration."""

    cfg: TrainConfig
    mode: str
    rank: int
    world: int
    device: torch.device
    num_classes: int
    student: ModelInfo
    model: torch.nn.Module
    task: object  # a tasks.*Task
    inputs: StudentInput
    loader: ReplayLoader
    steps_per_epoch: list[int]
    dropped: list[int]
    val_stream: ValStream | None
    run_config: dict
    views_reused: bool
    bad_keys: list[str]
    t_setup: float
    spot: SpotCheck | None = None  # --spot-check
    artifacts: dict = field(default_factory=dict)  # the mode's files for the run directory (Mode.artifacts)

    @property
    def total_steps(self) -> int:
        return sum(self.steps_per_epoch)

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.cfg.out, CHECKPOINT)


def setup(cfg: TrainConfig) -> Run:
    """Everything before the first step, with every check that can be made early (module doc, 2)."""
    rank, world, device, threads = _place(cfg)
    t_setup = time.perf_counter()
    urls = expand_urls(cfg.data)
    reader = CacheReader(cfg.cache, cfg.storage_options, check_digests=not cfg.allow_edited_cache) if cfg.cache else None
    manifest = reader.manifest if reader is not None else None
    res = cfg.res if cfg.res is not None else (int(manifest["resolution"]) if manifest else DEFAULT_RES)
    if cfg.res is None and manifest is not None:
        _say(rank, f"note: --res not given: the student trains at the cache's resolution, {res}px")
    mode = modes.resolve(modes.ModeContext(cfg, rank, device, urls, reader, res))
    C = mode.num_classes

    torch.manual_seed(cfg.seed)
    sinfo, model = build_student(cfg.student, C, res, cfg.student_weights, mode.classes_from,
                                 exits=cfg.self_distill.exits if cfg.self_distill else None)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if device.type == "cuda" else None
    inputs = StudentInput(sinfo.mean, sinfo.std, device, cfg.channels_last, amp_dtype)
    task = mode.make_task(inputs)
    sd = cfg.self_distill
    if sd:  # the mode's loss on the deepest exit, deep-to-shallow distillation on the others
        task = SelfDistillTask(task, model.exit_names, alpha=sd.alpha, temperature=sd.temperature,
                               feature_weight=sd.feature_weight, teacher=sd.teacher, tail=mode.tail or cfg.tail,
                               backend=cfg.loss_backend)
    if cfg.student_view == "fresh" and manifest["augmentation"].get("mixup"):
        raise KdcacheError(f"cache {cfg.cache} holds targets of mixed images (precompute --mixup); fresh student "
                           "views are unmixed crops, so they cannot match. Use --student-view cache, or a cache "
                           "made without --mixup")

    spot = None
    if cfg.spot_check > 0:  # the cache's own teacher, on the cache's resolution
        spot = SpotCheck.for_cache(reader, cfg.spot_check, weights=cfg.teacher_weights, device=device, seed=cfg.seed,
                                   strict=not cfg.spot_check_warn)
    teacher_res = mode.teacher_res
    if spot is not None and spot.live.res != res:
        teacher_res = spot.live.res

    # -- data: checks that need no decoding, then the loader (the library's ReplayLoader: it also reads
    # every view of every cache group once, against its digest, before the first step) --
    need_labels = mode.labels_needed or cfg.label_weight > 0 or (sd is not None and sd.alpha < 1)
    view_seed = cfg.seed if cfg.view_seed is None else cfg.view_seed
    loader = ReplayLoader(
        urls, reader, cfg.batch_size, res=res, rank=rank, world=world, workers=cfg.workers, seed=cfg.seed,
        student_view=cfg.student_view, views_used=cfg.views_used, device=device, mean=sinfo.mean, std=sinfo.std,
        channels_last=cfg.channels_last, labels=need_labels, targets=mode.with_targets, num_classes=C,
        views=cfg.views, view_seed=view_seed, aug=cfg.aug, teacher_res=teacher_res,
        shuffle_buffer=cfg.shuffle_buffer, skip_bad=cfg.skip_bad, worker_timeout=cfg.worker_timeout,
        check_digests=not cfg.allow_edited_cache, storage_options=cfg.storage_options)
    shards = loader.shards
    val_stream = None
    if cfg.val_data:
        val_shards = prepare_shards(expand_urls(cfg.val_data), None, True, rank, world, num_classes=C)
        val_stream = ValStream(val_shards, res, cfg.val_batch_size or cfg.batch_size, rank, world, cfg.skip_bad)
    plans = [loader.plan(e) for e in range(cfg.epochs)]
    V = loader.num_views
    views_reused = V is not None and cfg.epochs > V
    _setup_notes(cfg, rank, world, manifest, shards, plans, V)

    resolved = {
        "mode": mode.name, "num_classes": C, "res": res, "world_size": world, "device": str(device),
        "amp": cfg.amp if device.type == "cuda" else "none",
        "student_mean": list(sinfo.mean), "student_std": list(sinfo.std), "threads": threads,
        "views": V, "cache_views": reader.views if reader is not None else None, "view_seed": view_seed if reader is None else int(manifest["seed"]),
        "student_view": cfg.student_view if reader is not None else "own",
        "steps_per_epoch": [p.steps for p in plans], "total_steps": sum(p.steps for p in plans),
        "cache_manifest_sha256": manifest_digest(manifest) if manifest else None,
        "cache_targets_sha256": cache_targets_digest(reader, shards) if reader is not None else None,
        **mode.record,
        "torch": str(torch.__version__),
    }
    if cfg.self_distill:  # what evaluate needs besides the flags to rebuild the wrapper and name its exits
        resolved["exits"] = {"stages": list(model.stage_modules), "exit_stages": list(model.exit_stages),
                             "names": model.exit_names}
    bad_keys = [f"{s.name}/{k}" for s in shards for k in s.bad]
    return Run(cfg=cfg, mode=mode.name, rank=rank, world=world, device=device, num_classes=C, student=sinfo,
               model=model, task=task, inputs=inputs, loader=loader, steps_per_epoch=[p.steps for p in plans],
               dropped=[p.dropped for p in plans], val_stream=val_stream,
               run_config={**asdict(cfg), "resolved": resolved}, views_reused=views_reused, bad_keys=bad_keys,
               t_setup=t_setup, spot=spot, artifacts=mode.artifacts)


def _place(cfg: TrainConfig):
    """This process's rank, world size, device and torch threads (torchrun's process group joined)."""
    rank, world, _ = init_distributed(cfg.device)
    device = resolve_device(cfg.device)  # `cuda` alone is cuda:LOCAL_RANK
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device, set_threads(cfg.threads, cfg.workers)


def _setup_notes(cfg: TrainConfig, rank: int, world: int, manifest: dict | None, shards, plans, V: int | None) -> None:
    """What a user should know before the first step: reused views, another PIL, left-out records."""
    if V is not None and cfg.epochs > V:
        _say(rank, views_reuse_note(cfg.epochs, V))
    mismatch = render_mismatch(manifest.get("render")) if manifest is not None else None
    if mismatch:
        _say(rank, f"warning: {mismatch}; until then the student sees slightly other pixels than the teacher saw")
    bad_keys = [f"{s.name}/{k}" for s in shards for k in s.bad]
    if bad_keys:
        why = "recorded as bad in the cache" if manifest is not None else "--skip-bad"
        shown = ", ".join(bad_keys[:BAD_KEYS_SHOWN])
        more = f" and {len(bad_keys) - BAD_KEYS_SHOWN} more" if len(bad_keys) > BAD_KEYS_SHOWN else ""
        _say(rank, f"note: {len(bad_keys)} undecodable image{'s' if len(bad_keys) != 1 else ''} left out ({why}): "
             f"{shown}{more}")
    if plans[0].dropped:
        _say(rank, f"note: {world} ranks hold uneven shares of the shards; to keep every rank's step count equal, "
             f"{plans[0].dropped} of {sum(s.count for s in shards)} records are left out of epoch 0")


def open_run_dir(run: Run) -> dict | None:
    """Create the run directory (a new run) or load its checkpoint (``--resume``). Returns the checkpoint.

    On resume, the settings must be the run's (``resume_changes``); the allowed changes are recorded
    in config.json, which always describes the run as it goes on."""
    cfg, path = run.cfg, run.checkpoint_path
    ckpt = None
    if os.path.exists(path):
        if not cfg.resume:
            raise KdcacheError(f"{cfg.out} already holds a run ({CHECKPOINT}); pass --resume to continue it or choose a new --out")
        ckpt = torch_load(path, "checkpoint")
        changes = resume_changes(ckpt["config"], run.run_config)
        for k, (a, b) in changes.items():
            if k in ("workers", "epochs"):
                _say(run.rank, f"warning: resuming with {k}={b} (was {a}): the run continues, but the batches "
                     "(workers) or the schedule (epochs) differ from an uninterrupted run")
        history = list(ckpt["config"].get("resumes", []))
        if changes:
            history.append({"step": int(ckpt["global_step"]), "changes": {k: list(v) for k, v in changes.items()}})
        run.run_config["resumes"] = history
    if run.rank == 0:
        with writing(cfg.out, "--out"):
            os.makedirs(cfg.out, exist_ok=True)
            clean_run_dir(cfg.out, fresh=ckpt is None)
            atomic_json(run.run_config, os.path.join(cfg.out, "config.json"))
            for name, obj in run.artifacts.items():
                (atomic_json if isinstance(obj, dict) else atomic_npy)(obj, os.path.join(cfg.out, name))
    barrier(run.world)
    return ckpt


def clean_run_dir(out: str, fresh: bool) -> None:
    """Remove what an interrupted process of this run left: half-written files (``*.tmp<pid>``)
    and, when the run starts afresh (killed before its first checkpoint), its metrics, which the
    new start logs again from step 1."""
    for f in os.listdir(out):
        if re.fullmatch(r"(checkpoint\.pt|student\.pt|summary\.json|config\.json)\.tmp\d+", f):
            os.remove(os.path.join(out, f))
    if fresh and os.path.exists(os.path.join(out, "metrics.jsonl")):
        os.remove(os.path.join(out, "metrics.jsonl"))


def _comparable(config: dict) -> dict:
    """A run's settings with those older kdcache releases did not record filled in as they ran."""
    flat = {**asdict(TrainConfig(data="", student="", out="")), **config}
    sd = run_self_distill(config)  # before the group was nested: "self_distill": true and sd_* fields
    flat["self_distill"] = asdict(sd) if sd is not None else None
    for name in SD_LEGACY_FIELDS:
        flat.pop(name, None)
    if "aug" not in config and "scale" in config:  # before the augmentation was one field
        flat["aug"] = {"scale": list(config["scale"]), "ratio": list(config["ratio"]), "flip": config["flip"],
                       "mixup": config["mixup"], "name": "inception_crop", "version": 1}
    return flat


def resume_changes(old: dict, new: dict) -> dict:
    """The settings a resumed run changes, ``{name: (old, new)}``; a change that is not allowed
    (anything outside RESUME_MAY_CHANGE / RESOLVED_MAY_CHANGE) is refused with the full list."""
    def same(a, b):
        return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)

    a, b = _comparable(old), _comparable(new)
    ra, rb = old.get("resolved", {}), new.get("resolved", {})
    same_cache = all(ra.get(d) is not None and ra.get(d) == rb.get(d)
                     for d in ("cache_manifest_sha256", "cache_targets_sha256"))
    allowed, refused = {}, []
    for k in sorted(set(b) - {"resolved", "resumes"}):
        if not same(a.get(k), b.get(k)):
            if k in RESUME_MAY_CHANGE or k in RESUME_NOT_SETTINGS or (k == "cache" and same_cache):
                allowed[k] = (a.get(k), b.get(k))
            else:
                refused.append(f"{k}: the run has {a.get(k)!r}, this command {b.get(k)!r}")
    for k in sorted(rb):
        if k in ra and not same(ra[k], rb[k]):
            if k in RESOLVED_MAY_CHANGE:
                allowed[f"resolved.{k}"] = (ra[k], rb[k])
            else:
                refused.append(f"resolved {k}: the run has {ra[k]!r}, this command {rb[k]!r}")
    if refused:
        raise KdcacheError(
            "cannot resume: this command's settings differ from the run's, and a resumed run must train as it "
            "started:\n  " + "\n  ".join(refused) + "\nResume with the run's settings (config.json), or start a "
            f"new run in another --out. Only {resume_may_change()} may change on resume.")
    return allowed


def resume_may_change() -> str:
    """The settings a resume may change, as the refusal names them: flags, then the Python API's fields."""
    flags = ", ".join(f"--{name.replace('_', '-')}" for name in RESUME_MAY_CHANGE if name not in API_ONLY)
    api = ", ".join(name for name in RESUME_MAY_CHANGE if name in API_ONLY)
    return f"{flags} (and {api} in the Python API)" if api else flags


# ---- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, run: Run) -> dict:
    """Top-1 and top-5 (top-min(5, C)) accuracy over the validation shards (all ranks together); for a
    multi-exit student also every exit's top-1 (``val_top1_<exit>``). The deepest exit is the model's."""
    was = model.training
    model.eval()
    k5 = min(5, run.num_classes)
    names = model.exit_names if is_multi_exit(model) else []
    counts = torch.zeros(3 + len(names), dtype=torch.float64)  # top-1, top-5, images, then each exit's top-1
    try:
        for zs, y in val_logits(model, run.val_stream, run.inputs, run.num_classes, run.cfg.workers,
                                run.cfg.worker_timeout, run.cfg.out):
            hit = zs[-1].topk(k5, dim=1).indices.eq(y.unsqueeze(1))
            per_exit = [zi.argmax(1).eq(y).sum().item() for zi in zs] if names else []
            counts += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(), len(y), *per_exit],
                                   dtype=torch.float64)
    finally:
        model.train(was)
    if run.world > 1:
        c = counts.to(run.device)
        dist.all_reduce(c)
        counts = c.cpu()
    n = max(counts[2].item(), 1.0)
    per_exit = {f"val_top1_{name}": counts[3 + j].item() / n for j, name in enumerate(names)}
    return {"val_top1": counts[0].item() / n, "val_top5": counts[1].item() / n, "val_images": int(counts[2].item()),
            **per_exit}


# ---- the loop --------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict:
    """Train a student; returns the summary dict (also written to ``RUN_DIR/summary.json``).

    With ``stop_after`` the run stops after that many global steps (checkpoint written, no
    summary.json, no model.pt) and returns ``{"stopped_at": step, "total_steps", "epoch",
    "step_in_epoch", "checkpoint", "mode", "out"}`` (``epoch``/``step_in_epoch``: where the last
    step ran); ``resume=True`` continues it.
    """
    run = setup(cfg)
    opt = make_optimizer(run.model, cfg)  # before the run folder: a run that cannot start leaves nothing
    ckpt = open_run_dir(run)
    scaler = torch.amp.GradScaler("cuda", enabled=run.inputs.amp_dtype == torch.float16)
    state = RunState()
    if ckpt is not None:
        state = restore(ckpt, _unwrap(run.model), opt, scaler, run.device)
        if state.epoch >= cfg.epochs:
            return already_complete(run, state)
        _say(run.rank, f"resuming {cfg.out} at epoch {state.epoch}, step {state.step_in_epoch} of the epoch "
             f"(global step {state.global_step})")
    log = MetricsLog(cfg.out, run.rank == 0, int(ckpt["metrics_bytes"]) if ckpt is not None else None)
    net = _wrap(run)
    meter = Meter(state, run.device, run.world)

    def checkpoint():
        if run.rank == 0:
            atomic_save(state.to_checkpoint(_unwrap(net), opt, scaler, run.device, run.run_config, log.offset(),
                                            time.perf_counter() - run.t_setup), run.checkpoint_path)

    def validate():
        state.record_val(evaluate(_unwrap(net), run))
        log.log({"step": state.global_step, "epoch": state.epoch, **state.last_val})

    _say(run.rank, f"kdcache train: mode {run.mode}, {count(len(run.loader.shards), 'shard')}, "
         f"{sum(s.count for s in run.loader.shards)} records, {run.num_classes} classes, {cfg.epochs} epochs x "
         f"{run.steps_per_epoch[0]} steps, device {run.device}, world {run.world}")
    bar = _progress_bar(run, state)
    setup_s = time.perf_counter() - run.t_setup
    stopped = False
    while state.epoch < cfg.epochs and not stopped:
        epoch, steps, t_epoch = state.epoch, run.steps_per_epoch[state.epoch], time.perf_counter()
        meter.resume()
        run.loader.set_epoch(epoch, skip_batches=state.step_in_epoch)
        for batch in run.loader:
            if run.spot is not None and run.spot.due(epoch, state.step_in_epoch):
                spot_step(run, batch, state, log)
            lr = lr_at(state.global_step, cfg.base_lr, cfg.warmup_steps, run.total_steps, cfg.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            out = run.task(net, batch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(out["loss"]).backward()
            if cfg.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            state.advance(len(batch) * run.world)
            meter.step(out, len(batch) * run.world)
            if bar is not None:
                bar.update(1)
            mid_epoch = state.step_in_epoch < steps  # the epoch's end has its own evaluation and checkpoint
            if state.global_step % cfg.log_every == 0 or not mid_epoch:
                rec = meter.window()
                log.log({"step": state.global_step, "epoch": epoch, **rec, "lr": lr})
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['images_per_s']:.0f}")
            if mid_epoch and run.val_stream is not None and cfg.eval_every and state.global_step % cfg.eval_every == 0:
                with meter.paused():
                    validate()
            if mid_epoch and cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
                with meter.paused():
                    checkpoint()
            if mid_epoch and cfg.stop_after is not None and state.global_step >= cfg.stop_after:
                checkpoint()
                stopped = True
                break
        if stopped:
            break
        if run.val_stream is not None and ((epoch + 1) % cfg.eval_epochs == 0 or epoch + 1 == cfg.epochs):
            validate()
        log.log({"step": state.global_step, "epoch": epoch, "epoch_end": True, "epoch_s": time.perf_counter() - t_epoch,
                 "records_dropped": run.dropped[epoch]})
        state.next_epoch()
        checkpoint()
        stopped = cfg.stop_after is not None and state.global_step >= cfg.stop_after and state.epoch < cfg.epochs
    if bar is not None:
        bar.close()
    log.close()
    if stopped:
        barrier(run.world)
        last = (state.epoch, state.step_in_epoch) if state.step_in_epoch else (state.epoch - 1, run.steps_per_epoch[state.epoch - 1])
        return {"stopped_at": state.global_step, "total_steps": run.total_steps, "epoch": last[0],
                "step_in_epoch": last[1], "checkpoint": run.checkpoint_path, "mode": run.mode, "out": cfg.out}
    return finish(run, state, net, setup_s)


def spot_step(run: Run, batch, state: RunState, log: MetricsLog) -> None:
    """``--spot-check`` on this step's batch, before it is trained on: the figures go to the log; a
    disagreement stops the run (``SpotCheckError``) or, with ``--spot-check-warn``, is reported."""
    rec = run.spot.check(batch, run.world)
    log.log({"step": state.global_step + 1, "epoch": state.epoch, **rec})
    if rec["spot_failures"]:
        _say(run.rank, f"warning: spot check at step {state.global_step + 1}: {count(rec['spot_failures'], 'record')} "
             f"disagree with the cache (first: {rec.get('spot_first_failure', 'on another rank')})")


def _wrap(run: Run):
    """The model the loop trains: DDP under torchrun, ``torch.compile`` with ``--compile``."""
    net = run.model
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if run.cfg.compile:
        net = torch.compile(net)
    net.train()
    return net


def _progress_bar(run: Run, state: RunState):
    if not run.cfg.progress or run.rank != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=run.total_steps, initial=state.global_step, unit="step", desc=f"train ({run.mode})",
                dynamic_ncols=True)


def already_complete(run: Run, state: RunState) -> dict:
    """``--resume`` of a run that has trained all its epochs: say so and return its summary (written
    again if the run was stopped between its last checkpoint and its summary)."""
    path = os.path.join(run.cfg.out, "summary.json")
    _say(run.rank, f"{run.cfg.out} is already complete: all {run.cfg.epochs} epochs ({state.global_step} steps) are "
         "trained; pass a larger --epochs to train on, or choose a new --out")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return finish(run, state, run.model, 0.0)


def _logged(out: str) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def finish(run: Run, state: RunState, net, setup_s: float) -> dict:
    """Write ``model.pt`` and ``summary.json`` (rank 0); return the summary."""
    cfg = run.cfg
    summary = {
        "mode": run.mode, "student": cfg.student, "num_classes": run.num_classes, "epochs": cfg.epochs,
        "steps": state.global_step, "images_seen": state.images_seen, "world_size": run.world,
        "threads": run.run_config["resolved"]["threads"], "workers": cfg.workers,
        "device": str(run.device),
        "final_val_top1": state.last_val.get("val_top1"), "final_val_top5": state.last_val.get("val_top5"),
        **state.best,
        "images_per_s": state.images_seen / max(state.train_time_s, 1e-9),
        "wall_time_s": state.wall_time_s + time.perf_counter() - run.t_setup,
        "train_time_s": state.train_time_s, "setup_s": setup_s,
        "main_cpu_ms_per_image": 1000.0 * state.train_cpu_s / max(state.images_seen / run.world, 1),
        "cache": cfg.cache, "cache_manifest_sha256": run.run_config["resolved"]["cache_manifest_sha256"],
        "cache_targets_sha256": run.run_config["resolved"]["cache_targets_sha256"],
        "views": run.loader.num_views, "views_used": cfg.views_used, "views_reused": run.views_reused,
        "kd_signal": run.run_config["resolved"].get("kd_signal"),
        "student_view": run.run_config["resolved"]["student_view"],
        "records_dropped": sum(run.dropped),
        "bad_records": len(run.bad_keys), "bad_keys": run.bad_keys[:BAD_KEYS_SHOWN],
    }
    if run.spot is not None:  # every check the run made, resumed parts included (from metrics.jsonl)
        summary["spot_check"] = {"fraction": cfg.spot_check, **(spot_totals(_logged(cfg.out)) or {"batches": 0})}
    if cfg.self_distill:  # every exit's last validation top-1 (val_top1_exit<s>), the deepest's is final_val_top1
        summary["final_val_top1_exits"] = {k[len("val_top1_"):]: v for k, v in state.last_val.items()
                                           if k.startswith("val_top1_exit")}
    if run.rank == 0:
        atomic_save(_unwrap(net).state_dict(), os.path.join(cfg.out, "model.pt"))
        atomic_json(summary, os.path.join(cfg.out, "summary.json"))
    barrier(run.world)
    return summary
