"""What a training step optimises: one task per mode.

A task is called with the (possibly wrapped) student and a ``replay.Batch`` and returns a dict:
``loss`` (the tensor to back-propagate), and ``kd`` and ``ce`` (detached, for the log; ``None``
where a term does not apply). The trainer's loop only calls ``task(model, batch)``; a new mode is
a new task, not a branch in the loop.

- ``LabelsTask``    cross-entropy on the shards' labels (soft labels λ·own + (1−λ)·partner for
                    mixed records).
- ``CachedKDTask``  the sparse KD loss (``losses.sparse_kd_loss``) against the top-k stored in
                    the cache, plus ``label_weight``·CE.
- ``LiveKDTask``    the same loss against a teacher run on the very views the batch replays,
                    its top-k cast exactly as precompute casts it (``teacher.topk_tensors``).

Each task's ``loss_terms(z, batch, targets)`` is its loss on given logits, which is how
``selfdistill.SelfDistillTask`` reuses the mode's loss on the deepest exit of a multi-exit student.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .losses import sparse_kd_loss
from .models import logits_of, normalize
from .replay import Batch
from .teacher import NonFiniteTeacherOutput, Teacher, topk_tensors


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
        x = self.prepare(pixels)
        with self.autocast():
            return logits_of(model(x))

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels in the student's memory format."""
        x = normalize(pixels, self.mean, self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def exits(self, model, pixels: torch.Tensor) -> dict:
        """Every exit of a multi-exit student (``exits.MultiExit``, possibly wrapped in DDP or
        torch.compile): ``{"logits": [...], "features": [...]}``, shallow to deep."""
        x = self.prepare(pixels)
        with self.autocast():
            return model(x, all_exits=True)


class LabelsTask:
    """Cross-entropy on the labels (soft where records are mixed)."""

    name = "labels"

    def __init__(self, inputs: StudentInput, num_classes: int):
        self.inputs, self.num_classes = inputs, num_classes

    def __call__(self, model, batch: Batch) -> dict:
        z = self.inputs.logits(model, batch.pixels(self.inputs.device))
        return self.loss_terms(z, batch)

    def loss_terms(self, z: torch.Tensor, batch: Batch, targets=None) -> dict:
        """The terms of these logits on this batch (``targets`` unused: labels only)."""
        loss = F.cross_entropy(z.float(), batch.targets(self.num_classes, self.inputs.device))
        return {"loss": loss, "kd": None, "ce": loss.detach()}


class CachedKDTask:
    """Sparse KD against the cached top-k (plus ``label_weight``·CE)."""

    name = "cached"

    def __init__(self, inputs: StudentInput, num_classes: int, temperature: float = 1.0, tail: str = "uniform",
                 label_weight: float = 0.0, backend: str = "auto"):
        self.inputs, self.num_classes = inputs, num_classes
        self.temperature, self.tail, self.label_weight, self.backend = temperature, tail, label_weight, backend

    def targets(self, batch: Batch, pixels: torch.Tensor):
        """(top-k log-probs, class ids) on the device."""
        dev = self.inputs.device
        return batch.logprobs.to(dev, non_blocking=True), batch.classes.to(dev, non_blocking=True)

    def __call__(self, model, batch: Batch) -> dict:
        dev = self.inputs.device
        pixels = batch.pixels(dev)
        z = self.inputs.logits(model, pixels)
        return self.loss_terms(z, batch, self.targets(batch, pixels))

    def loss_terms(self, z: torch.Tensor, batch: Batch, targets) -> dict:
        """The terms of these logits against ``targets`` (``self.targets(batch, pixels)``)."""
        dev = self.inputs.device
        lp, ids = targets
        has_labels = bool((batch.label >= 0).all())
        labels = batch.targets(self.num_classes, dev) if has_labels else None
        # The logits go in their own dtype: the fused kernel reads bf16/fp16 and writes the gradient in it.
        loss = sparse_kd_loss(z, lp, ids, temperature=self.temperature, tail=self.tail,
                              labels=labels if self.label_weight > 0 else None, label_weight=self.label_weight,
                              backend=self.backend)
        ce = None
        if labels is not None:  # for the log only: the student's CE on the labels
            with torch.no_grad():
                ce = F.cross_entropy(z.detach().float(), labels)
        kd = loss.detach() - self.label_weight * ce if self.label_weight > 0 else loss.detach()
        return {"loss": loss, "kd": kd, "ce": ce}


class LiveKDTask(CachedKDTask):
    """Sparse KD against a teacher run on the batch's own views (its top-k cast like precompute's)."""

    name = "live"

    def __init__(self, inputs: StudentInput, num_classes: int, teacher: Teacher, topk: int, mean, std, **loss):
        super().__init__(inputs, num_classes, **loss)
        self.teacher, self.topk, self.mean, self.std = teacher, topk, mean, std

    def targets(self, batch: Batch, pixels: torch.Tensor):
        tx = batch.teacher_pixels(self.inputs.device)
        try:
            return topk_tensors(self.teacher, pixels if tx is None else tx, self.topk, self.mean, self.std)
        except NonFiniteTeacherOutput as e:  # name the records; training stops before its loss turns NaN
            raise e.at(" (live teacher)", [f"shard {s!r} key {k!r} view {batch.view}"
                                            for s, k in zip(batch.shards, batch.keys)]) from None
