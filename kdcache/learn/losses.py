"""Sparse knowledge-distillation loss from cached teacher top-k log-probabilities.

Public entry points:

* :func:`sparse_kd_loss` — validates, then dispatches to the fused Triton kernel
  (``kdcache.learn.kernels.sparse_kd``) or to the PyTorch reference.
* :func:`sparse_kd_loss_reference` — the pure-PyTorch implementation (the CPU path and the
  ground truth for the kernel tests). It builds dense (B, C) tensors.
* :class:`Targets` and :func:`kd_loss` — the library's form: a batch's teacher targets as one
  object (top-k log-probs or sampled weights, with the tail that fits them), and the loss on them
  (``import kdcache``; what ``kdcache train`` computes).

Semantics (docs/losses.md has the long form): the teacher keeps its top-k log-probs ``l`` at T=1;
the rest of its mass ``m = max(0, 1 - sum(exp(l)))`` is spread over the other ``C - k`` classes
according to ``tail``; the loss is ``T^2 * KL(p_T || softmax(z / T))`` per row plus an optional
``label_weight * CE(z, labels)`` at T=1, reduced over the batch.

``tail="sampled"`` takes sampled targets instead (``precompute --targets sample``): ``logprobs``
then holds ``log(count / N)`` of the drawn classes (-inf, with class id -1, in unused slots), the
target is exactly those weights (renormalised over the row, not tempered: the draws were made at
the sampling temperature) and nothing outside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdcache.errors import KdcacheError

__all__ = [
    "LOSS_TAILS",
    "Targets",
    "kd_loss",
    "LossInputError",
    "TAIL_MODES",
    "sparse_kd_loss",
    "sparse_kd_loss_reference",
    "triton_available",
]

TAIL_MODES = ("uniform", "renorm", "bucket")  # how a top-k target models the rest (train --tail)
LOSS_TAILS = TAIL_MODES + ("sampled",)  # and sampled targets: the weights as they are, no tail
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "torch", "triton")
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_ID_DTYPES = (torch.int16, torch.int32, torch.int64)
_LABEL_INT_DTYPES = (torch.int16, torch.int32, torch.int64, torch.uint8)


class LossInputError(KdcacheError, ValueError):
    """Bad arguments to the sparse-KD loss (shape, dtype, device, option names, backend)."""


# ---------------------------------------------------------------------------------------------
# validation and dispatch
# ---------------------------------------------------------------------------------------------

_TRITON_OK: bool | None = None


def triton_available() -> bool:
    """True when ``import triton`` works (checked once)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401

            _TRITON_OK = True
        except Exception:  # ImportError, or a broken install
            _TRITON_OK = False
    return _TRITON_OK


def _validate(student_logits, logprobs, classes, temperature, tail, labels, label_weight, reduction):
    z, lp, ids = student_logits, logprobs, classes
    for name, t in (("student_logits", z), ("logprobs", lp), ("classes", ids)):
        if not isinstance(t, torch.Tensor):
            raise LossInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if z.dim() != 2:
        raise LossInputError(f"student_logits must be 2-D (B, C), got shape {tuple(z.shape)}")
    if z.dtype not in _LOGIT_DTYPES:
        raise LossInputError(
            f"student_logits must be float32/bfloat16/float16 (or float64), got {z.dtype}")
    if lp.dim() != 2:
        raise LossInputError(f"logprobs must be 2-D (B, k), got shape {tuple(lp.shape)}")
    if not lp.is_floating_point():
        raise LossInputError(f"logprobs must be a floating tensor (float16 as stored), got {lp.dtype}")
    if ids.dtype not in _ID_DTYPES:
        raise LossInputError(f"classes must be int16, int32 or int64, got {ids.dtype}")
    if ids.shape != lp.shape:
        raise LossInputError(
            f"classes {tuple(ids.shape)} and logprobs {tuple(lp.shape)} must have the same shape (B, k)")
    B, C = z.shape
    k = lp.shape[1]
    if lp.shape[0] != B:
        raise LossInputError(
            f"batch size mismatch: student_logits has {B} rows, logprobs/classes have {lp.shape[0]}")
    if B == 0:
        raise LossInputError("empty batch (B = 0)")
    if k < 1:
        raise LossInputError("k must be at least 1 (logprobs has no columns)")
    if k > C:
        raise LossInputError(f"top-k k={k} is larger than the number of classes C={C}")
    if lp.device != z.device or ids.device != z.device:
        raise LossInputError(
            f"all inputs must be on one device: student_logits on {z.device}, "
            f"logprobs on {lp.device}, classes on {ids.device}")
    try:
        T = float(temperature)
    except (TypeError, ValueError):
        raise LossInputError(f"temperature must be a number, got {temperature!r}") from None
    if not (T > 0 and math.isfinite(T)):
        raise LossInputError(f"temperature must be a finite number > 0, got {temperature!r}")
    if tail not in LOSS_TAILS:
        raise LossInputError(f"tail must be one of {LOSS_TAILS}, got {tail!r}")
    if reduction not in REDUCTIONS:
        raise LossInputError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    alpha = float(label_weight)
    if not math.isfinite(alpha):
        raise LossInputError(f"label_weight must be finite, got {label_weight!r}")
    if alpha != 0.0:
        if labels is None:
            raise LossInputError("label_weight is non-zero but no labels were given")
        if not isinstance(labels, torch.Tensor):
            raise LossInputError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.device != z.device:
            raise LossInputError(f"labels are on {labels.device}, student_logits on {z.device}")
        if labels.dim() == 1:
            if labels.dtype not in _LABEL_INT_DTYPES:
                raise LossInputError(f"hard labels (B,) must be an integer tensor, got {labels.dtype}")
            if labels.shape[0] != B:
                raise LossInputError(f"labels has {labels.shape[0]} rows, student_logits has {B}")
            if labels.device.type == "cpu" and (labels.min() < 0 or labels.max() >= C):
                raise LossInputError(f"hard labels must lie in [0, {C}), got values outside")
        elif labels.dim() == 2:
            if not labels.is_floating_point():
                raise LossInputError(f"soft labels (B, C) must be floating, got {labels.dtype}")
            if tuple(labels.shape) != (B, C):
                raise LossInputError(
                    f"soft labels must have the logits' shape {(B, C)}, got {tuple(labels.shape)}")
        else:
            raise LossInputError(
                f"labels must be (B,) class ids or (B, C) soft targets, got shape {tuple(labels.shape)}")
    # Range check of the ids costs a pass over (B, k) and, on CUDA, a host sync: CPU only. Sampled
    # targets may leave slots unused: class -1 with weight 0 (log-weight -inf).
    if ids.device.type == "cpu":
        used = ids if tail != "sampled" else ids[~(ids == -1) | ~torch.isneginf(lp)]
        if used.numel() and (used.min() < 0 or used.max() >= C):
            raise LossInputError(f"classes must lie in [0, {C}), got values outside"
                                 + (" (an unused slot of sampled targets is class -1 with log-weight -inf)"
                                    if tail == "sampled" else ""))
    return T, alpha


def _choose_backend(backend: str, z: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise LossInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        ok = z.device.type == "cuda" and z.dtype != torch.float64 and triton_available()
        return "triton" if ok else "torch"
    # forced triton
    if not triton_available():
        raise LossInputError(
            "backend='triton' but Triton is not importable; install it (pip install 'kdcache[triton]') "
            "or use backend='torch'")
    from kdcache.learn.kernels.sparse_kd import interpreter_enabled

    if z.device.type != "cuda" and not interpreter_enabled():
        raise LossInputError(
            f"backend='triton' needs a CUDA tensor (student_logits is on {z.device}); set the "
            "environment variable TRITON_INTERPRET=1 to run the kernel on the CPU interpreter, "
            "move the tensors to a CUDA device, or use backend='torch'")
    if z.dtype == torch.float64:
        raise LossInputError(
            "backend='triton' supports float32/bfloat16/float16 logits, not float64; "
            "use backend='torch' for float64")
    return "triton"


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def _soft_ce_rows(z: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    cdt = torch.float64 if z.dtype == torch.float64 else torch.float32
    return -(soft.to(cdt) * F.log_softmax(z.to(cdt), dim=-1)).sum(-1)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def sparse_kd_loss(
    student_logits: torch.Tensor,
    logprobs: torch.Tensor,
    classes: torch.Tensor,
    temperature: float = 1.0,
    tail: str = "uniform",
    labels: torch.Tensor | None = None,
    label_weight: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """``T^2 * KL(p_T || softmax(z/T)) + label_weight * CE(z, labels)``, reduced over the batch.

    Args:
        student_logits: (B, C) float32 / bfloat16 / float16 (float64: torch backend only).
        logprobs: (B, k) teacher top-k log-probabilities at T=1 (float16 as stored).
        classes: (B, k) int16/int32/int64 class ids of ``logprobs``; distinct within a row.
        temperature: T > 0.
        tail: "uniform" (default), "renorm" or "bucket" — how the teacher's non-top-k mass is
            modelled; see docs/losses.md. "sampled": ``logprobs`` are the log-weights
            ``log(count / N)`` of sampled targets (class -1 and -inf in unused slots), taken as the
            whole target without tempering or tail.
        labels: (B,) class ids or (B, C) soft targets (e.g. mixed labels); only used when
            ``label_weight != 0``. CE is always taken at T=1.
        reduction: "mean" (over the batch), "sum" or "none" (per-row (B,) tensor).
        backend: "auto" (Triton kernel for CUDA tensors when Triton imports, PyTorch otherwise),
            "torch" or "triton" (on CPU only under ``TRITON_INTERPRET=1``).

    Returns a float32 tensor (float64 for float64 logits), differentiable w.r.t.
    ``student_logits``.
    """
    T, alpha = _validate(student_logits, logprobs, classes, temperature, tail, labels,
                         label_weight, reduction)
    if _choose_backend(backend, student_logits) == "torch":
        return _reference(student_logits, logprobs, classes, T, tail,
                          labels if alpha != 0.0 else None, alpha, reduction)
    return _FusedSparseKD.apply(student_logits, logprobs, classes,
                                labels if alpha != 0.0 else None, T, tail, alpha, reduction)


def sparse_kd_loss_reference(
    student_logits: torch.Tensor,
    logprobs: torch.Tensor,
    classes: torch.Tensor,
    temperature: float = 1.0,
    tail: str = "uniform",
    labels: torch.Tensor | None = None,
    label_weight: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """The pure-PyTorch sparse-KD loss (same arguments as :func:`sparse_kd_loss`).

    Differentiable by autograd; computes in float32 (float64 for float64 logits); builds a few
    (B, C) temporaries.
    """
    T, alpha = _validate(student_logits, logprobs, classes, temperature, tail, labels,
                         label_weight, reduction)
    return _reference(student_logits, logprobs, classes, T, tail,
                      labels if alpha != 0.0 else None, alpha, reduction)


def teacher_at_temperature(logprobs: torch.Tensor, C: int, temperature: float, tail: str,
                           dtype: torch.dtype = torch.float32):
    """The teacher's sparse description at temperature T, without any (B, C) tensor.

    Returns ``(log_p, p, log_q, q, p_tail)``: (B, k) log-probs/probs of the top-k classes, (B,)
    log-prob/prob of *each* tail class (uniform modes; ``q = 0`` when there is no tail) and (B,)
    total tail mass ``p_tail = (C - k) * q``. ``log_q`` is finite even where ``q == 0``.
    ``tail="sampled"``: the k weights ``exp(logprobs)`` renormalised, at any T, and no tail.
    """
    neg = torch.finfo(dtype).min
    T = float(temperature)
    k = logprobs.shape[1]
    n_tail = C - k
    log_n = math.log(n_tail) if n_tail > 0 else 0.0
    l = logprobs.to(dtype).clamp_min(-1e30)  # a stored -inf becomes finite with zero mass
    # 1 - sum(exp(l)) cancels badly when the top-k hold nearly all the mass: float64 (k values).
    m64 = (1.0 - logprobs.double().exp().sum(-1)).clamp_min(0.0)
    m = m64.to(dtype)
    if tail in ("renorm", "sampled") or n_tail == 0:
        has_tail = torch.zeros_like(m, dtype=torch.bool)
    else:
        has_tail = m > 0
    lT = l if tail == "sampled" else l / T
    u_T = ((m64.clamp_min(1e-300).log() - log_n) / T).to(dtype)
    tail_w = torch.where(has_tail, u_T + log_n, torch.full_like(u_T, neg))
    lse_t = torch.logsumexp(torch.cat([lT, tail_w[:, None]], dim=1), dim=1)
    log_p = lT - lse_t[:, None]
    log_q = u_T - lse_t
    zero = torch.zeros_like(m)
    q = torch.where(has_tail, log_q.exp(), zero)
    p_tail = torch.where(has_tail, (u_T + log_n - lse_t).exp(), zero)
    return log_p, log_p.exp(), log_q, q, p_tail


def _reference(z, logprobs, classes, T, tail, labels, alpha, reduction):
    cdt = torch.float64 if z.dtype == torch.float64 else torch.float32
    B, C = z.shape
    k = logprobs.shape[1]
    ids = classes.long()
    if tail == "sampled":
        ids = ids.clamp_min(0)  # an unused slot (-1) has weight 0: any gathered value drops out
    zc = z.to(cdt)
    log_s = F.log_softmax(zc / T, dim=-1)
    log_p, p, log_q, q, p_tail = teacher_at_temperature(logprobs, C, T, tail, cdt)
    if tail == "bucket":
        # teacher buckets: p (k) + p_tail; student buckets: s at the k ids + the rest summed
        log_s_top = log_s.gather(1, ids)
        kl = (torch.xlogy(p, p) - p * log_s_top).sum(-1)
        if C > k:
            is_top = torch.zeros((B, C), dtype=torch.bool, device=z.device).scatter(1, ids, True)
            log_s_tail = log_s.masked_fill(is_top, torch.finfo(cdt).min).logsumexp(-1)
            kl = kl + torch.xlogy(p_tail, p_tail) - p_tail * log_s_tail
    else:
        # KL(p_T || s) with p_T = q on every class except the k top-k ones (p_i there):
        #   sum_j p_j log p_j  -  [ sum_i (p_i - q) log s_{c_i}  +  q sum_j log s_j ]
        # (the same as building the dense target by scatter, without a second (B, C) tensor)
        log_s_top = log_s.gather(1, ids)
        neg_ent = torch.xlogy(p, p).sum(-1) + torch.where(q > 0, p_tail * log_q, torch.zeros_like(q))
        cross = ((p - q[:, None]) * log_s_top).sum(-1) + q * log_s.sum(-1)
        kl = neg_ent - cross
    rows = (T * T) * kl
    if labels is not None:
        if labels.dim() == 1:
            ce = F.cross_entropy(zc, labels.long(), reduction="none")
        else:
            ce = _soft_ce_rows(zc, labels)
        rows = rows + alpha * ce
    return _reduce(rows, reduction)


# ---------------------------------------------------------------------------------------------
# the fused path
# ---------------------------------------------------------------------------------------------


class _FusedSparseKD(torch.autograd.Function):
    """Forward runs the Triton kernel (loss rows + dense gradient); backward scales the gradient."""

    @staticmethod
    def forward(ctx, z, logprobs, classes, labels, T, tail, alpha, reduction):
        from kdcache.learn.kernels.sparse_kd import sparse_kd_forward

        B = z.shape[0]
        need_grad = ctx.needs_input_grad[0]
        # The 1/B of "mean" goes into the kernel (one rounding to the stored dtype) except for
        # float16, whose small exponent range would flush tiny gradient entries to zero: there it
        # is applied in backward, after grad_output (e.g. an AMP loss scale) has been multiplied in.
        mean = reduction == "mean"
        in_kernel = 1.0 / B if (mean and z.dtype != torch.float16) else 1.0
        ctx.post_scale = (1.0 / B if mean else 1.0) / in_kernel
        ctx.reduction = reduction
        rows, grad = sparse_kd_forward(z, logprobs, classes, T, tail, labels, alpha,
                                       grad_scale=in_kernel, write_grad=need_grad)
        if need_grad:
            ctx.save_for_backward(grad)
        return _reduce(rows, reduction)

    @staticmethod
    def backward(ctx, g):
        # The gradient is scaled in place: the kernel's (B, C) buffer becomes the logits' gradient,
        # so the loss holds no second logits-sized tensor at its peak (the first GPU run measured two).
        # That spends the saved buffer, so a second backward through the same graph is refused.
        if getattr(ctx, "spent", False):
            raise RuntimeError("sparse_kd_loss (backend='triton') supports one backward pass per forward: its "
                               "gradient buffer is scaled in place; use backend='reference' to backpropagate "
                               "twice (retain_graph=True)")
        ctx.spent = True
        (grad,) = ctx.saved_tensors
        if ctx.post_scale != 1.0:
            g = g * ctx.post_scale
        if ctx.reduction == "none":
            grad.mul_(g.to(grad.dtype)[:, None])  # keeps the product in the stored dtype
        else:
            grad.mul_(g)  # a 0-dim fp32 factor: the product is rounded once, to grad's dtype
        return grad, None, None, None, None, None, None, None


@dataclass
class Targets:
    """A batch's teacher targets, ready for the loss.

    ``classes`` (B, k) int64 class ids and ``logprobs`` (B, k) float: the teacher's top-k
    log-probabilities at T = 1, sorted descending (``kind="topk"``), or ``log(count / N)`` of N
    classes drawn from the teacher (``kind="sample"``; class -1 and -inf in unused slots).
    ``tail`` is the loss's default for them: ``"uniform"`` for top-k, ``"sampled"`` for draws.
    ``temperature`` is the sampling temperature of drawn targets (they are unbiased at that
    temperature only; None for top-k)."""

    classes: torch.Tensor
    logprobs: torch.Tensor
    kind: str = "topk"
    tail: str = "uniform"
    temperature: float | None = None

    def __len__(self) -> int:
        return len(self.classes)

    def to(self, device, non_blocking: bool = False) -> "Targets":
        return Targets(self.classes.to(device, non_blocking=non_blocking),
                       self.logprobs.to(device, non_blocking=non_blocking), self.kind, self.tail, self.temperature)


def kd_loss(
    student_logits: torch.Tensor,
    targets: Targets,
    temperature: float = 1.0,
    tail: str | None = None,
    labels: torch.Tensor | None = None,
    label_weight: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """``T^2 * KL(p_T || softmax(z/T)) + label_weight * CE(z, labels)`` against a batch's ``targets``
    (:func:`sparse_kd_loss` with the targets' own tail by default): the fused Triton kernel for
    CUDA logits when Triton imports, the PyTorch reference elsewhere; the numbers ``kdcache train``
    computes.

    Sampled targets take no tail (any ``tail`` but ``"sampled"`` is refused) and are unbiased only
    at their sampling temperature, so ``temperature`` must equal it."""
    if targets.kind == "sample":
        if tail not in (None, "sampled"):
            raise LossInputError(f"tail={tail!r} does not apply to sampled targets: they are the whole target, "
                                 "with no tail (leave tail unset)")
        tau = float(targets.temperature or 1.0)
        if not math.isclose(float(temperature), tau, rel_tol=1e-9):
            raise LossInputError(f"these targets were drawn at temperature {tau:g} and estimate the teacher without "
                                 f"bias only there; pass temperature={tau:g} (not {temperature:g})")
    return sparse_kd_loss(student_logits, targets.logprobs, targets.classes, temperature=temperature,
                          tail=tail or targets.tail, labels=labels if label_weight else None,
                          label_weight=label_weight, reduction=reduction, backend=backend)
