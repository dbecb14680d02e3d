"""Teacher ensembles: several frozen teachers, one target per view.

Every member sees the same view of a record (the same crop box, flip and mixup partner), rendered at
its own resolution, normalised its own way. Their distributions are averaged in *probability* space:

    p_ens(c) = (1/M) Σ_m p_m(c),   stored as   log p_ens = logsumexp_m(log p_m) − log M   (T = 1)

so the stored top-k are log-probabilities of one proper distribution (Beyer et al. average the
teachers' probabilities the same way), and the cache's tail and temperature semantics are those of
a single teacher: the tail mass is what the averaged distribution leaves outside its top-k, and a
temperature at training time reshapes the averaged distribution.

- ``MemberSpec``     what the user asks of one member (spec, weights, resolution, normalisation, seed);
                     ``per_member`` matches a per-teacher option's values to the teachers by position.
- ``load_ensemble``  builds every member (``teacher.load_teacher``) and checks that they agree on the
                     class count; returns an ``Ensemble``.
- ``Ensemble``       the members and their resolutions; ``describe`` is the manifest's ``teacher``
                     entry (a one-member ensemble is described exactly as a single teacher always was).
- ``ensemble_logprobs`` / ``ensemble_topk`` on pixels per resolution; ``ensemble_batch_topk`` /
  ``ensemble_batch_logprobs`` on rendered ``CropBatch``es per resolution. A one-member ensemble
  returns its teacher's outputs unchanged (bit for bit what precompute stored before ensembles).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch

from ..errors import KdcacheError
from .factory import ModelInfo
from .teacher import Teacher, load_teacher, logprob_tensors

# How the manifest names the averaging (docs/format.md).
AVERAGING = "probability_mean"


@dataclass
class MemberSpec:
    """One member as asked for: its model spec, weights file, input resolution and normalisation
    (None: the model's own), and the seed of a deliberately random network."""

    spec: str
    weights: str | None = None
    res: int = 224
    mean: tuple | None = None
    std: tuple | None = None
    random_init: int | None = None


@dataclass
class Ensemble:
    """Frozen teachers with the resolution each runs at (``teachers[m]`` at ``resolutions[m]``)."""

    teachers: list[Teacher]
    resolutions: list[int]
    infos: list[ModelInfo] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.teachers)

    @property
    def device(self) -> torch.device:
        return self.teachers[0].device

    @property
    def num_classes(self) -> int:
        return self.teachers[0].num_classes

    @property
    def sizes(self) -> list[int]:
        """The distinct resolutions the members need, in member order: what a batch is rendered at."""
        return list(dict.fromkeys(self.resolutions))

    def describe(self) -> dict:
        """The manifest's ``teacher`` entry: a single teacher's as it always was; for several members
        the averaging, the class count and each member's entry with its resolution."""
        if len(self.infos) == 1:
            return self.infos[0].describe()
        return {"ensemble": AVERAGING, "num_classes": self.num_classes,
                "members": [{**info.describe(), "resolution": int(r)} for info, r in zip(self.infos, self.resolutions)]}


def per_member(value, n: int | None, flag: str, default, rgb: bool = False) -> list:
    """A per-member option as one value per teacher: None gives ``default`` to every member, a
    single value (a scalar, or one R,G,B triple with ``rgb``) belongs to a single teacher, and a list
    must hold exactly one value per teacher, in ``--teacher`` order (``n``: the teacher count; None
    for the teachers themselves)."""
    if value is None:
        return [default] * (n or 0)
    single = not isinstance(value, (list, tuple)) or (rgb and len(value) and not isinstance(value[0], (list, tuple)))
    values = [value] if single else list(value)
    if n is not None and len(values) != n:
        raise KdcacheError(
            f"{flag} is given {len(values)} time{'s' if len(values) != 1 else ''} for {n} teacher"
            f"{'s' if n != 1 else ''}: give it once per --teacher, in the same order (or not at all)")
    return values


def load_ensemble(members: list[MemberSpec], device: torch.device, *, num_classes: int | None = None,
                  pretrained: bool = False, flag: str = "--random-init") -> Ensemble:
    """Build every member, frozen on ``device``; their class counts must agree (one averaged
    distribution over one set of classes)."""
    if not members:
        raise KdcacheError("an ensemble needs at least one teacher (--teacher)")
    teachers, infos = [], []
    for n, m in enumerate(members):
        t, info = load_teacher(m.spec, device, num_classes=num_classes, weights=m.weights, pretrained=pretrained,
                               mean=m.mean, std=m.std, resolution=m.res, random_init=m.random_init, flag=flag)
        if infos and info.num_classes != infos[0].num_classes:
            raise KdcacheError(f"teacher {n + 1} ({m.spec}) outputs {info.num_classes} classes, teacher 1 "
                               f"({members[0].spec}) {infos[0].num_classes}: an ensemble averages one distribution "
                               "over the same classes")
        teachers.append(t)
        infos.append(info)
    return Ensemble(teachers, [int(m.res) for m in members], infos)


def ensemble_logprobs(ensemble: Ensemble, pixels: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Log of the members' mean probability (B, C), float32 on the ensemble's device, at T=1.
    ``pixels[r]`` are the batch's float pixels in [0, 1] at resolution r, each member normalised its
    own way (``Teacher.mean``/``std``)."""
    logps = [logprob_tensors(t, pixels[r]) for t, r in zip(ensemble.teachers, ensemble.resolutions)]
    if len(logps) == 1:
        return logps[0]
    return torch.logsumexp(torch.stack(logps), dim=0) - math.log(len(logps))


def ensemble_topk(ensemble: Ensemble, pixels: Mapping[int, torch.Tensor], k: int, half: bool = True):
    """Top-k of ``ensemble_logprobs`` (descending; float16, or float32 with ``half=False``) and class ids."""
    logp = ensemble_logprobs(ensemble, pixels)
    vals, ids = torch.topk(logp, k, dim=-1, largest=True, sorted=True)
    return (vals.half() if half else vals), ids


def crops_pixels(ensemble: Ensemble, crops: Mapping) -> dict[int, torch.Tensor]:
    """Float pixels on the ensemble's device of a batch rendered at each of its resolutions."""
    return {r: crops[r].pixels(ensemble.device) for r in ensemble.sizes}


def ensemble_batch_topk(ensemble: Ensemble, crops: Mapping, k: int, half: bool = True):
    """``ensemble_topk`` of a batch rendered at every member resolution (``crops[r]``), as numpy."""
    vals, ids = ensemble_topk(ensemble, crops_pixels(ensemble, crops), k, half=half)
    return vals.cpu().numpy(), ids.cpu().numpy()


def ensemble_batch_logprobs(ensemble: Ensemble, crops: Mapping):
    """``ensemble_logprobs`` of a batch rendered at every member resolution: (b, C) float32 numpy."""
    return ensemble_logprobs(ensemble, crops_pixels(ensemble, crops)).cpu().numpy()
