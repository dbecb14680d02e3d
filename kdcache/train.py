"""The student trainer: replayed views in, sparse-KD loss from the cache (or a live teacher, or labels).

Read top to bottom:

1. ``train(cfg)`` resolves the mode — ``cached`` (targets from ``--cache``), ``live`` (a teacher
   run on the very views the stream replays, top-k cast exactly like precompute's), or
   ``labels`` (cross-entropy only) — and checks everything it can before the first step: cache
   against data (shard groups, keys), class counts against the student head, labels present when
   needed, the student spec.
2. The stream (``replay.ReplayStream``) yields the same batches for a given ``(seed, epoch)``
   whatever happened before, so a checkpoint only has to record ``(epoch, step in epoch)``: a
   resumed run skips the epoch's first batches (without rendering them) and continues with the
   same weights, optimizer state and RNG state — on CPU the final weights are bitwise those of an
   uninterrupted run.
3. Each step: uint8 crops → device → ``views.mix_pixels`` → normalise → student (autocast on CUDA)
   → ``losses.sparse_kd_loss`` (or CE) → backward → clip → step, with a warm-up + cosine schedule.
4. Rank 0 writes ``config.json``, ``metrics.jsonl``, TensorBoard events (when installed),
   atomic checkpoints, ``student.pt`` and ``summary.json``.

Under ``torchrun`` every rank runs the same number of steps per epoch (see ``replay``), the model
is wrapped in DistributedDataParallel (NCCL on CUDA, gloo on CPU) and ``--batch-size`` is per process.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import BadImageError, KdcacheError
from .models import create_model, logits_of, normalize
from .precompute import resolve_device, teacher_topk_tensors
from .replay import (
    Batch, ReplayStream, ShardInfo, StreamConfig, WorkerError, _identity, epoch_batches, prepare_shards,
)
from .shards import decode_image, expand_urls, iter_samples, load_class_names
from .store import CacheReader
from .views import AugSpec, View, crop_tensor, mix_pixels

MODES = ("auto", "cached", "live", "labels")
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 1
BAD_KEYS_SHOWN = 20  # bad records named on stderr and in summary.json (all are counted)
# Settings that must not change when a run is resumed (the data order or the model would differ).
RESUME_FIXED = ("data", "cache", "student", "mode", "batch_size", "seed", "res", "world_size", "num_classes",
                "optimizer", "teacher", "views", "view_seed", "shuffle_buffer", "skip_bad")


@dataclass
class TrainConfig:
    data: str | list[str]
    student: str
    out: str
    cache: str | None = None
    teacher: str | None = None
    teacher_weights: str | None = None
    mode: str = "auto"  # auto: live with --teacher, cached with --cache, else labels
    student_weights: str | None = None
    num_classes: int | None = None
    epochs: int = 1
    batch_size: int = 128  # per process
    lr: float | None = None  # default 1e-3 (adamw) / 0.1 (sgd)
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    momentum: float = 0.9
    warmup_steps: int = 0
    min_lr: float = 0.0
    temperature: float = 1.0
    tail: str = "uniform"
    label_weight: float = 0.0
    res: int = 224
    teacher_res: int | None = None  # live: default the cache's resolution, else --res
    topk: int | None = None  # live: default the cache's k, else 10
    val_data: str | list[str] | None = None
    val_batch_size: int | None = None
    eval_every: int = 0  # steps; 0 = at each epoch end only
    checkpoint_every: int = 0  # steps; 0 = at each epoch end only
    log_every: int = 10
    workers: int = 4
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    amp: str = "bf16"  # bf16 | fp16 | none (CUDA only; CPU runs float32)
    channels_last: bool = False
    compile: bool = False
    grad_clip: float | None = None
    shuffle_buffer: int = 1024
    # Views without a cache (labels-only, live without --cache): drawn like precompute draws them.
    views: int | None = None  # V: epoch e uses view e mod V; None = a fresh view every epoch
    view_seed: int | None = None  # default --seed
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    mixup: bool = False
    # Without a cache: decode every image once before training and leave the undecodable ones out
    # (listed in summary.json) instead of stopping. With a cache its recorded bad images are left out anyway.
    skip_bad: bool = False
    loss_backend: str = "auto"
    stop_after: int | None = None  # stop after this many global steps (checkpoint written, no summary)
    progress: bool = True
    storage_options: dict | None = field(default=None)


# ---- setup helpers ---------------------------------------------------------------------------


def manifest_digest(manifest: dict) -> str:
    """sha256 of the canonical JSON of a cache manifest (sorted keys, no spaces)."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def init_distributed(device_arg: str) -> tuple[int, int, int]:
    """(rank, world, local rank). Under torchrun, joins the process group: NCCL when this process
    trains on CUDA, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and not str(device_arg).startswith("cpu")
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local


def resolve_mode(cfg: TrainConfig) -> str:
    if cfg.mode not in MODES:
        raise KdcacheError(f"--mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
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


def check_config(cfg: TrainConfig) -> None:
    if cfg.epochs < 1:
        raise KdcacheError("--epochs must be at least 1")
    if cfg.batch_size < 1:
        raise KdcacheError("--batch-size must be at least 1")
    if cfg.res < 8:
        raise KdcacheError("--res must be at least 8")
    if cfg.optimizer not in ("adamw", "sgd"):
        raise KdcacheError(f"--optimizer must be adamw or sgd, got {cfg.optimizer!r}")
    if cfg.amp not in ("bf16", "fp16", "none"):
        raise KdcacheError(f"--amp must be bf16, fp16 or none, got {cfg.amp!r}")
    if cfg.tail not in ("uniform", "renorm", "bucket"):
        raise KdcacheError(f"--tail must be uniform, renorm or bucket, got {cfg.tail!r}")
    if not cfg.temperature > 0:
        raise KdcacheError(f"--temperature must be > 0, got {cfg.temperature}")
    if cfg.label_weight < 0:
        raise KdcacheError(f"--label-weight must be >= 0, got {cfg.label_weight}")
    if cfg.views is not None and cfg.views < 1:
        raise KdcacheError("--views must be at least 1")
    if cfg.workers < 0:
        raise KdcacheError("--workers must be >= 0")


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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum; no weight decay on biases and normalisation weights (1-D)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def _unwrap(model):
    model = getattr(model, "_orig_mod", model)  # torch.compile
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)


def atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_json(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# ---- evaluation ------------------------------------------------------------------------------


def center_view(width: int, height: int, crop_fraction: float = 0.875) -> View:
    """The centre square of side ``crop_fraction·min(h, w)``: resized to R it is the classic
    'resize the shorter side to R/0.875, centre-crop R' (to the nearest source pixel)."""
    side = max(1, min(int(round(min(width, height) * crop_fraction)), width, height))
    return View((width - side) // 2, (height - side) // 2, side, side)


class ValStream(IterableDataset):
    """Validation images (centre view at ``res``) and labels; workers own whole shards."""

    def __init__(self, shards: list[ShardInfo], res: int, batch_size: int, rank: int, world: int,
                 skip_bad: bool = False):
        self.shards, self.res, self.batch_size, self.rank, self.world = shards, res, batch_size, rank, world
        self.skip_bad = skip_bad  # undecodable images are left out of the evaluation (not counted)

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        mine = self.shards[self.rank :: self.world][wid::nw]
        pix, lab = [], []
        try:
            for s in mine:
                for sample in iter_samples(s.url):
                    if sample.cls is None:
                        raise KdcacheError(f"sample {sample.key!r} in val shard {s.url} has no cls label; --val-data needs labelled shards")
                    try:
                        im = decode_image(sample)
                    except BadImageError:
                        if not self.skip_bad:
                            raise
                        continue
                    pix.append(crop_tensor(im, center_view(im.width, im.height), self.res))
                    lab.append(sample.cls)
                    if len(pix) == self.batch_size:
                        yield torch.stack(pix), torch.tensor(lab, dtype=torch.int64)
                        pix, lab = [], []
            if pix:
                yield torch.stack(pix), torch.tensor(lab, dtype=torch.int64)
        except KdcacheError as e:
            yield WorkerError(str(e))


@torch.no_grad()
def evaluate(model, stream: ValStream, workers: int, device, mean, std, num_classes: int, autocast, channels_last,
             world: int) -> dict:
    """Top-1 and top-5 (top-min(5, C)) accuracy over the validation shards (all ranks together)."""
    was = model.training
    model.eval()
    k5 = min(5, num_classes)
    counts = torch.zeros(3, dtype=torch.float64)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_identity,
                        pin_memory=device.type == "cuda")
    try:
        for item in loader:
            if isinstance(item, WorkerError):
                raise KdcacheError(item.message)
            pix, y = item
            x = normalize(mix_pixels(pix.to(device, non_blocking=True), None, None), mean, std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast():
                z = logits_of(model(x)).float()
            y = y.to(device)
            if int(y.max()) >= num_classes or int(y.min()) < 0:
                raise KdcacheError(f"a val label lies outside 0..{num_classes - 1}; --val-data has other classes")
            top = z.topk(k5, dim=1).indices
            hit = top.eq(y.unsqueeze(1))
            counts += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(), len(y)], dtype=torch.float64)
    finally:
        model.train(was)
    if world > 1:
        c = counts.to(device)
        dist.all_reduce(c)
        counts = c.cpu()
    n = max(counts[2].item(), 1.0)
    return {"val_top1": counts[0].item() / n, "val_top5": counts[1].item() / n, "val_images": int(counts[2].item())}


# ---- the run ---------------------------------------------------------------------------------


class _Writer:
    """Rank 0's outputs: metrics.jsonl and TensorBoard (when installed)."""

    def __init__(self, out: str, enabled: bool, truncate_to: int | None):
        self.enabled = enabled
        self.path = os.path.join(out, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        if truncate_to is not None and os.path.exists(self.path):
            with open(self.path, "r+b") as f:  # drop lines logged after the checkpoint we resume from
                f.truncate(truncate_to)
        self.f = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out, "tb"))
        except Exception:  # tensorboard not installed
            self.tb = None

    def log(self, rec: dict):
        if not self.enabled:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])

    def offset(self) -> int:
        if not self.enabled:
            return 0
        self.f.flush()
        return self.f.tell()

    def close(self):
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


def _rng_state(device) -> dict:
    st = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device) -> None:
    torch.set_rng_state(st["torch"])
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def _say(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, file=sys.stderr, flush=True)


def train(cfg: TrainConfig) -> dict:
    """Train a student; returns the summary dict (also written to ``RUN_DIR/summary.json``).

    With ``stop_after`` the run stops after that many global steps (checkpoint written, no
    summary.json, no student.pt) and returns ``{"stopped_at": step, "total_steps", "epoch",
    "step_in_epoch", "checkpoint", "mode", "out"}`` (``epoch``/``step_in_epoch``: where the last
    step ran); ``resume=True`` continues it.
    """
    check_config(cfg)
    mode = resolve_mode(cfg)
    rank, world, local = init_distributed(cfg.device)
    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    t_setup = time.perf_counter()

    urls = expand_urls(cfg.data)
    reader = CacheReader(cfg.cache, cfg.storage_options) if cfg.cache else None
    manifest = reader.manifest if reader is not None else None

    # -- class count, teacher, student --
    num_classes = cfg.num_classes
    if mode == "cached":
        if num_classes is not None and num_classes != reader.num_classes:
            raise KdcacheError(
                f"cache {cfg.cache} holds outputs of a {reader.num_classes}-class teacher but --num-classes is "
                f"{num_classes}; the student head must match the cache's classes"
            )
        num_classes = reader.num_classes
    teacher = t_mean = t_std = teacher_res = topk = None
    if mode == "live":
        # Like precompute: the class count given, or the one the cache's teacher had.
        tinfo = create_model(cfg.teacher, num_classes=num_classes or (reader.num_classes if reader else None),
                             weights=cfg.teacher_weights,
                             resolution=cfg.teacher_res or cfg.res)
        num_classes = tinfo.num_classes
        teacher = tinfo.model.to(device).eval()
        if device.type == "cuda":
            teacher = teacher.to(memory_format=torch.channels_last)
        for p in teacher.parameters():
            p.requires_grad_(False)
        t_mean, t_std = tinfo.mean, tinfo.std
        if manifest is not None and manifest["teacher"].get("spec") == cfg.teacher:
            # Normalise exactly as the cache's precompute did, so live targets equal cached ones.
            t_mean, t_std = tuple(manifest["teacher"]["mean"]), tuple(manifest["teacher"]["std"])
        teacher_res = cfg.teacher_res or (int(manifest["resolution"]) if manifest else cfg.res)
        topk = cfg.topk or (int(manifest["topk"]) if manifest else 10)
        if topk > num_classes:
            raise KdcacheError(f"--topk {topk} exceeds the teacher's {num_classes} classes")
    if num_classes is None and reader is not None:
        num_classes = reader.num_classes
    if num_classes is None:
        names = load_class_names(urls)
        num_classes = len(names) if names else None
    if num_classes is None:
        raise KdcacheError("cannot tell the number of classes: pass --num-classes (no cache and no classes.json beside the shards)")

    torch.manual_seed(cfg.seed)
    try:
        sinfo = create_model(cfg.student, num_classes=num_classes, weights=cfg.student_weights, resolution=cfg.res)
    except KdcacheError as e:
        where = f"cache {cfg.cache}" if mode == "cached" else ("the teacher" if mode == "live" else "the data")
        raise KdcacheError(f"student: {e} ({where} has {num_classes} classes)") from None
    model = sinfo.model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)

    # -- data: checks that need no decoding, then the stream --
    need_labels = mode == "labels" or cfg.label_weight > 0
    shards = prepare_shards(urls, reader, need_labels, rank, world, skip_bad=cfg.skip_bad)
    val_shards = None
    if cfg.val_data:
        val_shards = prepare_shards(expand_urls(cfg.val_data), None, True, rank, world)
    view_seed = cfg.seed if cfg.view_seed is None else cfg.view_seed
    try:
        aug = AugSpec(scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), flip=cfg.flip, mixup=cfg.mixup)
    except ValueError as e:
        raise KdcacheError(f"invalid --scale/--ratio: {e}") from None
    stream = ReplayStream(shards, StreamConfig(
        batch_size=cfg.batch_size, res=cfg.res, seed=cfg.seed, cache=cfg.cache, storage_options=cfg.storage_options,
        with_targets=mode == "cached", teacher_res=(teacher_res if mode == "live" and teacher_res != cfg.res else None),
        views=cfg.views, view_seed=view_seed, aug=aug, need_labels=need_labels, num_classes=num_classes,
        shuffle_buffer=cfg.shuffle_buffer, rank=rank, world=world, workers=cfg.workers, skip_bad=cfg.skip_bad,
    ))
    plans = [stream.plan(e) for e in range(cfg.epochs)]
    steps_per_epoch = [p.steps for p in plans]
    total_steps = sum(steps_per_epoch)
    V = stream.num_views
    views_reused = V is not None and cfg.epochs > V
    if views_reused:
        msg = (f"training for {cfg.epochs} epochs over {V} stored views: views are reused from epoch {V} on "
               f"(epoch e replays view e mod {V})")
        if rank == 0:
            warnings.warn(msg, stacklevel=2)
    bad_keys = [f"{s.name}/{k}" for s in shards for k in s.bad]
    if bad_keys:
        why = "recorded as bad in the cache" if reader is not None else "--skip-bad"
        shown = ", ".join(bad_keys[:BAD_KEYS_SHOWN])
        more = f" and {len(bad_keys) - BAD_KEYS_SHOWN} more" if len(bad_keys) > BAD_KEYS_SHOWN else ""
        _say(rank, f"note: {len(bad_keys)} undecodable image{'s' if len(bad_keys) != 1 else ''} left out ({why}): "
             f"{shown}{more}")
    if plans[0].dropped and rank == 0:
        _say(rank, f"note: {world} ranks hold uneven shares of the shards; to keep every rank's step count equal, "
             f"{plans[0].dropped} of {sum(s.count for s in shards)} records are left out of epoch 0")

    # -- run directory, resume --
    out = cfg.out
    ckpt_path = os.path.join(out, CHECKPOINT)
    resolved = {
        "mode": mode, "num_classes": num_classes, "world_size": world, "device": str(device),
        "amp": cfg.amp if device.type == "cuda" else "none",
        "student_mean": list(sinfo.mean), "student_std": list(sinfo.std),
        "views": V, "view_seed": view_seed if reader is None else int(manifest["seed"]),
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
        "cache_manifest_sha256": manifest_digest(manifest) if manifest else None,
        "teacher_res": teacher_res if mode == "live" else (int(manifest["resolution"]) if manifest else None),
        "topk": topk if mode == "live" else (int(manifest["topk"]) if manifest else None),
        "torch": str(torch.__version__),
    }
    run_config = {**asdict(cfg), "resolved": resolved}
    ckpt = None
    if os.path.exists(ckpt_path):
        if not cfg.resume:
            raise KdcacheError(f"{out} already holds a run ({CHECKPOINT}); pass --resume to continue it or choose a new --out")
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise KdcacheError(f"cannot read checkpoint {ckpt_path}: {e}") from None
        _check_resume(ckpt["config"], run_config, cfg, rank)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        if ckpt is None:
            atomic_json(run_config, os.path.join(out, "config.json"))
    if world > 1:
        dist.barrier()

    # -- optimizer, AMP, DDP --
    base_lr = cfg.lr if cfg.lr is not None else (0.1 if cfg.optimizer == "sgd" else 1e-3)
    opt = make_optimizer(model, cfg, base_lr)
    cuda = device.type == "cuda"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp) if cuda else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    def autocast():
        return torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else nullcontext()

    epoch0, skip0, step = 0, 0, 0
    best = {"best_val_top1": None, "best_val_top5": None, "best_step": None}
    last_val: dict = {}
    train_time, images_seen, prev_wall, train_cpu = 0.0, 0, 0.0, 0.0
    if ckpt is not None:
        _unwrap(model).load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if "scaler" in ckpt and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        epoch0, skip0, step = int(ckpt["epoch"]), int(ckpt["step_in_epoch"]), int(ckpt["global_step"])
        best, last_val = dict(ckpt["best"]), dict(ckpt["last_val"])
        train_time, images_seen = float(ckpt["train_time_s"]), int(ckpt["images_seen"])
        train_cpu = float(ckpt.get("train_cpu_s", 0.0))
        prev_wall = float(ckpt.get("wall_time_s", 0.0))
        _set_rng_state(ckpt["rng"], device)
        _say(rank, f"resuming {out} at epoch {epoch0}, step {skip0} of the epoch (global step {step})")
    writer = _Writer(out, rank == 0, int(ckpt["metrics_bytes"]) if ckpt is not None else None)

    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model, device_ids=[device.index] if cuda else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    model.train()

    val_stream = (ValStream(val_shards, cfg.res, cfg.val_batch_size or cfg.batch_size, rank, world, cfg.skip_bad)
                  if val_shards else None)

    def run_eval(epoch: int) -> dict:
        r = evaluate(_unwrap(train_model), val_stream, cfg.workers, device, sinfo.mean, sinfo.std, num_classes,
                     autocast, cfg.channels_last, world)
        last_val.clear()
        last_val.update(r)
        if best["best_val_top1"] is None or r["val_top1"] > best["best_val_top1"]:
            best.update(best_val_top1=r["val_top1"], best_val_top5=r["val_top5"], best_step=step)
        writer.log({"step": step, "epoch": epoch, **r})
        return r

    def save_checkpoint(epoch: int, in_epoch: int) -> None:
        if rank != 0:
            return
        atomic_save({
            "version": CHECKPOINT_VERSION, "model": _unwrap(train_model).state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else {}, "epoch": epoch, "step_in_epoch": in_epoch,
            "global_step": step, "rng": _rng_state(device), "best": best, "last_val": dict(last_val),
            "train_time_s": train_time, "train_cpu_s": train_cpu, "images_seen": images_seen,
            "metrics_bytes": writer.offset(),
            "wall_time_s": prev_wall + time.perf_counter() - t_setup,
            "config": run_config,
        }, ckpt_path)

    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, unit="step", desc=f"train ({mode})", dynamic_ncols=True)

    _say(rank, f"kdcache train: mode {mode}, {len(shards)} shards, {sum(s.count for s in shards)} records, "
         f"{num_classes} classes, {cfg.epochs} epochs x {steps_per_epoch[0]} steps, device {device}, world {world}")
    win_loss = torch.zeros((), dtype=torch.float64, device=device)
    win_steps, win_imgs, win_time = 0, 0, 0.0
    setup_s = time.perf_counter() - t_setup
    stopped, stop_epoch, stop_in_epoch = False, None, None

    for epoch in range(epoch0, cfg.epochs):
        skip = skip0 if epoch == epoch0 else 0
        in_epoch = skip
        t_epoch = t_mark = time.perf_counter()
        c_mark = time.process_time()
        for batch in epoch_batches(stream, epoch, skip_batches=skip, pin_memory=cuda):
            lr = lr_at(step, base_lr, cfg.warmup_steps, total_steps, cfg.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            loss = _step_loss(train_model, batch, mode, cfg, device, sinfo, num_classes, autocast, teacher,
                              (t_mean, t_std, topk) if teacher is not None else None)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(train_model.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            step += 1
            in_epoch += 1
            n = len(batch) * world
            images_seen += n
            win_loss += loss.detach().double()
            win_steps += 1
            win_imgs += n
            now = time.perf_counter()  # training time: steps plus waiting for data, not eval/checkpoints
            train_time += now - t_mark
            win_time += now - t_mark
            t_mark = now
            cnow = time.process_time()  # this process's CPU time (not the data workers'): robust to a busy machine
            train_cpu += cnow - c_mark
            c_mark = cnow
            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or in_epoch == steps_per_epoch[epoch]:
                lv = win_loss.clone()
                if world > 1:
                    dist.all_reduce(lv)
                    lv /= world
                ips = win_imgs / max(win_time, 1e-9)
                rec = {"step": step, "epoch": epoch, "loss": lv.item() / win_steps, "lr": lr, "images_per_s": ips}
                writer.log(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{ips:.0f}")
                win_loss.zero_()
                win_steps, win_imgs, win_time = 0, 0, 0.0
            end_of_epoch = in_epoch == steps_per_epoch[epoch]
            if val_stream is not None and cfg.eval_every and step % cfg.eval_every == 0 and not end_of_epoch:
                run_eval(epoch)
                t_mark, c_mark = time.perf_counter(), time.process_time()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not end_of_epoch:
                save_checkpoint(epoch, in_epoch)
                t_mark, c_mark = time.perf_counter(), time.process_time()
            if cfg.stop_after is not None and step >= cfg.stop_after and not end_of_epoch:
                save_checkpoint(epoch, in_epoch)
                stopped, stop_epoch, stop_in_epoch = True, epoch, in_epoch
                break
        if stopped:
            break
        if val_stream is not None:
            run_eval(epoch)
        writer.log({"step": step, "epoch": epoch, "epoch_end": True, "epoch_s": time.perf_counter() - t_epoch,
                    "records_dropped": plans[epoch].dropped})
        save_checkpoint(epoch + 1, 0)
        if cfg.stop_after is not None and step >= cfg.stop_after and epoch + 1 < cfg.epochs:
            stopped, stop_epoch, stop_in_epoch = True, epoch, in_epoch
            break
    if bar is not None:
        bar.close()

    if stopped:
        writer.close()
        if world > 1:
            dist.barrier()
        return {"stopped_at": step, "total_steps": total_steps, "epoch": stop_epoch, "step_in_epoch": stop_in_epoch,
                "checkpoint": ckpt_path, "mode": mode, "out": out}

    summary = {
        "mode": mode, "student": cfg.student, "num_classes": num_classes, "epochs": cfg.epochs, "steps": step,
        "images_seen": images_seen, "world_size": world, "device": str(device),
        "final_val_top1": last_val.get("val_top1"), "final_val_top5": last_val.get("val_top5"),
        **best,
        "images_per_s": images_seen / max(train_time, 1e-9),
        "wall_time_s": None, "train_time_s": train_time, "setup_s": setup_s,
        "main_cpu_ms_per_image": 1000.0 * train_cpu / max(images_seen / world, 1),
        "cache": cfg.cache, "cache_manifest_sha256": resolved["cache_manifest_sha256"],
        "views": V, "views_reused": views_reused,
        "records_dropped": sum(p.dropped for p in plans),
        "bad_records": len(bad_keys), "bad_keys": bad_keys[:BAD_KEYS_SHOWN],
    }
    summary["wall_time_s"] = prev_wall + time.perf_counter() - t_setup
    if rank == 0:
        torch.save(_unwrap(train_model).state_dict(), os.path.join(out, "student.pt.tmp"))
        os.replace(os.path.join(out, "student.pt.tmp"), os.path.join(out, "student.pt"))
        atomic_json(summary, os.path.join(out, "summary.json"))
    writer.close()
    if world > 1:
        dist.barrier()
    return summary


def _check_resume(old: dict, new: dict, cfg: TrainConfig, rank: int) -> None:
    diffs = []
    defaults = asdict(TrainConfig(data="", student="", out=""))
    for k in RESUME_FIXED:
        # a setting the checkpoint's kdcache did not have yet ran at today's default
        a = old.get(k, old.get("resolved", {}).get(k, defaults.get(k)))
        b = new.get(k, new.get("resolved", {}).get(k))
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            diffs.append(f"{k}: checkpoint has {a!r}, this run has {b!r}")
    if diffs:
        raise KdcacheError("cannot resume: the run was started with other settings:\n  " + "\n  ".join(diffs))
    for k in ("workers", "epochs"):
        if old.get(k) != new.get(k):
            _say(rank, f"warning: resuming with {k}={new.get(k)} (was {old.get(k)}): the run continues, but "
                 "the batches (workers) or the schedule (epochs) differ from an uninterrupted run")


def _step_loss(model, batch: Batch, mode: str, cfg: TrainConfig, device, sinfo, num_classes: int, autocast,
               teacher, tspec) -> torch.Tensor:
    from .losses import sparse_kd_loss

    raw = batch.pixels(device)
    x = normalize(raw, sinfo.mean, sinfo.std)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast():
        z = logits_of(model(x))
    if mode == "labels":
        return F.cross_entropy(z.float(), batch.targets(num_classes, device))
    if mode == "cached":
        lp = batch.logprobs.to(device, non_blocking=True)
        ids = batch.classes.to(device, non_blocking=True)
    else:
        t_mean, t_std, k = tspec
        tx = batch.teacher_pixels(device)
        with torch.no_grad():
            lp, ids = teacher_topk_tensors(teacher, raw if tx is None else tx, t_mean, t_std, k, device)
    labels = batch.targets(num_classes, device) if cfg.label_weight > 0 else None
    # The logits go in their own dtype: the fused kernel reads bf16/fp16 and writes the gradient in it.
    return sparse_kd_loss(z, lp, ids, temperature=cfg.temperature, tail=cfg.tail, labels=labels,
                          label_weight=cfg.label_weight, backend=cfg.loss_backend)
