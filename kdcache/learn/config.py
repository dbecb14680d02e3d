"""What each stage is asked to do: ``PrecomputeConfig`` and ``TrainConfig``.

Both check their values when they are made, so the Python API and the CLI share one validation,
and the CLI takes its flags' defaults from these fields (``cli.options.config_default``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import KdcacheError
from ..runtime import default_workers
from ..data.views import AugSpec
from .modes import MODES as MODE_FACTORIES
from .modes import pick as pick_mode
from .signals import check_signal

MODES = ("auto", *MODE_FACTORIES)  # auto: live with --teacher, cached with --cache, else labels

OPTIMIZERS = ("adamw", "sgd")
AMP_MODES = ("bf16", "fp16", "none")
STUDENT_VIEWS = ("cache", "fresh")


@dataclass
class PrecomputeConfig:
    """Everything ``precompute`` needs; checked when it is made (the CLI and the Python API alike)."""

    data: str | list[str]
    teacher: str
    out: str
    teacher_weights: str | None = None
    pretrained: bool = False
    random_init: int | None = None  # a seeded random teacher, on purpose (benchmarks, tests)
    num_classes: int | None = None
    views: int = 10
    topk: int = 10
    seed: int = 0
    res: int = 224
    aug: AugSpec = field(default_factory=AugSpec)
    batch_size: int = 256
    device: str = "auto"
    workers: int = field(default_factory=default_workers)
    worker_timeout: float = 600.0  # seconds to wait for a batch from the data workers before giving up
    threads: int | None = None  # torch threads of the main process; default: the cores the workers leave
    mean: tuple | None = None
    std: tuple | None = None
    shard_index: int = 0
    num_shard_groups: int = 1
    skip_bad: bool = False
    progress: bool = True
    storage_options: dict | None = None
    render: str = "pil"  # render backend (views.RENDER_BACKENDS): pil, or torch (decodes and crops on the device)
    # What the cache keeps of the teacher (targets.py): its top-k, or N classes drawn from its distribution.
    targets: str = "topk"
    samples: int = 12  # --targets sample: draws per record
    sample_temperature: float = 1.0  # --targets sample: the draws are from softmax(logits / this)
    compact: bool = False  # the compact layout (encoding.py): quantised log-probs, class lists, derived views

    def __post_init__(self):
        from ..data.render import RENDER_BACKENDS
        from ..cache.store import MAX_COUNT
        from ..cache.targets import TARGET_KINDS

        if self.targets not in TARGET_KINDS:
            raise KdcacheError(f"--targets must be one of {', '.join(TARGET_KINDS)}, got {self.targets!r}")
        if not 1 <= self.samples <= MAX_COUNT:
            raise KdcacheError(f"--samples must be in 1..{MAX_COUNT} (counts are stored as bytes), got {self.samples}")
        if not (self.sample_temperature > 0 and self.sample_temperature < float("inf")):
            raise KdcacheError(f"--sample-temperature must be > 0, got {self.sample_temperature}")

        if self.render not in RENDER_BACKENDS:
            raise KdcacheError(f"--render must be one of {', '.join(RENDER_BACKENDS)}, got {self.render!r}")
        for name, low in (("views", 1), ("topk", 1), ("batch_size", 1), ("res", 8), ("workers", 0)):
            if getattr(self, name) < low:
                raise KdcacheError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        if not isinstance(self.aug, AugSpec):
            raise KdcacheError(f"aug must be a views.AugSpec, got {type(self.aug).__name__}")
        if self.aug.name == "center_crop" and self.views != 1:
            raise KdcacheError(f"--center-crop gives every image one view, the centre crop; pass --views 1 (not "
                               f"{self.views}: the others would be copies)")
        if self.num_shard_groups < 1 or not 0 <= self.shard_index < self.num_shard_groups:
            raise KdcacheError(f"--shard-index must be in [0, --num-shard-groups); got {self.shard_index} of "
                               f"{self.num_shard_groups}")


@dataclass
class TrainConfig:
    """Everything ``train`` needs; checked when it is made (the CLI and the Python API alike)."""

    data: str | list[str]
    student: str
    out: str
    cache: str | None = None
    teacher: str | None = None
    teacher_weights: str | None = None
    teacher_random_init: int | None = None  # live: a seeded random teacher (default: the cache's seed, if it has one)
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
    # Cached mode: what the student learns from the cache (signals.SIGNALS): the stored targets ("full"), or a
    # signal derived from them and the labels (smoothing, relations, reweight, ...), docs/losses.md.
    kd_signal: str = "full"
    res: int | None = None  # default: the cache's resolution, else 224
    teacher_res: int | None = None  # live: default the cache's resolution, else the student's
    topk: int | None = None  # live: default the cache's k, else 10
    val_data: str | list[str] | None = None
    val_batch_size: int | None = None
    eval_every: int = 0  # steps; 0 = at the epoch ends only
    eval_epochs: int = 1  # evaluate at the end of every N-th epoch (and of the last)
    checkpoint_every: int = 0  # steps; 0 = at each epoch end only
    log_every: int = 10
    workers: int = field(default_factory=default_workers)
    worker_timeout: float = 600.0  # seconds to wait for a batch from the data workers before giving up
    threads: int | None = None  # torch threads of the main process; default: the cores the workers leave
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
    aug: AugSpec = field(default_factory=AugSpec)
    # Without a cache: decode every image once before training and leave the undecodable ones out
    # (listed in summary.json) instead of stopping. With a cache its recorded bad images are left out anyway.
    skip_bad: bool = False
    allow_edited_cache: bool = False  # train on cache views that no longer match their recorded digests
    # With a cache: "cache" = the student sees the view the teacher saw (consistent); "fresh" = its own
    # seeded crop each epoch, targets from the cache (independent views, or the fixed teacher with a
    # --center-crop cache).
    student_view: str = "cache"
    loss_backend: str = "auto"
    stop_after: int | None = None  # stop after this many global steps (checkpoint written, no summary)
    progress: bool = True
    storage_options: dict | None = None
    # Self-distillation (selfdistill.py, exits.py): exits after the student's stages, deep-to-shallow distillation.
    self_distill: bool = False
    sd_alpha: float = 0.3  # weight of the distillation term of a shallow exit; 1 − α goes to its CE on the labels
    sd_temperature: float = 3.0
    sd_feature_weight: float = 0.0  # weight of the hint loss (exit feature vs the deepest, L2); 0 = off
    sd_exits: str | list = "all"  # "all" (after every stage but the last) or stage numbers, 1-based: "1,2" / [1, 2]
    sd_teacher: str = "deepest"  # deepest | cache | both: what the shallow exits distil from

    def __post_init__(self):
        for name, low in (("epochs", 1), ("batch_size", 1), ("res", 8), ("workers", 0), ("log_every", 1),
                          ("eval_epochs", 1)):
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise KdcacheError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        from .losses import TAIL_MODES

        choices = (("mode", MODES), ("optimizer", OPTIMIZERS), ("amp", AMP_MODES), ("tail", TAIL_MODES),
                   ("student_view", STUDENT_VIEWS))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise KdcacheError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise KdcacheError(f"--temperature must be > 0, got {self.temperature}")
        if self.label_weight < 0:
            raise KdcacheError(f"--label-weight must be >= 0, got {self.label_weight}")
        if self.views is not None and self.views < 1:
            raise KdcacheError("--views must be at least 1")
        if not isinstance(self.aug, AugSpec):
            raise KdcacheError(f"aug must be a views.AugSpec, got {type(self.aug).__name__}")
        if self.student_view == "fresh" and not self.cache:
            raise KdcacheError("--student-view fresh draws the student its own crops against a cache's targets; it "
                               "needs --cache (without one, every view is the student's own already)")
        if self.student_view == "fresh" and (self.teacher or self.mode == "live"):
            raise KdcacheError("--student-view fresh needs cached targets: a live teacher always sees the student's "
                               "own view (use --mode cached, or drop --teacher)")
        if self.student_view == "fresh" and self.aug.mixup:
            raise KdcacheError("--student-view fresh gives the student unmixed crops of its own; drop --mixup")
        check_signal(self, pick_mode(self))  # the flag combinations
        check_self_distill(self)

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else (0.1 if self.optimizer == "sgd" else 1e-3)


SD_TEACHERS = ("deepest", "cache", "both")


def check_self_distill(cfg: TrainConfig) -> None:
    """The self-distillation settings; ``sd_exits`` becomes ``"all"`` or a sorted list of stage numbers
    (whether those stages exist is checked when the student is built)."""
    if not 0.0 <= cfg.sd_alpha <= 1.0:
        raise KdcacheError(f"--sd-alpha must lie in [0, 1], got {cfg.sd_alpha}")
    if not cfg.sd_temperature > 0:
        raise KdcacheError(f"--sd-temperature must be > 0, got {cfg.sd_temperature}")
    if not cfg.sd_feature_weight >= 0:
        raise KdcacheError(f"--sd-feature-weight must be >= 0, got {cfg.sd_feature_weight}")
    if cfg.sd_teacher not in SD_TEACHERS:
        raise KdcacheError(f"--sd-teacher must be one of {', '.join(SD_TEACHERS)}, got {cfg.sd_teacher!r}")
    exits = cfg.sd_exits
    if isinstance(exits, str) and exits.strip().lower() != "all":
        try:
            exits = [int(x) for x in exits.split(",") if x.strip()]
        except ValueError:
            raise KdcacheError(f"--sd-exits must be 'all' or stage numbers like 1,2; got {cfg.sd_exits!r}") from None
    if isinstance(exits, str):
        exits = "all"
    else:
        try:
            exits = sorted({int(x) for x in exits})
        except (TypeError, ValueError):
            raise KdcacheError(f"--sd-exits must be 'all' or stage numbers like 1,2; got {cfg.sd_exits!r}") from None
        if not exits or min(exits) < 1:
            raise KdcacheError(f"--sd-exits takes stage numbers from 1 (after the first stage); got {cfg.sd_exits!r}")
    cfg.sd_exits = exits
    if cfg.self_distill and cfg.sd_teacher != "deepest" and pick_mode(cfg) == "labels":
        raise KdcacheError(f"--sd-teacher {cfg.sd_teacher} distils the shallow exits from the teacher's top-k: it needs "
                           "a cache (--cache, cached mode) or a live --teacher; without one use --sd-teacher deepest")
