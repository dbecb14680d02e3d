"""A live teacher on the replayed views: the same targets a cache would hold, computed as you train.

``LiveTeacher.load(spec, ...)`` builds the teacher the way precompute does (``teacher.load_teacher``:
frozen, seeded random init refused unless asked for). Given the cache it stands in for, it takes
that cache's normalisation, k, resolution and seeded random init when the spec is the cache's
teacher, so its targets equal the cached ones on the same views (``kdcache verify`` checks the
same thing offline). ``targets(batch)`` runs it on a ``ReplayLoader`` batch's pixels (at the
teacher's own resolution when the loader renders one) and returns ``losses.Targets``, the form
``kd_loss`` takes. The live-KD training mode uses exactly this.

``LiveEnsemble`` is the same for several teachers (``models/ensemble.py``): each member runs on the
batch's views at its own resolution (the loader renders every one of them: pass the ensemble's
``resolutions`` as its ``teacher_res``) and the targets are the top-k of the members' mean
probability, as precompute stores them for an ensemble cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache.store import CacheReader, members_of
from ..errors import KdcacheError
from ..models.ensemble import Ensemble, MemberSpec, ensemble_topk, load_ensemble, per_member
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


@dataclass
class LiveEnsemble:
    """Frozen teachers averaged in probability (``ensemble.Ensemble``), with the k their targets keep."""

    ensemble: Ensemble
    topk: int

    @property
    def num_classes(self) -> int:
        return self.ensemble.num_classes

    @property
    def resolutions(self) -> list[int]:
        """The members' resolutions, each once: what a ReplayLoader must render (``teacher_res``)."""
        return self.ensemble.sizes

    @classmethod
    def load(cls, specs: list[str], *, weights=None, cache=None, num_classes: int | None = None,
             topk: int | None = None, res=None, device=None, random_init=None, pretrained: bool = False,
             storage_options: dict | None = None, random_init_flag: str = "random_init") -> "LiveEnsemble":
        """The teachers of ``specs``; ``weights``, ``res`` and ``random_init`` are one value per spec (in
        order), or None. With ``cache`` whose teacher has these specs as its members (in order), each
        member takes the cache's normalisation, resolution and (without weights) seeded random init, so
        the targets equal the cached ones; ``topk`` defaults to the cache's (else 10)."""
        reader = cache if cache is None or isinstance(cache, CacheReader) else getattr(cache, "reader", None)
        if cache is not None and reader is None:
            reader = CacheReader(str(cache), storage_options)
        m = reader.manifest if reader is not None else None
        specs = list(specs)
        cached = members_of(m["teacher"], int(m["resolution"])) if m is not None else []
        same = [c.get("spec") for c in cached] == specs
        n = len(specs)
        weights = per_member(weights, n, "--teacher-weights", None)
        seeds = per_member(random_init, n, f"--{random_init_flag.replace('_', '-')}", None)
        default_res = [int(c["resolution"]) for c in cached] if same else [int(m["resolution"]) if m else 224] * n
        sizes = per_member(res, n, "--teacher-res", None) if res is not None else default_res
        members = []
        for i, spec in enumerate(specs):
            c = cached[i] if same else {}
            seed = seeds[i]
            if seed is None and same and weights[i] is None and not pretrained:
                seed = c.get("random_init_seed")  # the cache's seeded random member
            members.append(MemberSpec(spec, weights[i], int(sizes[i]), c.get("mean"), c.get("std"), seed))
        dev = resolve_device("auto") if device is None else torch.device(device)
        ens = load_ensemble(members, dev, num_classes=num_classes or (reader.num_classes if reader else None),
                            pretrained=pretrained, flag=random_init_flag)
        k = topk or (int(m["topk"]) if m else DEFAULT_TOPK)
        if k > ens.num_classes:
            raise KdcacheError(f"top-k {k} exceeds the teachers' {ens.num_classes} classes")
        return cls(ens, k)

    def topk_of(self, pixels: dict):
        """(top-k log-probs float16, class ids) of the members' mean probability; ``pixels[r]`` are the
        views' float pixels in [0, 1] at resolution r, for every member resolution."""
        return ensemble_topk(self.ensemble, pixels, self.topk)

    def targets(self, batch) -> Targets:
        """The ensemble's ``Targets`` for a bound ``ReplayLoader`` batch, each member on the batch's views
        at its own resolution (``batch.pixels_at``)."""
        device = batch.bound.device if batch.bound is not None else self.ensemble.device
        pixels = {r: batch.pixels_at(r, device) for r in self.resolutions}
        try:
            lp, ids = self.topk_of(pixels)
        except NonFiniteTeacherOutput as e:
            raise e.at(" (live ensemble)", [f"shard {s!r} key {k!r} view {batch.view}"
                                             for s, k in zip(batch.shards, batch.keys)]) from None
        return Targets(ids.to(device), lp.to(device), "topk", "uniform", None)
