"""What training is asked to do: ``TrainConfig``, and the checks every command's config shares.

A config checks its values when it is made, so the Python API and the CLI share one validation,
and the CLI takes its flags' defaults from the fields (``cli.options.config_default``). The tools'
configs (precompute, verify, evaluate) are in ``tools/config.py``.
"""

from __future__ import annotations

import math
import numbers
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


# ---- numeric settings: one table per config, checked when the config is made ----------------------
# A rule is (what the error says, the test). The tests are written so that NaN fails every one.


def at_least(low: int):
    return f"at least {low}", lambda v: v >= low


POSITIVE = "> 0", lambda v: 0 < v < math.inf
NON_NEGATIVE = ">= 0", lambda v: 0 <= v < math.inf
UNIT = "in [0, 1]", lambda v: 0 <= v <= 1
BELOW_ONE = "in [0, 1)", lambda v: 0 <= v < 1

TRAIN_NUMBERS = (
    ("epochs", at_least(1)), ("batch_size", at_least(1)), ("lr", POSITIVE), ("min_lr", NON_NEGATIVE),
    ("weight_decay", NON_NEGATIVE), ("momentum", BELOW_ONE), ("warmup_steps", at_least(0)),
    ("temperature", POSITIVE), ("label_weight", NON_NEGATIVE), ("grad_clip", POSITIVE),
    ("res", at_least(8)), ("teacher_res", at_least(8)), ("topk", at_least(1)), ("num_classes", at_least(1)),
    ("val_batch_size", at_least(1)), ("eval_every", at_least(0)), ("eval_epochs", at_least(1)),
    ("checkpoint_every", at_least(0)), ("log_every", at_least(1)), ("workers", at_least(0)),
    ("worker_timeout", POSITIVE), ("threads", at_least(1)), ("shuffle_buffer", at_least(0)), ("views", at_least(1)),
    ("stop_after", at_least(1)), ("views_used", at_least(1)), ("spot_check", UNIT),
)
SELF_DISTILL_NUMBERS = (("alpha", UNIT), ("temperature", POSITIVE), ("feature_weight", NON_NEGATIVE))
# Seeds: any integer (each is hashed or given to torch as it is).
SEEDS = {"precompute": ("seed", "random_init"), "train": ("seed", "view_seed", "teacher_random_init"),
         "verify": ("seed",)}


def check_numbers(cfg, rules, seeds=(), flag_prefix: str = "") -> None:
    """Every numeric setting of ``cfg`` against its rule (``None``: not given, left to a default). The
    error names the flag: ``--`` + ``flag_prefix`` + the field's name with dashes."""
    for name, (want, ok) in rules:
        for value in each_value(getattr(cfg, name)):
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not ok(value):
                raise KdcacheError(f"--{flag_prefix}{name.replace('_', '-')} must be {want}, got {value!r}")
    for name in seeds:
        for value in each_value(getattr(cfg, name)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise KdcacheError(f"--{name.replace('_', '-')} must be an integer, got {value!r}")


def each_value(value) -> list:
    """A setting's given values: none for None, each item of a per-teacher list (an ensemble's
    --teacher-res, --teacher-random-init), else the value itself."""
    if value is None:
        return []
    return [v for v in value if v is not None] if isinstance(value, list) else [value]


@dataclass
class TrainConfig:
    """Everything ``train`` needs; checked when it is made (the CLI and the Python API alike)."""

    data: str | list[str]
    student: str
    out: str
    cache: str | None = None
    teacher: str | list[str] | None = None  # live; several: an ensemble (the per-teacher fields then take lists)
    teacher_weights: str | list[str] | None = None
    teacher_random_init: int | list[int] | None = None  # live: a seeded random teacher (default: the cache's seed)
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
    teacher_res: int | list[int] | None = None  # live: default the cache's resolution(s), else the student's
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
    views_used: int | None = None  # with a cache: replay its first N views only (epoch e: view e mod N)
    loss_backend: str = "auto"  # the KD loss: auto (the Triton kernel on CUDA), torch (the reference), triton
    stop_after: int | None = None  # stop after this many global steps (checkpoint written, no summary)
    # Re-run the cache's teacher on this fraction of the steps and compare with the stored targets
    # (spotcheck.py); a disagreement stops the run (exit 1) unless spot_check_warn.
    spot_check: float = 0.0
    spot_check_warn: bool = False
    progress: bool = True
    storage_options: dict | None = None
    # Self-distillation (selfdistill.py, exits.py): exits after the student's stages, deep-to-shallow
    # distillation. None: off; a SelfDistillConfig (True: its defaults; a dict: its fields, as config.json holds it).
    self_distill: SelfDistillConfig | bool | dict | None = None

    def __post_init__(self):
        check_numbers(self, TRAIN_NUMBERS, SEEDS["train"])
        if self.min_lr > self.base_lr:
            raise KdcacheError(f"--min-lr {self.min_lr:g} is above the peak learning rate {self.base_lr:g}"
                               f"{'' if self.lr is not None else f' (the {self.optimizer} default)'}: the cosine ends at "
                               "--min-lr, so the rate would rise; give a --min-lr at most --lr")
        from .losses import BACKENDS as LOSS_BACKENDS, TAIL_MODES

        choices = (("mode", MODES), ("optimizer", OPTIMIZERS), ("amp", AMP_MODES), ("tail", TAIL_MODES),
                   ("student_view", STUDENT_VIEWS), ("loss_backend", LOSS_BACKENDS))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise KdcacheError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.views_used is not None and not self.cache:
            raise KdcacheError("--views-used picks among a cache's stored views: it needs --cache (without one, "
                               "--views V sets how many views the trainer draws)")
        if not isinstance(self.aug, AugSpec):
            raise KdcacheError(f"aug must be a views.AugSpec, got {type(self.aug).__name__}")
        if self.student_view == "fresh" and not self.cache:
            raise KdcacheError("--student-view fresh draws the student its own crops against a cache's targets; it "
                               "needs --cache (without one, every view is the student's own already)")
        if self.student_view == "fresh" and (self.teacher or self.mode == "live"):
            raise KdcacheError("--student-view fresh needs cached targets: a live teacher always sees the student's "
                               "own view (use --mode cached, or drop --teacher)")
        if self.spot_check > 0 and not (self.cache and pick_mode(self) == "cached"):
            raise KdcacheError("--spot-check re-runs the cache's teacher against the cache's targets: it needs --cache "
                               "in cached mode (a live teacher is checked by construction)")
        if self.spot_check > 0 and self.student_view == "fresh":
            raise KdcacheError("--spot-check compares the teacher on the views it saw; with --student-view fresh the "
                               "student trains on its own crops, so there is nothing to compare. Check the cache with "
                               "`kdcache verify` instead")
        if self.student_view == "fresh" and self.aug.mixup:
            raise KdcacheError("--student-view fresh gives the student unmixed crops of its own; drop --mixup")
        check_signal(self, pick_mode(self))  # the flag combinations
        self.self_distill = self_distill_config(self.self_distill)
        if self.self_distill is not None and self.self_distill.teacher != "deepest" and pick_mode(self) == "labels":
            raise KdcacheError(f"--sd-teacher {self.self_distill.teacher} distils the shallow exits from the teacher's "
                               "top-k: it needs a cache (--cache, cached mode) or a live --teacher; without one use "
                               "--sd-teacher deepest")

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else (0.1 if self.optimizer == "sgd" else 1e-3)


SD_TEACHERS = ("deepest", "cache", "both")


@dataclass
class SelfDistillConfig:
    """The self-distillation group of ``TrainConfig`` (``--self-distill`` and the ``--sd-*`` flags);
    checked when it is made. ``exits`` becomes ``"all"`` or a sorted list of stage numbers (whether
    those stages exist is checked when the student is built)."""

    alpha: float = 0.3  # weight of a shallow exit's distillation term; 1 − α goes to its CE on the labels
    temperature: float = 3.0
    feature_weight: float = 0.0  # weight of the hint loss (exit feature vs the deepest, L2); 0 = off
    exits: str | list = "all"  # "all" (after every stage but the last) or stage numbers, 1-based: "1,2" / [1, 2]
    teacher: str = "deepest"  # deepest | cache | both: what the shallow exits distil from

    def __post_init__(self):
        check_numbers(self, SELF_DISTILL_NUMBERS, flag_prefix="sd-")
        if self.teacher not in SD_TEACHERS:
            raise KdcacheError(f"--sd-teacher must be one of {', '.join(SD_TEACHERS)}, got {self.teacher!r}")
        self.exits = exit_stages(self.exits)


def exit_stages(exits) -> str | list[int]:
    """``--sd-exits`` as ``"all"`` or a sorted list of distinct stage numbers from 1."""
    given = exits
    if isinstance(exits, str) and exits.strip().lower() != "all":
        try:
            exits = [int(x) for x in exits.split(",") if x.strip()]
        except ValueError:
            raise KdcacheError(f"--sd-exits must be 'all' or stage numbers like 1,2; got {given!r}") from None
    if isinstance(exits, str):
        return "all"
    try:
        exits = sorted({int(x) for x in exits})
    except (TypeError, ValueError):
        raise KdcacheError(f"--sd-exits must be 'all' or stage numbers like 1,2; got {given!r}") from None
    if not exits or min(exits) < 1:
        raise KdcacheError(f"--sd-exits takes stage numbers from 1 (after the first stage); got {given!r}")
    return exits


SD_LEGACY_FIELDS = {"sd_alpha": "alpha", "sd_temperature": "temperature", "sd_feature_weight": "feature_weight",
                    "sd_exits": "exits", "sd_teacher": "teacher"}


def self_distill_config(value) -> SelfDistillConfig | None:
    """``TrainConfig.self_distill`` from what a user or a config.json gives: None or False (off), True (the
    defaults), a SelfDistillConfig, or a dict of its fields."""
    if value is None or value is False:
        return None
    if value is True:
        return SelfDistillConfig()
    if isinstance(value, SelfDistillConfig):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(SelfDistillConfig.__dataclass_fields__))
        if unknown:
            raise KdcacheError(f"self_distill has no setting {', '.join(unknown)}; its settings are "
                               f"{', '.join(SelfDistillConfig.__dataclass_fields__)}")
        return SelfDistillConfig(**value)
    raise KdcacheError(f"self_distill takes a SelfDistillConfig, a dict of its settings, True or None; got "
                       f"{type(value).__name__}")


def run_self_distill(config: dict) -> SelfDistillConfig | None:
    """A run's self-distillation settings from its config.json: the nested group, or the flat ``sd_*``
    fields kdcache wrote before 2026-12-04 next to ``"self_distill": true``."""
    value = config.get("self_distill")
    if value is True and any(k in config for k in SD_LEGACY_FIELDS):
        value = {SD_LEGACY_FIELDS[k]: config[k] for k in SD_LEGACY_FIELDS if k in config}
    return self_distill_config(value)
