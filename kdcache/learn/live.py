"""A live teacher on the replayed views: the same targets a cache would hold, computed as you train.

``LiveTeacher.load(spec, ...)`` builds the teacher the way precompute does (``teacher.load_teacher``:
frozen, seeded random init refused unless asked for). Given the cache it stands in for, it takes
that cache's normalisation, k, resolution and seeded random init when the spec is the cache's
teacher, so its targets equal the cached ones on the same views (``kdcache verify`` checks the
same thing offline). ``targets(batch)`` runs it on a ``ReplayLoader`` batch's pixels (at the
teacher's own resolution when the loader renders one) and returns ``losses.Targets``, the form
``kd_loss`` takes. The live-KD training mode uses exactly this.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache.store import CacheReader
from ..errors import KdcacheError
from ..models.teacher import NonFiniteTeacherOutput, Teacher, load_teacher, topk_tensors
from ..runtime import resolve_device
from .losses import Targets

DEFAULT_TOPK = 10  # a live teacher's k without topk= and without a cache


@dataclass
class LiveTeacher:
    """A frozen teacher with the k, normalisation and resolution its targets are taken at."""

    teacher: Teacher
    topk: int
    mean: tuple
    std: tuple
    res: int | None = None  # the resolution it runs at (None: whatever the pixels are)

    @property
    def num_classes(self) -> int:
        return self.teacher.num_classes

    @classmethod
    def load(cls, spec: str, *, weights: str | None = None, cache=None, num_classes: int | None = None,
             topk: int | None = None, res: int | None = None, device=None, random_init: int | None = None,
             pretrained: bool = False, storage_options: dict | None = None,
             random_init_flag: str = "random_init") -> "LiveTeacher":
        """The teacher of ``spec`` (timm:/torchvision:/py:/TorchScript/.pt2), its ``weights`` loaded.

        With ``cache`` (a path, URL, handle or reader) and the cache's own teacher spec, the cache's
        normalisation and (without weights) its seeded random init are used; ``topk`` and ``res``
        default to the cache's (else 10 and 224), ``num_classes`` to the cache's."""
        reader = cache if cache is None or isinstance(cache, CacheReader) else getattr(cache, "reader", None)
        if cache is not None and reader is None:
            reader = CacheReader(str(cache), storage_options)
        m = reader.manifest if reader is not None else None
        same = m is not None and m["teacher"].get("spec") == spec
        if random_init is None and same and weights is None and not pretrained:
            random_init = m["teacher"].get("random_init_seed")  # the cache's seeded random teacher
        run_res = res or (int(m["resolution"]) if m else 224)
        dev = resolve_device("auto") if device is None else torch.device(device)
        teacher, info = load_teacher(spec, dev, weights=weights, pretrained=pretrained,
                                     num_classes=num_classes or (reader.num_classes if reader else None),
                                     resolution=run_res, random_init=random_init, flag=random_init_flag)
        mean, std = (tuple(m["teacher"]["mean"]), tuple(m["teacher"]["std"])) if same else (info.mean, info.std)
        k = topk or (int(m["topk"]) if m else DEFAULT_TOPK)
        if k > info.num_classes:
            raise KdcacheError(f"top-k {k} exceeds the teacher's {info.num_classes} classes")
        return cls(teacher, k, mean, std, run_res)

    def topk_of(self, pixels: torch.Tensor):
        """(top-k log-probs float16, class ids) of float pixels in [0, 1], cast exactly as precompute casts them."""
        return topk_tensors(self.teacher, pixels, self.topk, self.mean, self.std)

    def targets(self, batch, pixels: torch.Tensor | None = None) -> Targets:
        """The teacher's ``Targets`` for a bound ``ReplayLoader`` batch: on its teacher-resolution pixels when
        the loader renders them (``teacher_res``), else on ``pixels`` (default: the batch's own)."""
        device = batch.bound.device if batch.bound is not None else self.teacher.device
        tx = batch.teacher_pixels(device)
        if tx is None:
            tx = batch.pixels(device) if pixels is None else pixels
        try:
            lp, ids = self.topk_of(tx)
        except NonFiniteTeacherOutput as e:  # name the records; training stops before its loss turns NaN
            raise e.at(" (live teacher)", [f"shard {s!r} key {k!r} view {batch.view}"
                                            for s, k in zip(batch.shards, batch.keys)]) from None
        return Targets(ids.to(device), lp.to(device), "topk", "uniform", None)
