"""Seeded views: determinism across processes, crop statistics, the fallback, mixup pairs, render()."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image
from kdcache.data.views import AugSpec, ShardViews, View, mixup_pairs, sample_crop, sample_shard_views, sample_view, stable_seed, view_rng
from kdcache.data.render import crop_batch, render

SPEC = AugSpec()
KEYS = [f"img_{i:05d}" for i in range(40)] + ["ünïcode/key", "a.b", ""]


def _views_here(seed, sizes):
    return [[sample_view(seed, k, v, w, h, SPEC).box + (sample_view(seed, k, v, w, h, SPEC).flip,)
             for v in range(4)] for k, (w, h) in zip(KEYS, sizes)]


def test_views_identical_in_another_process():
    """A fresh interpreter with another hash seed draws exactly the same views (no hash(), no global RNG)."""
    sizes = [(64 + 7 * i, 48 + 5 * i) for i in range(len(KEYS))]
    here = _views_here(123, sizes)
    code = (
        "import json, sys\n"
        "from kdcache.data.views import AugSpec, sample_view\n"
        "keys, sizes = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n"
        "spec = AugSpec()\n"
        "out = [[list(sample_view(123, k, v, w, h, spec).box) + [sample_view(123, k, v, w, h, spec).flip]\n"
        "        for v in range(4)] for k, (w, h) in zip(keys, sizes)]\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="4242")
    res = subprocess.run([sys.executable, "-c", code, json.dumps(KEYS), json.dumps(sizes)],
                         capture_output=True, text=True, env=env, check=True, timeout=120)
    there = json.loads(res.stdout)
    assert there == [[list(t) for t in row] for row in here]


def test_views_depend_on_seed_key_and_view():
    a = sample_view(0, "k", 0, 500, 400, SPEC)
    assert sample_view(0, "k", 0, 500, 400, SPEC) == a
    others = [sample_view(1, "k", 0, 500, 400, SPEC), sample_view(0, "k2", 0, 500, 400, SPEC),
              sample_view(0, "k", 1, 500, 400, SPEC)]
    assert all(o.box != a.box for o in others)
    # the hash separates its parts: ("ab", "c") and ("a", "bc") differ
    assert stable_seed("ab", "c") != stable_seed("a", "bc")
    assert stable_seed(1, "x", 2) == stable_seed(1, "x", 2)
    # documented generator: PCG64 seeded by the stable hash
    assert view_rng(3, "k", 2).random() == np.random.Generator(np.random.PCG64(stable_seed("view", 3, "k", 2))).random()


def _in_range_after_rounding(w, h, W, H, spec):
    """True if some real (w', h') within half a pixel of (w, h) meets the scale and ratio ranges."""
    A = W * H
    area_ok = (w + 0.5) * (h + 0.5) >= spec.scale[0] * A - 1e-9 and (w - 0.5) * (h - 0.5) <= spec.scale[1] * A + 1e-9
    ratio_ok = (w + 0.5) / (h - 0.5) >= spec.ratio[0] - 1e-12 and (w - 0.5) / (h + 0.5) <= spec.ratio[1] + 1e-12
    return area_ok and ratio_ok


@pytest.mark.parametrize("W,H", [(500, 375), (256, 256), (120, 300)])
def test_crop_statistics(W, H):
    n = 4000
    boxes = np.array([sample_view(5, f"s{i}", i % 10, W, H, SPEC).box for i in range(n)])
    flips = np.array([sample_view(5, f"s{i}", i % 10, W, H, SPEC).flip for i in range(n)])
    x, y, w, h = boxes.T
    assert (x >= 0).all() and (y >= 0).all() and (w >= 1).all() and (h >= 1).all()
    assert (x + w <= W).all() and (y + h <= H).all()
    ok = np.array([_in_range_after_rounding(a, b, W, H, SPEC) for a, b in zip(w, h)])
    assert ok.all(), boxes[~ok][:5]
    frac = w * h / (W * H)
    ratio = w / h
    # the ranges are actually used, not just respected: both ends are reached (a tall image
    # cannot hold a crop of ratio >= 3/4 bigger than W x W/(3/4))
    r = W / H
    biggest = 1.0 if SPEC.ratio[0] <= r <= SPEC.ratio[1] else (W * W / SPEC.ratio[0] if r < SPEC.ratio[0] else H * H * SPEC.ratio[1]) / (W * H)
    assert frac.min() < 0.1 and frac.max() > 0.9 * biggest
    assert ratio.min() < 0.78 and ratio.max() > 1.28
    if W == H:  # log-ratio is drawn symmetrically: on a square, about half the crops are wider than tall
        assert 0.45 < (ratio > 1).mean() < 0.55
    # flips: binomial(4000, 0.5) has sd ~0.008; 5 sd
    assert abs(flips.mean() - 0.5) < 0.04


def test_no_flip_when_disabled():
    spec = AugSpec(flip=False)
    assert not any(sample_view(0, f"k{i}", 0, 100, 80, spec).flip for i in range(200))


@pytest.mark.parametrize(
    "W,H,spec,expected",
    [
        # a strip far wider than 4/3: no try can fit; centre crop at the widest allowed ratio
        (1000, 50, AugSpec(), (466, 0, 67, 50)),
        # a tall strip: full width, height at the narrowest ratio
        (50, 1000, AugSpec(), (0, 466, 50, 67)),
        # ranges that cannot be met on a square: aspect 3..4 with most of the area
        (90, 90, AugSpec(scale=(0.9, 1.0), ratio=(3.0, 4.0)), (0, 30, 90, 30)),
        # ratio (2, 2) on 100x90: h = 90 would need w = 180, so full width, height round(100 / 2)
        (100, 90, AugSpec(scale=(1.0, 1.0), ratio=(2.0, 2.0)), (0, 20, 100, 50)),
    ],
)
def test_fallback_center_crop(W, H, spec, expected):
    boxes = {sample_view(0, f"k{i}", v, W, H, spec).box for i in range(30) for v in range(3)}
    assert boxes == {expected}


def test_fallback_whole_image_when_ratio_in_range():
    # scale (1, 1) with ratio range covering the image's own ratio: tries may fail on rounding,
    # but the result is always the whole image
    spec = AugSpec(scale=(1.0, 1.0), ratio=(0.5, 2.0))
    rng = np.random.default_rng(0)
    for _ in range(50):
        W, H = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        if not 0.5 <= W / H <= 2.0:
            continue
        x, y, w, h = sample_crop(view_rng(0, "k", 0), W, H, spec)
        assert (w * h) >= 0.95 * W * H and x + w <= W and y + h <= H


def test_bad_sizes_and_ranges_rejected():
    with pytest.raises(ValueError, match="empty size"):
        sample_view(0, "k", 0, 0, 10, SPEC)
    with pytest.raises(ValueError, match="scale"):
        AugSpec(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="ratio"):
        AugSpec(ratio=(0.0, 1.0))
    assert AugSpec.from_dict(AugSpec(mixup=True, scale=(0.2, 0.9)).to_dict()) == AugSpec(mixup=True, scale=(0.2, 0.9))


@pytest.mark.parametrize("n", [2, 7, 64, 101])
def test_mixup_pairs(n):
    for view in range(3):
        mw, lam = mixup_pairs(11, "train-000003", view, n)
        assert mw.dtype == np.int32 and lam.dtype == np.float16
        mixed = mw >= 0
        assert mixed.sum() == 2 * (n // 2)  # odd n: exactly one record unmixed
        idx = np.flatnonzero(mixed)
        assert (mw[idx] != idx).all()  # nobody mixes with itself
        assert (mw[mw[idx]] == idx).all()  # symmetric
        assert (lam[idx] >= 0.5).all() and (lam[idx] <= 1.0).all()
        assert (lam[idx] == lam[mw[idx]]).all()  # one λ per pair
        assert (lam[~mixed] == 1.0).all()
        again = mixup_pairs(11, "train-000003", view, n)
        assert (again[0] == mw).all() and (again[1] == lam).all()
    if n >= 7:
        # other view, shard or seed: other pairs
        base = mixup_pairs(11, "train-000003", 0, n)[0]
        assert not (mixup_pairs(11, "train-000003", 1, n)[0] == base).all()
        assert not (mixup_pairs(11, "train-000004", 0, n)[0] == base).all()
        assert not (mixup_pairs(12, "train-000003", 0, n)[0] == base).all()


def test_mixup_lambda_distribution():
    lams = np.concatenate([mixup_pairs(0, "s", v, 200)[1] for v in range(50)]).astype(np.float64)
    # λ = max(u, 1-u) with u ~ U(0,1) is U(0.5, 1): mean 0.75, about half above 0.75
    assert abs(lams.mean() - 0.75) < 0.01
    assert 0.45 < (lams > 0.75).mean() < 0.55


def test_shard_views_match_sample_view():
    keys = [f"k{i}" for i in range(9)]
    sizes = [(40 + i, 60 + 2 * i) for i in range(9)]  # (height, width)
    sv = sample_shard_views(3, "shard-a", keys, sizes, 4, AugSpec(mixup=True))
    assert sv.box.shape == (9, 4, 4) and sv.flip.shape == (9, 4) and sv.mix_with.shape == (9, 4)
    for i, (k, (h, w)) in enumerate(zip(keys, sizes)):
        for v in range(4):
            ref = sample_view(3, k, v, w, h, AugSpec(mixup=True))
            got = sv.view(i, v)
            assert got.box == ref.box and got.flip == ref.flip
            assert got.mix_with == int(mixup_pairs(3, "shard-a", v, 9)[0][i])
    off = sample_shard_views(3, "shard-a", keys, sizes, 4, AugSpec(mixup=False))
    assert (off.mix_with == -1).all() and (off.mix_lam == 1.0).all()
    # a subset of view indices gives exactly those columns
    some = sample_shard_views(3, "shard-a", keys, sizes, [2, 0], AugSpec(mixup=True))
    for a, b in ((some.box, sv.box), (some.flip, sv.flip), (some.mix_with, sv.mix_with), (some.mix_lam, sv.mix_lam)):
        assert np.array_equal(a, b[:, [2, 0]])


def test_more_views_start_with_the_fewer_views():
    """A cache precomputed with more views (same seed and augmentation) holds the views of a smaller
    one as its first columns: what docs/study.md says about growing V."""
    keys = [f"k{i}" for i in range(7)]
    sizes = [(50 + i, 70 - i) for i in range(7)]
    small = sample_shard_views(5, "shard-b", keys, sizes, 3, AugSpec(mixup=True))
    big = sample_shard_views(5, "shard-b", keys, sizes, 12, AugSpec(mixup=True))
    for a, b in ((small.box, big.box), (small.flip, big.flip), (small.mix_with, big.mix_with),
                 (small.mix_lam, big.mix_lam)):
        assert np.array_equal(a, b[:, :3])
    assert not np.array_equal(big.box[:, 3:6], big.box[:, :3])  # the new views are other views


def test_a_record_without_an_image_has_no_view_and_no_partner():
    """The one rule for bad records: no view, never anyone's partner; its partner stays unmixed
    (λ = 1); every other pair is as mixup_pairs draws it."""
    n, V = 11, 5
    keys = [f"k{i}" for i in range(n)]
    sizes = [(30 + i, 50) if i not in (3, 7) else (-1, -1) for i in range(n)]
    valid = np.array([i not in (3, 7) for i in range(n)])
    sv = sample_shard_views(9, "s", keys, sizes, V, AugSpec(mixup=True), valid=valid)
    for v in range(V):
        mw, lam = mixup_pairs(9, "s", v, n)
        for i in range(n):
            if not valid[i]:
                assert sv.view(i, v) == View(0, 0, 0, 0), (i, v)
            elif mw[i] >= 0 and not valid[mw[i]]:
                assert sv.mix_with[i, v] == -1 and sv.mix_lam[i, v] == 1.0, (i, v)
            else:
                assert sv.mix_with[i, v] == mw[i] and sv.mix_lam[i, v] == lam[i], (i, v)
                assert sv.view(i, v).box == sample_view(9, keys[i], v, 50, sizes[i][0], AugSpec()).box
    assert not np.isin(sv.mix_with, [3, 7]).any()
    # the rule fired: some record lost its partner to a bad one
    assert any(mixup_pairs(9, "s", v, n)[0][i] in (3, 7) for v in range(V) for i in range(n) if valid[i])


def test_crop_batch_renders_like_render(pictures):
    """crop_batch (what every path uses) gives the pixels render gives, record by record; with no
    mixed record it allocates no partner buffer."""
    a, b = pictures
    images = [a, b]
    mixed = ShardViews(np.array([[[0, 0, 60, 50]], [[5, 5, 40, 60]]]), np.array([[False], [True]]),
                       np.array([[1], [0]], dtype=np.int32), np.array([[0.7], [0.7]], dtype=np.float16))
    batch = crop_batch([(images, mixed, 0, 0), (images, mixed, 1, 0)], 16)
    assert batch.other is not None and batch.own.dtype == torch.uint8 and batch.lam.tolist() == pytest.approx([0.7] * 2, abs=1e-3)
    px = batch.pixels("cpu")
    assert torch.equal(px[0], render(a, mixed.view(0, 0), 16, b, mixed.view(1, 0)))
    assert torch.equal(px[1], render(b, mixed.view(1, 0), 16, a, mixed.view(0, 0)))
    plain = ShardViews(mixed.box, mixed.flip, np.full((2, 1), -1, dtype=np.int32), np.ones((2, 1), dtype=np.float16))
    batch = crop_batch([(images, plain, 1, 0), (images, plain, 0, 0)], 16)
    assert batch.other is None and batch.lam.tolist() == [1.0, 1.0]
    assert torch.equal(batch.pixels("cpu")[0], render(b, plain.view(1, 0), 16))


# ---- render ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pictures():
    rng = np.random.default_rng(0)
    return make_image(rng, 80, 60, 1), make_image(rng, 50, 70, 3)


def test_render_crop_resize_flip(pictures):
    im, _ = pictures
    v = View(10, 5, 40, 30)
    out = render(im, v, 24)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    ref = np.asarray(im.resize((24, 24), Image.Resampling.BILINEAR, box=(10, 5, 50, 35)), dtype=np.float32) / 255
    assert torch.equal(out, torch.from_numpy(ref).permute(2, 0, 1))
    flipped = render(im, View(10, 5, 40, 30, flip=True), 24)
    assert torch.equal(flipped, out.flip(-1))
    # the resolution is free: same box at another size
    assert render(im, v, 48).shape == (3, 48, 48)
    # non-RGB input is converted
    assert torch.equal(render(im.convert("RGBA"), v, 24), out)


def test_render_mixup(pictures):
    a, b = pictures
    va = View(0, 0, 60, 50, flip=False, mix_with=1, mix_lam=float(np.float16(0.7)))
    vb = View(5, 5, 40, 60, flip=True, mix_with=0, mix_lam=float(np.float16(0.7)))
    out = render(a, va, 16, b, vb)
    own = render(a, View(0, 0, 60, 50), 16)
    other = render(b, View(5, 5, 40, 60, flip=True), 16)
    lam = float(np.float16(0.7))
    assert torch.allclose(out, lam * own + (1 - lam) * other, atol=1e-6)
    assert not torch.allclose(out, own)
    with pytest.raises(ValueError, match="partner"):
        render(a, va, 16)
