"""The PyTorch reference sparse-KD loss against an independent float64 computation (DESIGN §3)."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdcache.learn.losses import LossInputError, sparse_kd_loss, sparse_kd_loss_reference

TAILS = ("uniform", "renorm", "bucket")


def make_teacher(B, C, k, sharpness=3.0, seed=0, id_dtype=torch.int64):
    """Top-k of a random teacher, stored like the cache does: fp16 log-probs, sorted descending."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(B, C, generator=g, dtype=torch.float64) * sharpness
    lp, ids = F.log_softmax(t, -1).topk(k, dim=-1)
    return lp.half(), ids.to(id_dtype)


def make_student(B, C, scale=3.0, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, generator=g, dtype=torch.float64) * scale).to(dtype)


# --- the independent float64 computation, written directly from DESIGN §3 --------------------


def dense_teacher_f64(logprobs, classes, C, T, tail):
    """p_T as a dense (B, C) float64 matrix, built by scatter."""
    l = logprobs.double()
    ids = classes.long()
    B, k = l.shape
    if tail == "renorm":
        full = torch.full((B, C), -math.inf, dtype=torch.float64).scatter(1, ids, l)
        return torch.softmax(full / T, dim=-1)
    m = (1.0 - l.exp().sum(-1)).clamp(min=0.0)
    if C > k:
        u = torch.log(m / (C - k))  # -inf where m == 0: those classes get probability 0
    else:
        u = torch.full((B,), -math.inf, dtype=torch.float64)
    full = u[:, None].expand(B, C).clone().scatter(1, ids, l)
    return torch.softmax(full / T, dim=-1)


def kl_f64(p, log_q):
    terms = torch.where(p > 0, p * (torch.log(p) - log_q), torch.zeros_like(p))
    return terms.sum(-1)


def expected_rows_f64(z, logprobs, classes, T, tail, labels=None, alpha=0.0):
    z = z.double()
    B, C = z.shape
    p = dense_teacher_f64(logprobs, classes, C, T, tail)
    log_s = torch.log_softmax(z / T, dim=-1)
    if tail == "bucket":
        ids = classes.long()
        top = torch.zeros(B, C, dtype=torch.bool).scatter(1, ids, True)
        pb = torch.cat([p.gather(1, ids), (p * ~top).sum(-1, keepdim=True)], 1)
        # student buckets in log space: extreme logits underflow exp() even in float64
        log_tail = log_s.masked_fill(top, -math.inf).logsumexp(-1, keepdim=True)
        log_sb = torch.cat([log_s.gather(1, ids), log_tail], 1)
        kl = kl_f64(pb, log_sb)
    else:
        kl = kl_f64(p, log_s)
    rows = T * T * kl
    if labels is not None and alpha:
        log_s1 = torch.log_softmax(z, dim=-1)
        if labels.dim() == 1:
            ce = -log_s1.gather(1, labels.long()[:, None])[:, 0]
        else:
            ce = -(labels.double() * log_s1).sum(-1)
        rows = rows + alpha * ce
    return rows


# --- reference vs independent -------------------------------------------------------------------

SHAPES = [(10, 1), (10, 3), (100, 5), (1000, 10), (1000, 64), (50, 50), (7, 6)]


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("C,k", SHAPES)
def test_reference_matches_float64(tail, T, C, k):
    B = 4
    seed = C * 1000 + k * 10 + int(T * 2)
    lp, ids = make_teacher(B, C, k, sharpness=1.0 + (seed % 5), seed=seed)
    z = make_student(B, C, seed=seed + 1)
    want = expected_rows_f64(z, lp, ids, T, tail)
    got = sparse_kd_loss_reference(z, lp, ids, T, tail, reduction="none")
    assert got.dtype == torch.float32 and got.shape == (B,)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    got_mean = sparse_kd_loss_reference(z, lp, ids, T, tail)
    torch.testing.assert_close(got_mean.double(), want.mean(), rtol=2e-5, atol=2e-5)
    got_sum = sparse_kd_loss_reference(z, lp, ids, T, tail, reduction="sum")
    torch.testing.assert_close(got_sum.double(), want.sum(), rtol=2e-5, atol=2e-5)


def test_tail_modes_differ_when_tail_mass_is_large():
    lp, ids = make_teacher(3, 100, 5, sharpness=0.5, seed=3)  # flat teacher: most mass in the tail
    assert (1 - lp.double().exp().sum(-1)).min() > 0.5
    z = make_student(3, 100)
    vals = {t: sparse_kd_loss_reference(z, lp, ids, 2.0, t).item() for t in TAILS}
    assert len({round(v, 4) for v in vals.values()}) == 3, vals


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_low_precision_logits(dtype):
    lp, ids = make_teacher(4, 300, 8, seed=5)
    z = make_student(4, 300, dtype=dtype)
    for tail in TAILS:
        want = expected_rows_f64(z, lp, ids, 2.0, tail)  # same rounded logits, in float64
        got = sparse_kd_loss_reference(z, lp, ids, 2.0, tail, reduction="none")
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("id_dtype", [torch.int16, torch.int32, torch.int64])
def test_id_dtypes_agree(id_dtype):
    lp, ids = make_teacher(3, 200, 7, seed=11)
    z = make_student(3, 200)
    want = sparse_kd_loss_reference(z, lp, ids, 1.5, "uniform")
    got = sparse_kd_loss_reference(z, lp, ids.to(id_dtype), 1.5, "uniform")
    assert got.item() == want.item()


# --- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("T,C,k", [(1.0, 7, 3), (2.5, 9, 2), (0.7, 5, 5), (3.0, 6, 1)])
def test_gradcheck_reference(tail, T, C, k):
    lp, ids = make_teacher(3, C, k, sharpness=1.0, seed=C + k)
    z = make_student(3, C, scale=1.0, dtype=torch.float64).requires_grad_()
    labels = torch.tensor([0, C - 1, 1])
    soft = torch.softmax(make_student(3, C, seed=9, dtype=torch.float64), -1)
    for lab, red in ((None, "mean"), (labels, "none"), (soft, "sum")):
        fn = lambda x: sparse_kd_loss_reference(  # noqa: E731
            x, lp.double(), ids, T, tail, labels=lab,
            label_weight=0.3 if lab is not None else 0.0, reduction=red)
        assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("tail", ["uniform", "renorm"])
@pytest.mark.parametrize("T", [1.0, 3.0])
def test_kd_gradient_closed_form(tail, T):
    """d/dz of the mean KD term is T (softmax(z/T) - p_T) / B."""
    B, C, k = 4, 40, 6
    lp, ids = make_teacher(B, C, k, sharpness=1.5, seed=21)
    z = make_student(B, C, dtype=torch.float64).requires_grad_()
    sparse_kd_loss_reference(z, lp, ids, T, tail).backward()
    p = dense_teacher_f64(lp, ids, C, T, tail)
    want = T * (torch.softmax(z.detach() / T, -1) - p) / B
    torch.testing.assert_close(z.grad, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_bucket_gradient_closed_form(T):
    """Bucket mode: top-k entries get T (s_i - p_i)/B; a tail class j gets
    T s_j (1 - P_tail / S_tail)/B (the teacher's tail mass spread like the student's tail)."""
    B, C, k = 3, 30, 4
    lp, ids = make_teacher(B, C, k, sharpness=1.0, seed=8)
    z = make_student(B, C, dtype=torch.float64).requires_grad_()
    sparse_kd_loss_reference(z, lp, ids, T, "bucket").backward()
    p = dense_teacher_f64(lp, ids, C, T, "uniform")
    s = torch.softmax(z.detach() / T, -1)
    top = torch.zeros(B, C, dtype=torch.bool).scatter(1, ids.long(), True)
    P_tail = (p * ~top).sum(-1, keepdim=True)
    S_tail = (s * ~top).sum(-1, keepdim=True)
    target = torch.where(top, p, s * P_tail / S_tail)
    torch.testing.assert_close(z.grad, T * (s - target) / B, rtol=1e-9, atol=1e-12)


# --- edge cases ---------------------------------------------------------------------------------


def test_topk_mass_at_or_above_one_is_finite_and_has_no_tail():
    # fp16 rounding pushes the stored mass over 1: exp(l) sums to > 1
    lp = torch.log(torch.tensor([[0.6, 0.3, 0.1005], [0.999, 0.0006, 0.0005]], dtype=torch.float64)).half()
    assert (lp.double().exp().sum(-1) > 1).all()
    ids = torch.tensor([[3, 0, 7], [1, 2, 9]])
    z = make_student(2, 10).requires_grad_()
    for T in (1.0, 2.0):
        vals = {}
        for tail in TAILS:
            loss = sparse_kd_loss_reference(z, lp, ids, T, tail)
            (g,) = torch.autograd.grad(loss, z)
            assert torch.isfinite(loss) and torch.isfinite(g).all()
            vals[tail] = loss.item()
            want = expected_rows_f64(z.detach(), lp, ids, T, tail).mean().item()
            assert vals[tail] == pytest.approx(want, rel=1e-5)
        # no tail mass -> all three modes describe the same teacher (up to float32 rounding)
        assert vals["uniform"] == pytest.approx(vals["renorm"], rel=1e-6)
        assert vals["bucket"] == pytest.approx(vals["renorm"], rel=1e-6)


def test_k_equals_c_modes_agree():
    lp, ids = make_teacher(3, 12, 12, seed=4)
    z = make_student(3, 12)
    want = expected_rows_f64(z, lp, ids, 2.0, "renorm")
    for tail in TAILS:
        got = sparse_kd_loss_reference(z, lp, ids, 2.0, tail, reduction="none")
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tail", TAILS)
def test_extreme_logits_are_finite(tail):
    B, C, k = 3, 500, 5
    lp, ids = make_teacher(B, C, k, seed=2)
    z = make_student(B, C, scale=1.0)
    z[0] *= 1e4                                   # huge spread
    z[1] = 3e4                                    # constant huge row
    z[2] = -1e4
    z[2, ids[2, 0]] = 1e4                         # student puts ~all mass on one top-k class
    z.requires_grad_()
    for T in (0.5, 1.0, 4.0):
        loss = sparse_kd_loss_reference(z, lp, ids, T, tail, reduction="none")
        (g,) = torch.autograd.grad(loss.sum(), z)
        assert torch.isfinite(loss).all() and torch.isfinite(g).all()
        want = expected_rows_f64(z.detach(), lp, ids, T, tail)
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-3)


def test_minus_inf_logprob_is_zero_mass():
    lp, ids = make_teacher(2, 50, 6, seed=6)
    lp[:, -1] = -math.inf  # an fp16 underflow in the store
    z = make_student(2, 50).requires_grad_()
    for tail in TAILS:
        loss = sparse_kd_loss_reference(z, lp, ids, 2.0, tail)
        (g,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(loss) and torch.isfinite(g).all()
        want = expected_rows_f64(z.detach(), lp, ids, 2.0, tail).mean()
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_student_equal_to_teacher_gives_zero_loss():
    C, k = 20, 20
    lp, ids = make_teacher(2, C, k, seed=7)
    z = torch.zeros(2, C).scatter(1, ids.long(), lp.float())  # z = teacher log-probs
    for T in (1.0, 3.0):
        assert sparse_kd_loss_reference(z, lp, ids, T).item() == pytest.approx(0.0, abs=1e-5)


# --- the label term -----------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_hard_label_ce(T):
    lp, ids = make_teacher(4, 60, 5, seed=12)
    z = make_student(4, 60)
    labels = torch.tensor([0, 5, int(ids[2, 0]), 59])
    kd = sparse_kd_loss_reference(z, lp, ids, T, reduction="none")
    got = sparse_kd_loss_reference(z, lp, ids, T, labels=labels, label_weight=0.25, reduction="none")
    ce = F.cross_entropy(z.double(), labels, reduction="none")  # at T=1 whatever T is
    torch.testing.assert_close(got.double(), kd.double() + 0.25 * ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        got.double(), expected_rows_f64(z, lp, ids, T, "uniform", labels, 0.25), rtol=1e-5, atol=1e-5)


def test_soft_labels_mixup():
    lp, ids = make_teacher(3, 40, 5, seed=13)
    z = make_student(3, 40)
    own, partner, lam = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 3]), 0.7
    soft = lam * F.one_hot(own, 40).double() + (1 - lam) * F.one_hot(partner, 40).double()
    got = sparse_kd_loss_reference(z, lp, ids, labels=soft, label_weight=0.5)
    a = sparse_kd_loss_reference(z, lp, ids, labels=own, label_weight=0.5)
    b = sparse_kd_loss_reference(z, lp, ids, labels=partner, label_weight=0.5)
    assert got.item() == pytest.approx(lam * a.item() + (1 - lam) * b.item(), rel=1e-6)
    want = expected_rows_f64(z, lp, ids, 1.0, "uniform", soft, 0.5).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_zero_label_weight_ignores_labels():
    lp, ids = make_teacher(2, 30, 3, seed=14)
    z = make_student(2, 30)
    a = sparse_kd_loss_reference(z, lp, ids)
    b = sparse_kd_loss_reference(z, lp, ids, labels=torch.tensor([0, 1]), label_weight=0.0)
    assert a.item() == b.item()


# --- validation and dispatch --------------------------------------------------------------------


def _args(B=2, C=10, k=3):
    lp, ids = make_teacher(B, C, k)
    return make_student(B, C), lp, ids


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(classes=a["classes"][:, :2]), "same shape"),
        (lambda a: a.update(student_logits=a["student_logits"][:1]), "batch size mismatch"),
        (lambda a: a.update(student_logits=a["student_logits"][:, :2]), "larger than the number of classes"),
        (lambda a: a.update(student_logits=a["student_logits"][0]), "2-D"),
        (lambda a: a.update(student_logits=a["student_logits"].long()), "float32"),
        (lambda a: a.update(classes=a["classes"].float()), "int16, int32 or int64"),
        (lambda a: a.update(classes=a["classes"] + 100), r"\[0, 10\)"),
        (lambda a: a.update(tail="gaussian"), "tail must be one of"),
        (lambda a: a.update(reduction="avg"), "reduction must be one of"),
        (lambda a: a.update(backend="cuda"), "backend must be one of"),
        (lambda a: a.update(temperature=0.0), "temperature"),
        (lambda a: a.update(temperature=float("nan")), "temperature"),
        (lambda a: a.update(label_weight=0.5), "no labels"),
        (lambda a: a.update(label_weight=0.5, labels=torch.tensor([0, 1, 2])), "labels has 3 rows"),
        (lambda a: a.update(label_weight=0.5, labels=torch.tensor([0, 10])), r"\[0, 10\)"),
        (lambda a: a.update(label_weight=0.5, labels=torch.ones(2, 9)), "soft labels"),
        (lambda a: a.update(label_weight=0.5, labels=torch.ones(2, 10, dtype=torch.long)), "floating"),
    ],
)
def test_validation_errors(mutate, match):
    z, lp, ids = _args()
    kw = dict(student_logits=z, logprobs=lp, classes=ids)
    mutate(kw)
    for fn in (sparse_kd_loss, sparse_kd_loss_reference):
        kw2 = dict(kw)
        if fn is sparse_kd_loss_reference:
            if "backend" in kw2:
                continue
        with pytest.raises(LossInputError, match=match):
            fn(**kw2)


def test_error_type_is_value_error():
    z, lp, ids = _args()
    with pytest.raises(ValueError):
        sparse_kd_loss(z, lp, ids, tail="nope")


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    z, lp, ids = _args()
    with pytest.raises(LossInputError, match="TRITON_INTERPRET=1"):
        sparse_kd_loss(z, lp, ids, backend="triton")


def test_auto_on_cpu_uses_the_reference(monkeypatch):
    import kdcache.learn.losses as losses

    def boom(*a, **k):
        raise AssertionError("the Triton path must not be used for CPU tensors under backend='auto'")

    monkeypatch.setattr(losses._FusedSparseKD, "apply", boom)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    z, lp, ids = _args()
    assert sparse_kd_loss(z, lp, ids).item() == sparse_kd_loss_reference(z, lp, ids).item()
    assert sparse_kd_loss(z, lp, ids, backend="torch").item() == sparse_kd_loss_reference(z, lp, ids).item()


# --- sampled targets (precompute --targets sample) ------------------------------------------------


def make_sampled(B, C, N=12, sharpness=3.0, seed=0, T=1.0, id_dtype=torch.int64):
    """Sampled targets as the cache holds them: N draws from the teacher at temperature T, distinct
    classes by count with -1 / count 0 in unused slots; returned as the loss takes them (log-weights)."""
    import numpy as np

    from kdcache.cache.targets import draw_batch, log_weights

    g = torch.Generator().manual_seed(seed)
    logp = F.log_softmax(torch.randn(B, C, generator=g) * sharpness, -1).numpy()
    cls, cnt = draw_batch(logp, [f"k{i}" for i in range(B)], [0] * B, seed, N, T)
    return torch.from_numpy(log_weights(cnt, N)), torch.from_numpy(cls).to(id_dtype), torch.from_numpy(cnt.astype(np.float64))


def dense_sampled_f64(counts, classes, C):
    """The sampled target w = count / N as a dense (B, C) float64 matrix, built by scatter."""
    w = counts.double() / counts.sum(-1, keepdim=True)
    return torch.zeros(counts.shape[0], C, dtype=torch.float64).scatter_add(1, classes.long().clamp_min(0), w)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("C,N", [(10, 12), (1000, 12), (50, 50), (7, 3)])
def test_sampled_reference_matches_float64_definition(C, N, T):
    """T²·KL(w ‖ softmax(z/T)) with w = counts/N on the drawn classes and nothing elsewhere (no tail,
    no tempering of w), and its gradient T·(softmax(z/T) − w)/B."""
    lw, ids, cnt = make_sampled(5, C, N, seed=C + N)
    assert (ids == -1).any() or N >= C  # unused slots are exercised
    z = make_student(5, C, seed=3).double().requires_grad_()
    rows = sparse_kd_loss_reference(z, lw, ids, T, "sampled", reduction="none")
    w = dense_sampled_f64(cnt, ids, C)
    want = T * T * kl_f64(w, torch.log_softmax(z.detach() / T, -1))
    torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(rows.mean(), z)
    torch.testing.assert_close(g, T * (torch.softmax(z.detach() / T, -1) - w) / 5, rtol=1e-5, atol=1e-7)


def test_sampled_unused_slot_rules():
    lw, ids, _ = make_sampled(3, 30, 4, seed=1)
    z = make_student(3, 30)
    sparse_kd_loss(z, lw, ids, tail="sampled")  # -1 with weight 0 is an unused slot
    bad = ids.clone()
    bad[0, 0] = -1  # a used slot (finite log-weight) without a class
    with pytest.raises(LossInputError, match="unused slot of sampled targets is class -1"):
        sparse_kd_loss(z, lw, bad, tail="sampled")
    with pytest.raises(LossInputError, match=r"classes must lie in \[0, 30\)"):
        sparse_kd_loss(z, lw, ids, tail="uniform")  # -1 is only allowed for sampled targets
