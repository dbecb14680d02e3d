"""Self-distillation: the task that trains every exit of a multi-exit student (``exits.MultiExit``).

``SelfDistillTask(base, ...)`` wraps the run's own task (``tasks.LabelsTask``, ``CachedKDTask`` or
``LiveKDTask``). One forward gives every exit's logits ``z_1 .. z_L`` (shallow to deep) and pooled
features ``f_1 .. f_L``; the loss is the sum of

- the deepest exit: the base task's loss on ``z_L`` (cross-entropy, cached KD or live KD, exactly
  as a plain run of that mode computes it: ``base.loss_terms``);
- every shallow exit i, with α = ``alpha``, T = ``temperature`` and the labels y (soft for mixed
  records):

  ``teacher="deepest"``: α·T²·KL(softmax(z_L/T) detached ‖ softmax(z_i/T)) + (1−α)·CE(z_i, y)
  ``teacher="cache"``:   α·sparse_kd_loss(z_i, cached top-k, T) + (1−α)·CE(z_i, y)
  ``teacher="both"``:    α·(the two distillation terms above)/2 + (1−α)·CE(z_i, y)

  plus ``feature_weight``·mean((f_i − f_L detached)²), the hint loss (off at 0).

"cache" and "both" use the batch's teacher top-k: the cache's in cached mode, the live teacher's
in live mode (the same numbers by construction); labels mode has none and is refused.

The task returns ``loss`` (the total), ``kd`` and ``ce`` of the deepest exit (the same terms a
plain run logs) and, for the log, ``exit<s>_loss`` for every exit (``s``: the stage after which it
sits; the deepest is the last stage) and ``exit<s>_hint`` for shallow exits when the hint is on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import KdcacheError
from .losses import sparse_kd_loss
from .replay import Batch

from .config import SD_TEACHERS  # deepest | cache | both


def has_teacher_targets(task) -> bool:
    """Whether ``task`` distils from a teacher's top-k (``teacher_targets``): the cached and live tasks,
    and any task of a new mode that offers the same method."""
    return callable(getattr(task, "teacher_targets", None))


def kl_to_deepest(z: torch.Tensor, z_deep: torch.Tensor, temperature: float) -> torch.Tensor:
    """T²·KL(softmax(z_deep/T) ‖ softmax(z/T)), averaged over the batch; z_deep is detached."""
    T = float(temperature)
    log_p = F.log_softmax(z_deep.detach().float() / T, dim=-1)
    log_q = F.log_softmax(z.float() / T, dim=-1)
    return (T * T) * F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def hint_loss(f: torch.Tensor, f_deep: torch.Tensor) -> torch.Tensor:
    """mean((f − f_deep detached)²) over the batch and the feature width."""
    return (f.float() - f_deep.detach().float()).pow(2).mean()


class SelfDistillTask:
    """Deep-to-shallow distillation over a multi-exit student (module doc)."""

    name = "selfdistill"

    def __init__(self, base, exit_names: list[str], alpha: float = 0.3, temperature: float = 3.0,
                 feature_weight: float = 0.0, teacher: str = "deepest", tail: str = "uniform",
                 backend: str = "auto"):
        if teacher not in SD_TEACHERS:
            raise KdcacheError(f"--sd-teacher must be one of {', '.join(SD_TEACHERS)}, got {teacher!r}")
        if teacher != "deepest" and not has_teacher_targets(base):
            raise KdcacheError(f"--sd-teacher {teacher} distils the shallow exits from the teacher's top-k, which a "
                               f"{base.name} run does not have: train with --cache (cached mode) or --teacher (live "
                               "mode), or use --sd-teacher deepest")
        self.base, self.exit_names = base, list(exit_names)
        self.inputs, self.num_classes = base.inputs, base.num_classes
        self.alpha, self.temperature, self.feature_weight = float(alpha), float(temperature), float(feature_weight)
        self.teacher, self.tail, self.backend = teacher, tail, backend

    def __call__(self, model, batch: Batch) -> dict:
        dev = self.inputs.device
        out = self.inputs.forward_exits(model, self.inputs.images(batch))
        zs, fs = out["logits"], out["features"]
        if len(zs) != len(self.exit_names):
            raise KdcacheError(f"the student returned {len(zs)} exits, the task expects {len(self.exit_names)}")
        z_deep = zs[-1]
        targets = self.base.teacher_targets(batch) if has_teacher_targets(self.base) else None
        terms = self.base.loss_terms(z_deep, batch, targets)
        total = terms["loss"]
        logged = {}
        labels = None
        if self.alpha < 1:
            if bool((batch.label < 0).any()):
                raise KdcacheError("self-distillation with --sd-alpha < 1 trains the shallow exits on the labels, but "
                                   "this batch has samples without cls; use labelled shards or --sd-alpha 1")
            labels = batch.label_targets(self.num_classes, dev)
        a = self.alpha
        for name, z, f in zip(self.exit_names[:-1], zs[:-1], fs[:-1]):
            if self.teacher == "deepest":
                distil = kl_to_deepest(z, z_deep, self.temperature)
            else:
                lp, ids = targets.logprobs, targets.classes
                cached = sparse_kd_loss(z, lp, ids, temperature=self.temperature, tail=self.tail,
                                        backend=self.backend)
                distil = cached if self.teacher == "cache" else 0.5 * (cached + kl_to_deepest(z, z_deep, self.temperature))
            loss = a * distil
            if labels is not None:
                loss = loss + (1.0 - a) * F.cross_entropy(z.float(), labels)
            if self.feature_weight > 0:
                hint = hint_loss(f, fs[-1])
                loss = loss + self.feature_weight * hint
                logged[f"{name}_hint"] = hint.detach()
            logged[f"{name}_loss"] = loss.detach()
            total = total + loss
        logged[f"{self.exit_names[-1]}_loss"] = terms["loss"].detach()
        return {"loss": total, "kd": terms["kd"], "ce": terms["ce"], **logged}
