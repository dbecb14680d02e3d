"""What a training step optimises: one task per mode.

A task is called with the (possibly wrapped) student and a ``replay.Batch`` and returns a dict:
``loss`` (the tensor to back-propagate), and ``kd`` and ``ce`` (detached, for the log; ``None``
where a term does not apply). The trainer's loop only calls ``task(model, batch)``; a new mode is
a new task, not a branch in the loop.

- ``LabelsTask``    cross-entropy on the shards' labels (soft labels λ·own + (1−λ)·partner for
                    mixed records).
- ``CachedKDTask``  the sparse KD loss (``losses.sparse_kd_loss``) against the top-k stored in
                    the cache, plus ``label_weight``·CE; or, with a ``signals.DerivedSignal``,
                    against a target derived from the labels and the cache's statistics, each
                    row weighted where the signal says so (``train --kd-signal``).
- ``LiveKDTask``    the same loss against a teacher run on the very views the batch replays,
                    its top-k cast exactly as precompute casts it (``teacher.topk_tensors``).

Each task's ``loss_terms(z, batch, targets)`` is its loss on given logits, which is how
``selfdistill.SelfDistillTask`` reuses the mode's loss on the deepest exit of a multi-exit student.
A task that distils from a teacher also has ``teacher_targets(batch)`` (``losses.Targets`` of
the batch's views); that attribute, not the task's class, is what self-distillation looks for. The two
KD tasks share ``KDLoss`` and ``kd_step`` (functions, not a base class). Which task a run gets, and
everything it needs, is decided by the mode's factory in ``modes.py``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.factory import logits_of, normalize
from ..models.teacher import Teacher
from .live import LiveEnsemble, LiveTeacher
from .losses import Targets, sparse_kd_loss
from .replay import Batch, Binding


@dataclass
class StudentInput:
    """How the student takes a batch: normalisation, memory format, mixed precision."""

    mean: tuple
    std: tuple
    device: torch.device
    channels_last: bool = False
    amp_dtype: torch.dtype | None = None  # autocast on CUDA; None = float32

    def autocast(self):
        return torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()

    def logits(self, model, pixels: torch.Tensor) -> torch.Tensor:
        """The student's logits on float pixels in [0, 1] (normalised here)."""
        return self.forward(model, self.prepare(pixels))

    def forward(self, model, images: torch.Tensor) -> torch.Tensor:
        """The student's logits on images already normalised (``batch.images``)."""
        with self.autocast():
            return logits_of(model(images))

    def images(self, batch: Batch) -> torch.Tensor:
        """The batch's normalised images: ``batch.images`` as ``ReplayLoader`` bound them (a batch made
        elsewhere is bound here first, with this student's normalisation)."""
        if batch.bound is None:
            batch.bind(Binding(self.device, tuple(self.mean), tuple(self.std), self.channels_last))
        b = batch.bound
        if (b.device, tuple(b.mean), tuple(b.std), b.channels_last) != (
                torch.device(self.device), tuple(self.mean), tuple(self.std), self.channels_last):
            return self.prepare(batch.pixels(self.device))  # bound for another normalisation: not this student's
        return batch.images

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels in the student's memory format."""
        x = normalize(pixels, self.mean, self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def exits(self, model, pixels: torch.Tensor) -> dict:
        """Every exit of a multi-exit student (``exits.MultiExit``, possibly wrapped in DDP or
        torch.compile) on float pixels in [0, 1]: ``{"logits": [...], "features": [...]}``, shallow to deep."""
        return self.forward_exits(model, self.prepare(pixels))

    def forward_exits(self, model, images: torch.Tensor) -> dict:
        """``exits`` on images already normalised (``batch.images``)."""
        with self.autocast():
            return model(images, all_exits=True)


class LabelsTask:
    """Cross-entropy on the labels (soft where records are mixed)."""

    name = "labels"

    def __init__(self, inputs: StudentInput, num_classes: int):
        self.inputs, self.num_classes = inputs, num_classes

    def __call__(self, model, batch: Batch) -> dict:
        z = self.inputs.forward(model, self.inputs.images(batch))
        return self.loss_terms(z, batch)

    def loss_terms(self, z: torch.Tensor, batch: Batch, targets=None) -> dict:
        """The terms of these logits on this batch (``targets`` unused: labels only)."""
        loss = F.cross_entropy(z.float(), batch.label_targets(self.num_classes, self.inputs.device))
        return {"loss": loss, "kd": None, "ce": loss.detach()}


@dataclass(frozen=True)
class KDLoss:
    """The sparse KD loss's settings, and its terms on given logits: the one KD computation the
    cached and live tasks (and self-distillation's deepest exit) share."""

    temperature: float = 1.0
    tail: str = "uniform"
    label_weight: float = 0.0
    backend: str = "auto"

    def terms(self, z: torch.Tensor, batch: Batch, targets: Targets, num_classes: int, device,
              weights: torch.Tensor | None = None) -> dict:
        """``{loss, kd, ce}`` of logits ``z`` against the batch's teacher ``targets``. ``weights`` (B,):
        each row's KD term is multiplied by its weight before the batch mean (the ``label_weight``·CE
        term is not weighted)."""
        lp, ids = targets.logprobs, targets.classes
        has_labels = bool((batch.label >= 0).all())
        labels = batch.label_targets(num_classes, device) if has_labels else None
        # The logits go in their own dtype: the fused kernel reads bf16/fp16 and writes the gradient in it.
        if weights is None:
            loss = sparse_kd_loss(z, lp, ids, temperature=self.temperature, tail=self.tail,
                                  labels=labels if self.label_weight > 0 else None, label_weight=self.label_weight,
                                  backend=self.backend)
        else:
            rows = sparse_kd_loss(z, lp, ids, temperature=self.temperature, tail=self.tail, reduction="none",
                                  backend=self.backend)
            loss = (weights * rows).mean()
            if self.label_weight > 0:
                loss = loss + self.label_weight * F.cross_entropy(z.float(), labels)
        ce = None
        if labels is not None:  # for the log only: the student's CE on the labels
            with torch.no_grad():
                ce = F.cross_entropy(z.detach().float(), labels)
        kd = loss.detach() - self.label_weight * ce if self.label_weight > 0 else loss.detach()
        return {"loss": loss, "kd": kd, "ce": ce}


def kd_step(task, model, batch: Batch) -> dict:
    """One KD step of a task with teacher targets: the student's logits on the batch's images,
    against the targets ``task.teacher_targets`` gives for the very same views."""
    z = task.inputs.forward(model, task.inputs.images(batch))
    return task.loss_terms(z, batch, task.teacher_targets(batch))


class CachedKDTask:
    """Sparse KD against the cached top-k (plus ``label_weight``·CE), or against the targets and
    weights of a signal derived from the cache (``signal``: a ``signals.DerivedSignal``)."""

    name = "cached"

    def __init__(self, inputs: StudentInput, num_classes: int, temperature: float = 1.0, tail: str = "uniform",
                 label_weight: float = 0.0, backend: str = "auto", signal=None):
        self.inputs, self.num_classes = inputs, num_classes
        self.kd = KDLoss(temperature, tail, label_weight, backend)
        self.signal = signal

    def teacher_targets(self, batch: Batch) -> Targets:
        """The batch's targets from the cache (or the signal's, derived from it), on the device."""
        dev = self.inputs.device
        if self.signal is not None:
            lp, ids = self.signal.targets(batch, dev)
            return Targets(ids, lp)
        return Targets(batch.classes.to(dev, non_blocking=True), batch.logprobs.to(dev, non_blocking=True))

    def loss_terms(self, z: torch.Tensor, batch: Batch, targets) -> dict:
        """The terms of these logits against ``targets`` (``self.teacher_targets(batch)``)."""
        weights = self.signal.weights(batch, self.inputs.device) if self.signal is not None else None
        return self.kd.terms(z, batch, targets, self.num_classes, self.inputs.device, weights)

    def __call__(self, model, batch: Batch) -> dict:
        return kd_step(self, model, batch)


class LiveKDTask:
    """Sparse KD against a teacher run on the batch's own views (its top-k cast like precompute's)."""

    name = "live"

    def __init__(self, inputs: StudentInput, num_classes: int, teacher: Teacher | LiveTeacher | LiveEnsemble,
                 topk: int | None = None, mean=None, std=None, temperature: float = 1.0, tail: str = "uniform",
                 label_weight: float = 0.0, backend: str = "auto"):
        self.inputs, self.num_classes = inputs, num_classes
        self.kd = KDLoss(temperature, tail, label_weight, backend)
        self.live = (teacher if isinstance(teacher, (LiveTeacher, LiveEnsemble))
                     else LiveTeacher(teacher, topk, tuple(mean), tuple(std)))

    def teacher_targets(self, batch: Batch) -> Targets:
        """The live teacher's top-k on the batch's views (at its own resolution when that differs)."""
        self.inputs.images(batch)  # bound, so the pixels are made once for student and teacher
        return self.live.targets(batch)

    def loss_terms(self, z: torch.Tensor, batch: Batch, targets) -> dict:
        return self.kd.terms(z, batch, targets, self.num_classes, self.inputs.device)

    def __call__(self, model, batch: Batch) -> dict:
        return kd_step(self, model, batch)
