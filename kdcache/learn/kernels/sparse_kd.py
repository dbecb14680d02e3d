"""Triton kernel for the fused sparse-KD loss (forward loss + gradient in one launch).

One program per row of the batch.  See docs/losses.md for the derivation; in short, with
``a = z / T`` and the teacher at temperature T described by its k top-k probabilities ``p_i`` and
one per-class tail probability ``q`` (uniform/renorm) or a tail *bucket* mass ``P_tail`` (bucket):

* the teacher's tail mass and its probabilities at T come from the k stored log-probs (sampled
  targets, ``TAIL == 3``: the k log-weights give the target as it is, untempered, with no tail);
* pass 1 streams the row once in blocks of ``BLOCK`` and keeps
  - an online log-sum-exp of ``a``                       -> ``lse``  (student log-normaliser at T)
  - the shifted row sum ``sum_j (a_j - s0)``               (closed form of the uniform-tail cross term)
  - an online log-sum-exp of ``z`` when CE is on and T != 1 (the CE normaliser at T=1)
  - an online log-sum-exp of ``a`` over the non-top-k classes (bucket mode only)
* the row loss is assembled from those scalars and the k gathered entries (no dense target);
* pass 2 writes ``T*(softmax(a) - target) * grad_scale`` (+ the CE gradient) over the whole row,
  with the tail target everywhere; after ``tl.debug_barrier()`` the k top-k entries are rewritten
  with their exact values, recomputed in fp32.

Every intermediate is float32 (see the comment on the constants below; ``tl.static_assert`` states
it, and tests/kernel_ir.py checks the compiled IR for float64).

The kernel is jitted lazily (``_kernel()``) so the interpreter/compiled choice follows
``TRITON_INTERPRET`` at the time of the first call, not at import time.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

TAIL_CODES = {"uniform": 0, "renorm": 1, "bucket": 2, "sampled": 3}
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _sparse_kd_kernel(
    z_ptr, stride_z,            # (B, C) student logits, last dim contiguous
    lp_ptr, stride_lp,          # (B, K) teacher top-k log-probs at T=1
    ids_ptr, stride_ids,        # (B, K) class ids
    lab_ptr, stride_lab,        # (B,) hard labels or (B, C) soft labels (dummy when LABELS == 0)
    grad_ptr, stride_g,         # (B, C) gradient output, dtype of z
    loss_ptr,                   # (B,) fp32 per-row loss
    C, K,
    inv_T, T, log_n_tail,       # 1/T, T, log(C - K) (0 when K == C)
    grad_scale, ce_weight,
    TAIL: tl.constexpr,         # 0 uniform, 1 renorm, 2 bucket, 3 sampled (weights as given, no tail)
    LABELS: tl.constexpr,       # 0 none, 1 hard (B,) ids, 2 soft (B, C) targets
    CE_SEPARATE: tl.constexpr,  # CE needs its own log-sum-exp (T != 1)
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    KBLOCK: tl.constexpr,
):
    # Every intermediate is float32. Constants are typed explicitly: Triton types a bare Python
    # float that float32 cannot hold as a normal number (1e-38, say) as float64, and float64 would
    # then spread through everything computed from it.
    # NEG is a finite "minus infinity": masked lanes and empty accumulators use it, so no
    # -inf - -inf (NaN) is ever formed; exp(NEG - x) underflows to exactly 0 for any realistic x.
    NEG = tl.full((), -3.0e38, tl.float32)
    TINY = tl.full((), 1.0e-30, tl.float32)  # floor under a log of a mass (a normal float32)
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    ids_row = ids_ptr + row * stride_ids

    # ---- teacher: k log-probs at T=1 -> probabilities at T ---------------------------------
    koffs = tl.arange(0, KBLOCK)
    kmask = koffs < K
    l = tl.load(lp_ptr + row * stride_lp + koffs, mask=kmask, other=0.0).to(tl.float32)
    l = tl.maximum(l, -1.0e30)  # a stored -inf (fp16 underflow) becomes a finite, zero-mass value
    ids = tl.load(ids_row + koffs, mask=kmask, other=0).to(tl.int64)
    valid = kmask & (ids >= 0) & (ids < C)  # out-of-range ids are never dereferenced
    zk_raw = tl.load(z_row + ids, mask=valid, other=0.0).to(tl.float32)
    zk = zk_raw * inv_T

    # Tail mass at T=1, m = 1 - sum(exp(l)), in float32 without the cancellation of the naive sum
    # (which loses every tail mass below float32's epsilon when the top-k hold nearly all of it):
    # split off the largest entry, m = (1 - p_max) - sum(other p), and take 1 - p_max = -expm1(l_max)
    # from its Taylor series when l_max is near 0. The error is then ~eps * (1 - p_max), not ~eps.
    l_m = tl.where(kmask, l, NEG)
    l_max = tl.max(l_m, axis=0)
    i_max = tl.argmax(l_m, axis=0)
    rest = tl.sum(tl.where(kmask & (koffs != i_max), tl.exp(l), 0.0), axis=0)
    x = l_max
    series = x * (1.0 + x * 0.5 * (1.0 + x * (1.0 / 3.0) * (1.0 + x * 0.25 * (1.0 + x * 0.2 * (
        1.0 + x * (1.0 / 6.0) * (1.0 + x * (1.0 / 7.0) * (1.0 + x * 0.125)))))))
    expm1_max = tl.where(x > -0.5, series, tl.exp(x) - 1.0)  # truncation error < 2e-8 relative
    m = tl.maximum(-expm1_max - rest, 0.0)
    if TAIL == 1 or TAIL == 3:
        has_tail = m < 0.0  # renorm, sampled: never a tail (a false scalar of the right type)
    else:
        has_tail = (m > 0.0) & (C > K)
    u_T = (tl.log(tl.maximum(m, TINY)) - log_n_tail) * inv_T  # per tail class, at T
    if TAIL == 3:
        lT = tl.where(kmask, l, NEG)  # sampled: the weights are the target at T already (drawn at T)
    else:
        lT = tl.where(kmask, l * inv_T, NEG)
    mx = tl.maximum(tl.max(lT, axis=0), tl.where(has_tail, u_T, NEG))
    tot = tl.sum(tl.where(kmask, tl.exp(lT - mx), 0.0), axis=0)
    tot += tl.where(has_tail, tl.exp(u_T + log_n_tail - mx), 0.0)
    lse_t = mx + tl.log(tot)
    log_p = lT - lse_t
    p = tl.where(kmask, tl.exp(log_p), 0.0)
    log_q = u_T - lse_t                      # per tail class
    q = tl.where(has_tail, tl.exp(log_q), 0.0)
    log_ptail = u_T + log_n_tail - lse_t     # whole tail bucket
    p_tail = tl.where(has_tail, tl.exp(log_ptail), 0.0)

    # float32 throughout (checked when the kernel is traced, and by the interpreter)
    tl.static_assert(m.dtype == tl.float32)
    tl.static_assert(u_T.dtype == tl.float32)
    tl.static_assert(lse_t.dtype == tl.float32)
    tl.static_assert(p.dtype == tl.float32)
    tl.static_assert(q.dtype == tl.float32)
    tl.static_assert(p_tail.dtype == tl.float32)

    # ---- pass 1: online log-sum-exp(s) over the row -----------------------------------------
    # shift for the row sums (limits cancellation): z at the teacher's first top-k class
    c_raw = tl.sum(tl.where(koffs == 0, zk_raw, 0.0), axis=0)
    s0 = c_raw * inv_T
    run_m = NEG + 0.0 * inv_T
    run_s = 0.0 * inv_T
    row_sum = 0.0 * inv_T
    ce_m = NEG + 0.0 * inv_T
    ce_s = 0.0 * inv_T
    tl_m = NEG + 0.0 * inv_T
    tl_s = 0.0 * inv_T
    y_sum = 0.0 * inv_T
    yz_sum = 0.0 * inv_T
    lab_row = lab_ptr + row * stride_lab
    offs0 = tl.arange(0, BLOCK)
    for start in range(0, C, BLOCK):
        offs = start + offs0
        mask = offs < C
        zr = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
        a = zr * inv_T
        a_m = tl.where(mask, a, NEG)
        new_m = tl.maximum(run_m, tl.max(a_m, axis=0))
        run_s = run_s * tl.exp(run_m - new_m) + tl.sum(tl.where(mask, tl.exp(a_m - new_m), 0.0), axis=0)
        run_m = new_m
        row_sum += tl.sum(tl.where(mask, a - s0, 0.0), axis=0)
        if CE_SEPARATE:
            zr_m = tl.where(mask, zr, NEG)
            new_c = tl.maximum(ce_m, tl.max(zr_m, axis=0))
            ce_s = ce_s * tl.exp(ce_m - new_c) + tl.sum(tl.where(mask, tl.exp(zr_m - new_c), 0.0), axis=0)
            ce_m = new_c
        if LABELS == 2:
            yv = tl.load(lab_row + offs, mask=mask, other=0.0).to(tl.float32)
            y_sum += tl.sum(yv, axis=0)
            yz_sum += tl.sum(yv * (zr - c_raw), axis=0)
        if TAIL == 2:
            is_top = offs < 0
            for i in range(0, K):
                idi = tl.load(ids_row + i).to(tl.int64)
                is_top = is_top | (offs == idi)
            at = tl.where(mask & (is_top == 0), a, NEG)
            new_t = tl.maximum(tl_m, tl.max(at, axis=0))
            tl_s = tl_s * tl.exp(tl_m - new_t) + tl.sum(tl.where(at > NEG, tl.exp(at - new_t), 0.0), axis=0)
            tl_m = new_t
    lse = run_m + tl.log(run_s)
    log_s_top = zk - lse

    # ---- row loss -----------------------------------------------------------------------------
    if TAIL == 2:
        lse_tail = tl_m + tl.log(tl.maximum(tl_s, TINY))   # student's non-top-k log-mass (+ lse)
        tl.static_assert(lse_tail.dtype == tl.float32)
        log_stail = lse_tail - lse
        kl = tl.sum(tl.where(valid & (p > 0.0), p * (log_p - log_s_top), 0.0), axis=0)
        kl += tl.where(p_tail > 0.0, p_tail * (log_ptail - log_stail), 0.0)
    else:
        neg_ent = tl.sum(tl.where(kmask & (p > 0.0), p * log_p, 0.0), axis=0)
        neg_ent += tl.where(has_tail, p_tail * log_q, 0.0)
        sum_pa = tl.sum(tl.where(valid, (p - q) * (zk - s0), 0.0), axis=0) + q * row_sum
        kl = neg_ent + (lse - s0) - sum_pa
    row_loss = T * T * kl
    tl.static_assert(lse.dtype == tl.float32)
    tl.static_assert(kl.dtype == tl.float32)
    if LABELS != 0:
        if CE_SEPARATE:
            lse1 = ce_m + tl.log(ce_s)
        else:
            lse1 = lse
    if LABELS == 1:
        y = tl.load(lab_row).to(tl.int64)
        y_ok = (y >= 0) & (y < C)
        zy = tl.load(z_row + y, mask=y_ok, other=0.0).to(tl.float32)
        row_loss += ce_weight * (lse1 - zy)
    if LABELS == 2:
        # -sum_j y_j (z_j - lse1), shifted by c_raw
        row_loss += ce_weight * (y_sum * (lse1 - c_raw) - yz_sum)
    tl.static_assert(row_loss.dtype == tl.float32)
    tl.store(loss_ptr + row, row_loss)

    # ---- pass 2: dense gradient, then the k entries exactly ------------------------------------
    if WRITE_GRAD:
        g_row = grad_ptr + row * stride_g
        kd_c = T * grad_scale
        ce_c = ce_weight * grad_scale
        for start in range(0, C, BLOCK):
            offs = start + offs0
            mask = offs < C
            zr = tl.load(z_row + offs, mask=mask, other=0.0).to(tl.float32)
            a = zr * inv_T
            s = tl.exp(a - lse)
            if TAIL == 2:
                # tail target: teacher's tail mass spread like the student's own tail
                t = p_tail * tl.exp(tl.minimum(a - lse_tail, 0.0))
            else:
                t = q
            g = kd_c * (s - t)
            if LABELS != 0:
                if CE_SEPARATE:
                    s1 = tl.exp(zr - lse1)
                else:
                    s1 = s
                if LABELS == 1:
                    g += ce_c * (s1 - tl.where(offs == y, 1.0, 0.0))
                else:
                    yv = tl.load(lab_row + offs, mask=mask, other=0.0).to(tl.float32)
                    g += ce_c * (y_sum * s1 - yv)
            tl.static_assert(g.dtype == tl.float32)
            tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()
        s_top = tl.exp(log_s_top)
        g_top = kd_c * (s_top - p)
        if LABELS != 0:
            if CE_SEPARATE:
                s1_top = tl.exp(zk_raw - lse1)
            else:
                s1_top = s_top
            if LABELS == 1:
                g_top += ce_c * (s1_top - tl.where(ids == y, 1.0, 0.0))
            else:
                y_top = tl.load(lab_row + ids, mask=valid, other=0.0).to(tl.float32)
                g_top += ce_c * (y_sum * s1_top - y_top)
        tl.static_assert(g_top.dtype == tl.float32)
        tl.store(g_row + ids, g_top.to(grad_ptr.dtype.element_ty), mask=valid)


_KERNELS: dict = {}


def _kernel():
    """The jitted kernel for the current TRITON_INTERPRET setting (jitted on first use)."""
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interp not in _KERNELS:
        _KERNELS[interp] = triton.jit(_sparse_kd_kernel)
    return _KERNELS[interp]


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_size(C: int, max_block: int = 4096) -> int:
    return max(16, min(triton.next_power_of_2(C), max_block))


def sparse_kd_forward(
    student_logits: torch.Tensor,
    logprobs: torch.Tensor,
    classes: torch.Tensor,
    temperature: float = 1.0,
    tail: str = "uniform",
    labels: torch.Tensor | None = None,
    label_weight: float = 0.0,
    grad_scale: float = 1.0,
    write_grad: bool = True,
    grad_out: torch.Tensor | None = None,
    block: int | None = None,
):
    """Launch the kernel. Returns ``(loss_rows (B,) fp32, grad (B, C) in z's dtype or None)``.

    ``loss_rows`` is ``T^2 KL + label_weight * CE`` per row; ``labels`` are (B,) class ids or
    (B, C) soft targets (both handled in the kernel). The gradient is
    ``grad_scale * d(loss_rows.sum())/dz``. ``grad_out`` lets the caller supply (e.g. poison) the
    gradient buffer: it must be contiguous, of z's shape and dtype, and is fully overwritten.
    Inputs are assumed validated by :func:`kdcache.learn.losses.sparse_kd_loss`.
    """
    z = student_logits
    if z.device.type != "cuda" and not interpreter_enabled():
        raise ValueError(
            f"the Triton sparse-KD kernel needs a CUDA tensor (got device {z.device}); "
            "set TRITON_INTERPRET=1 to run it on the CPU interpreter, or use backend='torch'"
        )
    if z.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel supports logits in {KERNEL_DTYPES}, got {z.dtype}")
    if z.stride(-1) != 1:
        z = z.contiguous()
    lp = logprobs.contiguous()
    ids = classes.contiguous()
    B, C = z.shape
    K = lp.shape[1]
    loss_rows = torch.empty(B, device=z.device, dtype=torch.float32)
    if write_grad:
        if grad_out is None:
            grad = torch.empty((B, C), device=z.device, dtype=z.dtype)
        else:
            if grad_out.shape != z.shape or grad_out.dtype != z.dtype or not grad_out.is_contiguous():
                raise ValueError("grad_out must be a contiguous tensor of the logits' shape and dtype")
            grad = grad_out
    else:
        grad = loss_rows  # unused pointer
    if labels is None or label_weight == 0.0:
        label_mode, lab, lab_stride = 0, loss_rows, 0
    elif labels.dim() == 1:
        label_mode, lab, lab_stride = 1, labels.contiguous(), 1
    else:
        lab = labels.contiguous()
        label_mode, lab_stride = 2, lab.stride(0)
    T = float(temperature)
    BLOCK = block or block_size(C)
    KBLOCK = max(2, triton.next_power_of_2(K))
    if B == 0:
        return loss_rows, (grad if write_grad else None)
    _kernel()[(B,)](
        z, z.stride(0),
        lp, lp.stride(0),
        ids, ids.stride(0),
        lab, lab_stride,
        grad, grad.stride(0) if write_grad else 0,
        loss_rows,
        C, K,
        1.0 / T, T, math.log(C - K) if C > K else 0.0,
        float(grad_scale), float(label_weight),
        TAIL=TAIL_CODES[tail],
        LABELS=label_mode,
        CE_SEPARATE=label_mode != 0 and T != 1.0,
        WRITE_GRAD=write_grad,
        BLOCK=BLOCK,
        KBLOCK=KBLOCK,
        num_warps=8 if BLOCK >= 2048 else 4,
    )
    return loss_rows, (grad if write_grad else None)
