"""What each tool is asked to do: ``PrecomputeConfig``, ``VerifyConfig``, ``EvaluateConfig``.

Like ``TrainConfig`` they check their values when they are made (one validation for the CLI and the
Python API) and hold the defaults the CLI shows (``cli.options.config_default``), written once.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

from ..cache.agreement import ATOL, RTOL
from ..data.views import AugSpec
from ..errors import KdcacheError
from ..learn.config import NON_NEGATIVE, POSITIVE, SEEDS, at_least, check_numbers
from ..runtime import default_workers

PRECOMPUTE_NUMBERS = (
    ("views", at_least(1)), ("topk", at_least(1)), ("batch_size", at_least(1)), ("res", at_least(8)),
    ("workers", at_least(0)), ("threads", at_least(1)), ("num_classes", at_least(1)),
    ("worker_timeout", POSITIVE), ("sample_temperature", POSITIVE),
)
VERIFY_NUMBERS = (("samples", at_least(1)), ("batch_size", at_least(1)), ("atol", NON_NEGATIVE),
                  ("rtol", NON_NEGATIVE), ("num_classes", at_least(1)))
EVALUATE_NUMBERS = (("batch_size", at_least(1)), ("workers", at_least(0)))


@dataclass
class PrecomputeConfig:
    """Everything ``precompute`` needs; checked when it is made (the CLI and the Python API alike)."""

    data: str | list[str]
    teacher: str | list[str]  # several: an ensemble (``members``); the per-member fields below then take lists
    out: str
    teacher_weights: str | list[str] | None = None
    pretrained: bool = False
    random_init: int | list[int] | None = None  # a seeded random teacher, on purpose (benchmarks, tests)
    num_classes: int | None = None
    views: int = 10
    topk: int = 10
    seed: int = 0
    res: int = 224
    teacher_res: int | list[int] | None = None  # per member; default ``res`` for every member
    aug: AugSpec = field(default_factory=AugSpec)
    batch_size: int = 256
    device: str = "auto"
    workers: int = field(default_factory=default_workers)
    worker_timeout: float = 600.0  # seconds to wait for a batch from the data workers before giving up
    threads: int | None = None  # torch threads of the main process; default: the cores the workers leave
    mean: tuple | list[tuple] | None = None  # per member with several teachers
    std: tuple | list[tuple] | None = None
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
        check_numbers(self, PRECOMPUTE_NUMBERS, ("seed",))
        for m in self.members():  # the per-member values: counts matched to the teachers, each checked
            check_member(m)
        if not 1 <= self.samples <= MAX_COUNT:
            raise KdcacheError(f"--samples must be in 1..{MAX_COUNT} (counts are stored as bytes), got {self.samples}")

        if self.render not in RENDER_BACKENDS:
            raise KdcacheError(f"--render must be one of {', '.join(RENDER_BACKENDS)}, got {self.render!r}")
        if not isinstance(self.aug, AugSpec):
            raise KdcacheError(f"aug must be a views.AugSpec, got {type(self.aug).__name__}")
        if self.aug.name == "center_crop" and self.views != 1:
            raise KdcacheError(f"--center-crop gives every image one view, the centre crop; pass --views 1 (not "
                               f"{self.views}: the others would be copies)")
        if self.num_shard_groups < 1 or not 0 <= self.shard_index < self.num_shard_groups:
            raise KdcacheError(f"--shard-index must be in [0, --num-shard-groups); got {self.shard_index} of "
                               f"{self.num_shard_groups}")

    def members(self) -> list:
        """The teachers asked for, one ``ensemble.MemberSpec`` each: ``teacher`` (one spec or a list),
        with ``teacher_weights``, ``teacher_res`` (default ``res``), ``mean``, ``std`` and
        ``random_init`` matched to them by position (each given for every teacher or for none)."""
        from ..models.ensemble import MemberSpec, per_member

        specs = per_member(self.teacher, None, "--teacher", None)
        if not specs or not all(isinstance(s, str) and s for s in specs):
            raise KdcacheError(f"--teacher takes a model spec (one per ensemble member), got {self.teacher!r}")
        n = len(specs)
        weights = per_member(self.teacher_weights, n, "--teacher-weights", None)
        res = per_member(self.teacher_res, n, "--teacher-res", self.res)
        mean = per_member(self.mean, n, "--mean", None, rgb=True)
        std = per_member(self.std, n, "--std", None, rgb=True)
        seeds = per_member(self.random_init, n, "--random-init", None)
        return [MemberSpec(s, w, r, tuple(m) if m is not None else None, tuple(d) if d is not None else None, i)
                for s, w, r, m, d, i in zip(specs, weights, res, mean, std, seeds)]


def check_member(m) -> None:
    """One member's resolution, seed and normalisation (``MemberSpec``), named by their flags."""
    want, ok = at_least(8)
    if not isinstance(m.res, numbers.Integral) or isinstance(m.res, bool) or not ok(m.res):
        raise KdcacheError(f"--teacher-res (or --res) must be {want}, got {m.res!r}")
    seed = m.random_init
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)):
        raise KdcacheError(f"--random-init must be an integer, got {seed!r}")
    for name in ("mean", "std"):
        values = getattr(m, name)
        if values is not None and (len(values) != 3 or not all(isinstance(v, numbers.Real) and math.isfinite(v)
                                                               for v in values)):
            raise KdcacheError(f"--{name} takes three numbers R,G,B, got {values!r}")
    if m.std is not None and min(m.std) <= 0:
        raise KdcacheError(f"--std values divide the pixels: each must be > 0, got {tuple(m.std)}")


@dataclass
class VerifyConfig:
    """Everything ``verify`` needs (``kdcache verify``); checked when it is made."""

    cache: object  # a path or URL, or an open CacheReader
    data: str | list[str]
    teacher: str | list[str]  # an ensemble cache: one spec per member, in the cache's order
    teacher_weights: str | list[str] | None = None  # likewise one file per member
    num_classes: int | None = None
    pretrained: bool = False
    samples: int = 64  # (record, view) pairs re-run
    device: str = "auto"
    seed: int = 0  # chooses the sampled records
    batch_size: int = 64  # teacher batches for format-1 caches (newer ones record precompute's)
    atol: float = ATOL  # on top of one float16 step (rtol)
    rtol: float = RTOL
    allow_teacher_mismatch: bool = False
    storage_options: dict | None = None
    progress: object = True  # True: a bar on stderr; a function: called with each batch's count

    def __post_init__(self):
        check_numbers(self, VERIFY_NUMBERS, SEEDS["verify"])
        if self.seed < 0:
            raise KdcacheError(f"--seed must be at least 0, got {self.seed}")


@dataclass
class EvaluateConfig:
    """Everything ``evaluate`` needs (``kdcache evaluate``); checked when it is made."""

    run_dir: str
    val_data: str | list[str]
    thresholds: list[float] | None = None  # early exit, per shallow exit (one value: every exit)
    sweep: bool = False
    plot: str | None = None  # where --sweep writes its PNG (default RUN_DIR/early_exit.png)
    batch_size: int = 128
    workers: int = field(default_factory=default_workers)
    device: str = "auto"

    def __post_init__(self):
        check_numbers(self, EVALUATE_NUMBERS)
        if self.thresholds is not None and not all(isinstance(t, numbers.Real) and math.isfinite(t)
                                                    for t in self.thresholds):
            raise KdcacheError(f"--thresholds takes numbers, got {self.thresholds!r}")
