"""The teacher: loaded frozen, run on rendered views, reduced to what the cache keeps.

- ``load_teacher`` builds a model spec with its weights (``models.create_model``) and prepares it
  for inference: eval mode, no gradients, on the device, channels-last on CUDA.
- ``logprob_tensors`` runs it on float pixels (bf16 autocast on CUDA) and returns its float32
  log-softmax at T=1; ``topk_tensors`` takes the top-k of that (float16, descending) and their class
  ids; ``batch_topk`` / ``batch_logprobs`` do the same for a ``render.CropBatch`` (mixed on the
  device) and return numpy arrays (sampled targets are drawn from ``batch_logprobs``).
- ``compute_record`` is how the teacher ran, as the manifest keeps it.
- ``check_finite`` (inside ``logprob_tensors``, so on every path) refuses a batch whose outputs hold
  NaN or ±inf: ``NonFiniteTeacherOutput``, which callers re-raise naming the shard, keys and views.

Precompute, the live-teacher trainer and verify all run the teacher through these, so a live
teacher's targets and a re-run in verify are computed exactly as the cache's were.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import KdcacheError
from .factory import ModelInfo, create_model, logits_of, normalize, state_sha256
from ..data.render import CropBatch


@dataclass
class Teacher:
    """A frozen model on its device, with the input normalisation it expects."""

    model: torch.nn.Module
    mean: tuple
    std: tuple
    device: torch.device
    num_classes: int


def load_teacher(spec: str, device: torch.device, *, num_classes: int | None = None, weights: str | None = None,
                 pretrained: bool = False, mean=None, std=None, resolution: int = 224,
                 random_init: int | None = None, flag: str = "--random-init") -> tuple[Teacher, ModelInfo]:
    """Build ``spec`` with its weights, frozen and ready for inference on ``device``.

    A teacher that would start from random weights is refused unless ``random_init`` (a seed) asks
    for one on purpose: its outputs carry no knowledge, and unseeded, every process would build
    another network (a resumed cache would mix two). Seeded, it is rebuilt exactly (``flag`` names
    the option in the message).
    """
    build = dict(num_classes=num_classes, weights=weights, pretrained=pretrained, mean=mean, std=std,
                 resolution=resolution)
    if random_init is not None:
        if weights is not None or pretrained:
            raise KdcacheError(f"{flag} builds a randomly initialised teacher; it cannot be combined with "
                               "--teacher-weights or --pretrained")
        info = create_model(spec, init_seed=random_init, **build)
    else:
        info = create_model(spec, **build)
        if weights is None and not pretrained and is_random(spec, info, build):
            raise KdcacheError(
                f"the teacher {spec!r} has random weights (no --teacher-weights, no --pretrained): its outputs would "
                "carry no knowledge, and every run would build another network. Pass --teacher-weights FILE (or "
                f"--pretrained), or {flag} SEED to use a seeded random network on purpose (benchmarks, tests)")
    model = info.model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model, info.mean, info.std, device, info.num_classes), info


def is_random(spec: str, info: ModelInfo, build: dict) -> bool:
    """Whether a teacher built without a weights file has random weights: timm and torchvision specs
    always do; a ``py:`` factory does when a second build under another seed differs (it may load
    weights itself); TorchScript and exported files carry their weights."""
    if spec.startswith(("timm:", "torchvision:")):
        return True
    if not spec.startswith("py:"):
        return False
    a = create_model(spec, init_seed=1, **build)
    b = create_model(spec, init_seed=2, **build)
    return state_sha256(a.model) != state_sha256(b.model)


# How many of the inputs with non-finite outputs an error names.
SHOWN_RECORDS = 3


class NonFiniteTeacherOutput(KdcacheError):
    """The teacher's outputs hold NaN or ±inf for some inputs of a batch. Such an output is no
    distribution: stored, a NaN becomes NaN log-probs or (drawn) a clean-looking one-hot target, and
    a +inf logit is not "probability 0". ``rows`` are the batch rows concerned; callers that know
    which records those are re-raise ``at(...)``."""

    def __init__(self, rows: list[int], batch: int, detail: str, where: str = "", records=(), after: str = ""):
        self.rows, self.batch, self.detail = list(rows), int(batch), detail
        named = ", ".join(list(records)[:SHOWN_RECORDS])
        more = f" and {len(self.rows) - SHOWN_RECORDS} more" if len(self.rows) > SHOWN_RECORDS and named else ""
        super().__init__(
            f"the teacher's output is not finite{where}: {detail} for {len(self.rows)} of {self.batch} inputs"
            + (f" ({named}{more})" if named else "")
            + ". Likely cause: a damaged or wrong checkpoint (--teacher-weights), or float16 overflow (a model "
            "run in fp16, or with weights too large for it); check the teacher's outputs on these images, fix its "
            "weights or run it in fp32/bf16" + (f"; {after}" if after else ""))

    def at(self, where: str, records, after: str = "") -> "NonFiniteTeacherOutput":
        """The same error naming where it happened (`` for shard X``) and the records of its rows
        (``records[r]`` describes batch row r, e.g. ``key 'a' view 2``)."""
        records = list(records)
        return NonFiniteTeacherOutput(self.rows, self.batch, self.detail, where, [records[r] for r in self.rows],
                                      after)


def check_finite(logits: torch.Tensor, logp: torch.Tensor) -> None:
    """Raise ``NonFiniteTeacherOutput`` unless every log-prob of every row is finite: a NaN or ±inf
    logit (a bad checkpoint, fp16 overflow), or logits so far apart that the log-softmax overflows.
    One device synchronisation per batch."""
    ok = torch.isfinite(logp).all(dim=-1)
    if bool(ok.all()):
        return
    rows = torch.nonzero(~ok).flatten().tolist()
    z = logits[~ok].float()
    kinds = [what for what, hit in (("NaN", torch.isnan(z)), ("+inf", torch.isposinf(z)), ("-inf", torch.isneginf(z)))
             if bool(hit.any())]
    detail = (f"its logits hold {' and '.join(kinds)}" if kinds
              else "its log-softmax overflows to -inf (logits more than 3.4e38 apart)")
    raise NonFiniteTeacherOutput(rows, len(ok), detail)


def logprob_tensors(teacher: Teacher, pixels: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """The teacher's log-softmax at T=1 (B, C) in float32 on its device, for float pixels in [0, 1]
    (B, 3, H, W). ``mean``/``std`` override the teacher's. Outputs that are not finite raise
    ``NonFiniteTeacherOutput`` (``check_finite``)."""
    device = teacher.device
    x = normalize(pixels.to(device, non_blocking=True), teacher.mean if mean is None else mean,
                  teacher.std if std is None else std)
    with torch.no_grad():  # not inference_mode: live targets go on into the (autograd) loss
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = logits_of(teacher.model(x))
        else:
            logits = logits_of(teacher.model(x))
        logp = torch.log_softmax(logits.float(), dim=-1)
        check_finite(logits, logp)
        return logp


def topk_tensors(teacher: Teacher, pixels: torch.Tensor, k: int, mean=None, std=None, half: bool = True):
    """Top-k log-probabilities (T=1, descending, float16; float32 with ``half=False``) and class ids,
    as tensors on the teacher's device, for float pixels in [0, 1] (B, 3, H, W). ``mean``/``std``
    override the teacher's."""
    logp = logprob_tensors(teacher, pixels, mean, std)  # made without gradients
    vals, ids = torch.topk(logp, k, dim=-1, largest=True, sorted=True)
    return (vals.half() if half else vals), ids


def batch_topk(teacher: Teacher, crops: CropBatch, k: int, half: bool = True):
    """``topk_tensors`` of a rendered batch (mixed on the device), as numpy arrays on the host."""
    vals, ids = topk_tensors(teacher, crops.pixels(teacher.device), k, half=half)
    return vals.cpu().numpy(), ids.cpu().numpy()


def batch_logprobs(teacher: Teacher, crops: CropBatch):
    """``logprob_tensors`` of a rendered batch (mixed on the device): (b, C) float32 numpy."""
    return logprob_tensors(teacher, crops.pixels(teacher.device)).cpu().numpy()


def compute_record(batch_size: int, device: torch.device) -> dict:
    """How the teacher ran, as the manifest records it (``compute``): the same data, settings and
    seed give the same outputs bit for bit only with these fixed too."""
    return {"batch_size": int(batch_size), "device": device.type,
            "precision": "bf16" if device.type == "cuda" else "fp32"}
