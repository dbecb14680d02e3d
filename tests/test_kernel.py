"""The Triton sparse-KD kernel against the PyTorch reference (CPU, TRITON_INTERPRET=1)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import itertools  # noqa: E402
import math  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

triton = pytest.importorskip("triton")

from kdcache.learn.kernels.sparse_kd import sparse_kd_forward  # noqa: E402
from kdcache.learn.losses import sparse_kd_loss, sparse_kd_loss_reference  # noqa: E402

ON_CPU_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if ON_CPU_INTERPRETER else "cuda"
if not ON_CPU_INTERPRETER and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is not 1 and no CUDA device", allow_module_level=True)

TAILS = ("uniform", "renorm", "bucket")
DTYPES = (torch.float32, torch.bfloat16)
CS = (10, 1000, 5000, 32000)
KS = (1, 5, 10, 64)
TS = (1.0, 2.0, 4.0)


def make_case(B, C, k, dtype, seed, sharpness=None, z_scale=3.0, id_dtype=torch.int16):
    """Fresh random inputs per case (seeded by the case): fp16 top-k log-probs of a random teacher
    of random sharpness (so the tail mass varies from ~0 to ~1) and random student logits."""
    g = torch.Generator().manual_seed(seed)
    if sharpness is None:
        sharpness = float(torch.empty(1).uniform_(0.5, 6.0, generator=g))
    t = torch.randn(B, C, generator=g) * sharpness
    lp, ids = F.log_softmax(t, -1).topk(k, dim=-1)
    z = (torch.randn(B, C, generator=g) * z_scale).to(dtype)
    return z.to(DEVICE), lp.half().to(DEVICE), ids.to(id_dtype).to(DEVICE)


def reference_loss_and_grad(z, lp, ids, T, tail, labels=None, alpha=0.0):
    zr = z.detach().clone().requires_grad_()
    loss = sparse_kd_loss_reference(zr, lp, ids, T, tail, labels=labels, label_weight=alpha,
                                    reduction="none")
    (g,) = torch.autograd.grad(loss.mean(), zr)  # the "mean" gradient, in z's dtype
    return loss.detach(), g


def run_kernel(z, lp, ids, T, tail, labels=None, alpha=0.0, block=None):
    """The kernel with a NaN-poisoned gradient buffer: an element it does not write stays NaN."""
    B = z.shape[0]
    poisoned = torch.full_like(z, float("nan"))
    rows, grad = sparse_kd_forward(z, lp, ids, T, tail, labels=labels, label_weight=alpha,
                                   grad_scale=1.0 / B, grad_out=poisoned, block=block)
    assert grad.data_ptr() == poisoned.data_ptr()
    assert torch.isfinite(grad).all(), "kernel left gradient elements unwritten (NaN)"
    assert torch.isfinite(rows).all()
    return rows, grad


def check(z, lp, ids, T, tail, labels=None, alpha=0.0, block=None):
    rows, grad = run_kernel(z, lp, ids, T, tail, labels, alpha, block)
    want_rows, want_grad = reference_loss_and_grad(z, lp, ids, T, tail, labels, alpha)
    # fp32 error budget: the KL is a difference of log-normalisers of size ~ log C + max|z|/T,
    # each good to ~1e-7 relative, and T^2 multiplies it.
    C = z.shape[1]
    lse_size = math.log(C) + z.float().abs().max().item() / T + 1.0
    torch.testing.assert_close(rows, want_rows, rtol=2e-5, atol=1e-6 * T * T * lse_size)
    assert grad.dtype == z.dtype
    # An element is (T/B)(s_j - target_j) + (alpha/B)(CE part); both terms are <= 1 before they
    # cancel, so fp32 leaves an absolute error of a few 1e-7 * (T + alpha) / B.
    atol = 1e-6 * (T + alpha) / z.shape[0]
    if z.dtype == torch.float32:
        torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=atol)
    else:
        # both are roundings of (nearly) the same fp32 value to bf16: at most one ulp apart
        torch.testing.assert_close(grad.float(), want_grad.float(), rtol=2 ** -7, atol=atol)


def _cases(full: bool):
    pairs = [(C, k) for C in CS for k in KS if k <= C]  # k > C filtered, not skipped
    if full:
        return [(C, k, T, tail, dt) for (C, k), T, tail, dt in itertools.product(pairs, TS, TAILS, DTYPES)]
    # covering subset: every (C, k) pair with every tail; T and dtype rotate, so each value of
    # every axis (and every tail x T and tail x dtype combination) appears.
    out = []
    for i, (C, k) in enumerate(pairs):
        for j, tail in enumerate(TAILS):
            out.append((C, k, TS[(i + j) % 3], tail, DTYPES[(i + j) % 2]))
    return out


def _id(case):
    C, k, T, tail, dt = case
    return f"C{C}-k{k}-T{T:g}-{tail}-{str(dt).split('.')[-1]}"


@pytest.mark.parametrize("case", _cases(False), ids=_id)
def test_kernel_matches_reference(case):
    C, k, T, tail, dtype = case
    B = 2 if C >= 5000 else 3
    z, lp, ids = make_case(B, C, k, dtype, seed=zlib.crc32(_id(case).encode()))
    check(z, lp, ids, T, tail)


@pytest.mark.slow
@pytest.mark.parametrize("case", _cases(True), ids=_id)
def test_kernel_matches_reference_full_sweep(case):
    C, k, T, tail, dtype = case
    z, lp, ids = make_case(4, C, k, dtype, seed=zlib.crc32(_id(case).encode()) + 1)
    check(z, lp, ids, T, tail)


def test_covering_subset_covers_every_axis_value():
    cases = _cases(False)
    for axis, values in enumerate((CS, KS, TS, TAILS, DTYPES)):
        assert {c[axis] for c in cases} == set(values)
    assert {(c[2], c[3]) for c in cases} == set(itertools.product(TS, TAILS))
    assert all(c[1] <= c[0] for c in cases)


# --- blocking, shapes, dtypes -------------------------------------------------------------------


@pytest.mark.parametrize("C", [1000, 257])
@pytest.mark.parametrize("tail", TAILS)
def test_many_blocks_with_ragged_last_block(tail, C):
    # C not a multiple of BLOCK (257: a one-element last block), top-k ids in different blocks
    z, lp, ids = make_case(3, C, 10, torch.float32, seed=5)
    check(z, lp, ids, 2.0, tail, block=128)


def test_largest_vocabulary():
    C = 262_144
    z, lp, ids = make_case(1, C, 64, torch.float32, seed=6, id_dtype=torch.int32)
    for tail in ("uniform", "bucket"):
        check(z, lp, ids, 2.0, tail, block=8192)


@pytest.mark.parametrize("id_dtype", [torch.int16, torch.int32, torch.int64])
def test_id_dtypes(id_dtype):
    z, lp, ids = make_case(3, 500, 5, torch.float32, seed=7, id_dtype=id_dtype)
    check(z, lp, ids, 1.0, "uniform")


def test_float16_logits_and_noncontiguous_input():
    z, lp, ids = make_case(3, 700, 6, torch.float32, seed=8)
    zh = z.half()
    rows, grad = run_kernel(zh, lp, ids, 2.0, "uniform")
    want_rows, want_grad = reference_loss_and_grad(zh, lp, ids, 2.0, "uniform")
    torch.testing.assert_close(rows, want_rows, rtol=2e-5, atol=1e-4)
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=2 ** -9, atol=1e-7)
    # a non-contiguous view (every other column of a wider tensor)
    wide = torch.zeros(3, 1400, device=DEVICE)
    wide[:, ::2] = z
    view = wide[:, ::2]
    assert not view.is_contiguous()
    a = sparse_kd_loss(view, lp, ids, 2.0, backend="triton")
    b = sparse_kd_loss_reference(z, lp, ids, 2.0)
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


# --- edge cases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", TAILS)
def test_mass_at_least_one_and_k_equals_c(tail):
    # stored mass > 1 through fp16 rounding -> tail mass clamps to 0
    lp = torch.log(torch.tensor([[0.6, 0.3, 0.1005], [0.999, 0.0006, 0.0005]], dtype=torch.float64)).half()
    ids = torch.tensor([[3, 0, 7], [1, 2, 9]], dtype=torch.int16)
    z = torch.randn(2, 10, generator=torch.Generator().manual_seed(1)) * 2
    for T in TS:
        check(z.to(DEVICE), lp.to(DEVICE), ids.to(DEVICE), T, tail)
    # k == C: no tail at all
    z, lp, ids = make_case(3, 16, 16, torch.float32, seed=9)
    check(z, lp, ids, 2.0, tail)


@pytest.mark.parametrize("tail", TAILS)
def test_extreme_logits(tail):
    z, lp, ids = make_case(4, 500, 5, torch.float32, seed=10, z_scale=1.0)
    z[0] *= 1e4
    z[1] = 3e4
    z[2] = -1e4
    z[2, ids[2, 0].long()] = 1e4          # the student puts all its mass on a top-k class
    z[3, ids[3].long()] = 200.0           # ... or on the top-k set (tail underflows in fp32)
    lp[1, -1] = -math.inf                 # fp16 underflow in the store
    for T in (0.5, 4.0):
        check(z, lp, ids, T, tail)


# --- the label term -----------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("tail", TAILS)
def test_hard_label_ce_fused(T, tail):
    z, lp, ids = make_case(4, 300, 5, torch.float32, seed=11)
    labels = torch.tensor([0, int(ids[1, 0]), int(ids[2, 3]), 299], device=DEVICE)  # two in the top-k
    check(z, lp, ids, T, tail, labels=labels, alpha=0.4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_public_api_autograd(reduction, dtype):
    z, lp, ids = make_case(3, 400, 7, dtype, seed=12)
    hard = torch.tensor([1, 2, 3], device=DEVICE)
    soft = torch.softmax(torch.randn(3, 400, generator=torch.Generator().manual_seed(0)), -1).to(DEVICE)
    for labels in (None, hard, soft):
        alpha = 0.0 if labels is None else 0.3
        za = z.detach().clone().requires_grad_()
        zb = z.detach().clone().requires_grad_()
        a = sparse_kd_loss(za, lp, ids, 2.0, "uniform", labels, alpha, reduction, backend="triton")
        b = sparse_kd_loss(zb, lp, ids, 2.0, "uniform", labels, alpha, reduction, backend="torch")
        assert a.shape == b.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
        w = torch.linspace(0.5, 2.0, 3, device=DEVICE) if reduction == "none" else torch.tensor(1.7)
        (ga,) = torch.autograd.grad(a, za, w)
        (gb,) = torch.autograd.grad(b, zb, w)
        assert ga.dtype == dtype
        # low precision: the stored gradient is rounded once, the product with w once more
        term = (2.0 + alpha) * w.abs().max().item() / (3 if reduction == "mean" else 1)
        if dtype == torch.float32:
            tol = dict(rtol=1e-4, atol=1e-6 * term)
        else:
            tol = dict(rtol=2 ** -6, atol=2 ** -8 * 1e-2 * term)
        torch.testing.assert_close(ga.float(), gb.float(), **tol)


def test_no_gradient_buffer_without_requires_grad():
    z, lp, ids = make_case(2, 100, 3, torch.float32, seed=13)
    loss = sparse_kd_loss(z, lp, ids, backend="triton")
    assert loss.grad_fn is None
    assert loss.item() == pytest.approx(sparse_kd_loss_reference(z, lp, ids).item(), rel=1e-5)
    rows, grad = sparse_kd_forward(z, lp, ids, write_grad=False)
    assert grad is None and torch.isfinite(rows).all()


def test_the_gradient_buffer_is_scaled_in_place_once():
    """Backward hands the kernel's own buffer back (no second (B, C) tensor); a second backward
    through the same forward is refused, naming the way out, instead of returning a spent buffer."""
    z, lp, ids = make_case(2, 100, 3, torch.float32, seed=14)
    z.requires_grad_()
    loss = sparse_kd_loss(z, lp, ids, backend="triton")
    (g,) = torch.autograd.grad(loss * 1.5, z, retain_graph=True)
    zr = z.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(sparse_kd_loss_reference(zr, lp, ids) * 1.5, zr)
    torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-7)
    with pytest.raises(RuntimeError, match="one backward pass per forward.*backend='reference'"):
        torch.autograd.grad(loss, z)
    # the reference path keeps autograd's usual behaviour
    zr.grad = None
    ref = sparse_kd_loss(zr, lp, ids, backend="torch")
    ref.backward(retain_graph=True)
    g1 = zr.grad.clone()
    ref.backward()
    torch.testing.assert_close(zr.grad, 2 * g1)


def test_forced_triton_rejects_float64():
    z, lp, ids = make_case(2, 50, 3, torch.float32, seed=15)
    with pytest.raises(ValueError, match="float64"):
        sparse_kd_loss(z.double(), lp, ids, backend="triton")


# --- sampled targets (tail="sampled": counts / N on the drawn classes, no tail) --------------------

SAMPLES = (1, 5, 12, 64)


def make_sampled_case(B, C, N, dtype, seed, T=1.0, id_dtype=torch.int16, z_scale=3.0):
    """Sampled targets as a cache holds them (N draws at temperature T from a random teacher of
    random sharpness: distinct classes by count, -1 and log-weight -inf in unused slots)."""
    from kdcache.cache.targets import draw_batch, log_weights

    g = torch.Generator().manual_seed(seed)
    sharpness = float(torch.empty(1).uniform_(0.5, 6.0, generator=g))
    t = torch.randn(B, C, generator=g) * sharpness
    t[0] *= 20.0  # a confident row: repeated draws, so unused slots
    logp = F.log_softmax(t, -1).numpy()
    cls, cnt = draw_batch(logp, [f"r{i}" for i in range(B)], list(range(B)), seed, N, T)
    z = (torch.randn(B, C, generator=g) * z_scale).to(dtype)
    lw = torch.from_numpy(log_weights(cnt, N))
    return z.to(DEVICE), lw.to(DEVICE), torch.from_numpy(cls).to(id_dtype).to(DEVICE)


def _sampled_cases(full: bool):
    pairs = [(C, N) for C in CS for N in SAMPLES]
    if full:
        return [(C, N, T, dt) for (C, N), T, dt in itertools.product(pairs, TS, DTYPES)]
    return [(C, N, TS[i % 3], DTYPES[(i // 3) % 2]) for i, (C, N) in enumerate(pairs)]


def _sid(case):
    C, N, T, dt = case
    return f"C{C}-N{N}-T{T:g}-{str(dt).split('.')[-1]}"


@pytest.mark.parametrize("case", _sampled_cases(False), ids=_sid)
def test_kernel_matches_reference_sampled(case):
    C, N, T, dtype = case
    B = 2 if C >= 5000 else 3
    z, lw, ids = make_sampled_case(B, C, N, dtype, seed=zlib.crc32(_sid(case).encode()), T=T)
    assert (ids < 0).any() or N == 1 or N >= C  # unused slots (-1) are in the batch
    check(z, lw, ids, T, "sampled")


@pytest.mark.slow
@pytest.mark.parametrize("case", _sampled_cases(True), ids=_sid)
def test_kernel_matches_reference_sampled_full_sweep(case):
    C, N, T, dtype = case
    z, lw, ids = make_sampled_case(4, C, N, dtype, seed=zlib.crc32(_sid(case).encode()) + 1, T=T)
    check(z, lw, ids, T, "sampled")


def test_sampled_covering_subset_covers_every_axis_value():
    cases = _sampled_cases(False)
    for axis, values in enumerate((CS, SAMPLES, TS, DTYPES)):
        assert {c[axis] for c in cases} == set(values)


@pytest.mark.parametrize("labels", ["hard", "soft"])
def test_sampled_with_ragged_blocks_and_labels(labels):
    z, lw, ids = make_sampled_case(4, 257, 12, torch.float32, seed=31, T=2.0)
    lab = (torch.tensor([0, int(ids[1, 0]), 5, 256], device=DEVICE) if labels == "hard" else
           torch.softmax(torch.randn(4, 257, generator=torch.Generator().manual_seed(2)), -1).to(DEVICE))
    check(z, lw, ids, 2.0, "sampled", labels=lab, alpha=0.3, block=64)
    check(z, lw, ids, 2.0, "sampled", block=64)


def test_sampled_gradient_is_t_times_s_minus_w():
    """The fused gradient for sampled targets is T·(softmax(z/T) − w)/B with w = counts/N, zero target
    off the drawn classes (checked against the closed form, not only the reference)."""
    B, C, N, T = 3, 500, 12, 2.0
    z, lw, ids = make_sampled_case(B, C, N, torch.float32, seed=32, T=T)
    _, grad = run_kernel(z, lw, ids, T, "sampled")
    w = torch.zeros(B, C, dtype=torch.float64).scatter_add(1, ids.long().clamp_min(0), lw.double().exp())
    want = T * (torch.softmax(z.double() / T, -1) - w) / B
    torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-7)


# --- float32 everywhere -------------------------------------------------------------------------


@pytest.mark.parametrize("tail", ("uniform", "bucket"))
def test_small_tail_mass_is_computed_without_cancellation(tail):
    """A teacher that keeps all but 1e-5..3e-3 of its mass in the top-k. At T = 4 the tail classes
    get a large share of the softened target (u_T = log(m / (C - k)) / T), so the tail mass
    ``m = 1 - sum(exp(l))`` must be accurate relative to itself. Summed naively in float32 it is
    off by up to float32's epsilon (6e-8 absolute: 0.6 % of 1e-5); the kernel splits off the largest
    entry and stays within ~eps * (1 - p_max), well below what the float16-stored log-probs resolve."""
    B, C, k = 6, 24, 5
    tails = torch.tensor([1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3], dtype=torch.float64)
    top = torch.tensor([0.0, 2e-3, 1e-3, 5e-4, 2e-4], dtype=torch.float64)  # p_2..p_k (p_1 fills up)
    probs = top.repeat(B, 1)
    probs[:, 0] = 1.0 - tails - top[1:].sum()
    lp = probs.log().half()
    g = torch.Generator().manual_seed(21)
    ids = torch.stack([torch.randperm(C, generator=g)[:k] for _ in range(B)]).to(torch.int16)
    z = torch.randn(B, C, generator=g) * 2
    # the stored (fp16) values keep a tail mass close to the intended one
    m = 1.0 - lp.double().exp().sum(-1)
    assert ((m / tails - 1).abs() < 0.1).all(), m
    check(z.to(DEVICE), lp.to(DEVICE), ids.to(DEVICE), 4.0, tail)


def _float64_lines(variants) -> list[list[str]]:
    """The float64 lines of the kernel's compiled IR for each variant (tests/kernel_ir.py)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent)] + [p for p in [env.get("PYTHONPATH")] if p])
    res = subprocess.run([sys.executable, str(here / "kernel_ir.py"), json.dumps(variants)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


ALL_VARIANTS = [list(v) for v in itertools.product((0, 1, 2, 3), (0, 1, 2), (0, 1), (0, 1))]
# every tail mode (3: sampled targets) with everything switched on, each label mode once: the widest code paths
WIDEST_VARIANTS = [[t, lab, 1, 1] for t in (0, 1, 2, 3) for lab in (1, 2)]


def test_compiled_kernel_has_no_float64():
    """No intermediate of the compiled kernel is float64 (and the check can fail: a kernel that
    sums in float64 shows it in its IR)."""
    lines = _float64_lines(WIDEST_VARIANTS + ["control"])
    assert lines[-1], "the control kernel should compile to float64"
    assert dict(zip(map(tuple, WIDEST_VARIANTS), lines[:-1])) == {tuple(v): [] for v in WIDEST_VARIANTS}


@pytest.mark.slow
def test_compiled_kernel_has_no_float64_in_any_variant():
    lines = _float64_lines(ALL_VARIANTS)
    assert dict(zip(map(tuple, ALL_VARIANTS), lines)) == {tuple(v): [] for v in ALL_VARIANTS}
