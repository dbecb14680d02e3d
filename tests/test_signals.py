"""Signals derived from a cache (`train --kd-signal`, `inspect --relations`): every statistic and every
target against a hand computation on a real cache of a real tiny dataset, the refusals, and each
signal trained from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from click.testing import CliRunner

from conftest import NUM_CLASSES, precompute_config
from kdcache.cache.store import CacheReader
from kdcache.cli import cli
from kdcache.data.shards import expand_urls, iter_samples, shard_name
from kdcache.learn.signals import SIGNALS, cache_stats
from kdcache.learn.trainer import setup

from test_inspect import documented_fields, resolve
from test_train import base_args, config

C = NUM_CLASSES
DERIVED = [s for s in SIGNALS if s != "full"]


@pytest.fixture(scope="module")
def plain_cache(dataset, teacher_weights, tmp_path_factory) -> Path:
    """A cache of ``dataset`` without mixup (V=3, top-3 of 5 classes: every record has a tail)."""
    from kdcache.tools.precompute import precompute

    out = tmp_path_factory.mktemp("plain") / "plain.zarr"
    precompute(precompute_config(dataset, out, teacher_weights, mixup=False))
    return out


def labels_of(dataset) -> dict[str, dict[str, int]]:
    return {shard_name(u): {s.key: s.cls for s in iter_samples(u)} for u in expand_urls(str(dataset))}


def dense_by_hand(lp: np.ndarray, ids: np.ndarray, tail: str) -> np.ndarray:
    """One record's teacher distribution over the C classes, written out: the stored top-k, and the
    rest of the mass spread evenly over the other classes (uniform) or the top-k renormalised."""
    d = np.zeros(C)
    p = np.exp(lp.astype(np.float64))
    if tail == "renorm":
        d[ids] = p / p.sum()
    else:
        d[:] = max(0.0, 1.0 - p.sum()) / (C - len(ids))
        d[ids] = p
    return d


def stats_by_hand(cache, dataset, tail: str):
    """ε, the relation table and each (shard, index, view)'s true-class probability, with loops."""
    reader = CacheReader(str(cache))
    labels = labels_of(dataset)
    rows = {c: [] for c in range(C)}
    p_true = {}
    for name in reader.shard_names():
        d = reader.read_shard(name)
        for i, key in enumerate(reader.keys(name)):
            y = labels[name][str(key)]
            for v in range(reader.views):
                dense = dense_by_hand(d["logprobs"][i, v], d["classes"][i, v], tail)
                rows[y].append(dense)
                p_true[(name, i, v)] = dense[y]
    eps = 1.0 - float(np.mean(list(p_true.values())))
    table = np.stack([np.mean(rows[c], axis=0) if rows[c] else np.zeros(C) for c in range(C)])
    return eps, table, p_true, sum(len(r) for r in rows.values())


@pytest.mark.parametrize("tail", ["uniform", "renorm"])
def test_cache_stats_match_a_hand_computation(plain_cache, dataset, tail):
    eps, table, _, n = stats_by_hand(plain_cache, dataset, tail)
    s = cache_stats(CacheReader(str(plain_cache)), expand_urls(str(dataset)), tail)
    assert s.records == n == 21 * 3 and s.images == 21
    assert s.epsilon == pytest.approx(eps, abs=1e-9) and 0.05 < s.epsilon < 0.95
    np.testing.assert_allclose(s.relations, table, atol=1e-9)
    np.testing.assert_allclose(s.relations[s.class_entries > 0].sum(1), 1.0, atol=1e-6)
    assert s.class_entries.sum() == n


def loss_by_hand(z: torch.Tensor, target: torch.Tensor, T: float, w=None) -> float:
    """mean over rows of w · T² · KL(target tempered at T ‖ softmax(z / T)), from dense tensors."""
    t = target.double().clamp_min(1e-300).log() / T
    t = torch.where(target > 0, t, torch.full_like(t, -torch.inf)).log_softmax(1)
    kl = (t.exp() * (t.clamp_min(-1e300) - F.log_softmax(z.double() / T, 1))).sum(1)
    rows = T * T * kl
    return float((rows if w is None else rows * w).mean())


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("signal", DERIVED)
def test_each_signal_trains_on_its_hand_computed_target(plain_cache, dataset, tmp_path, signal, T):
    """The task the trainer builds for --kd-signal gives, on real replayed batches, the loss of the
    target written out by hand: smoothed one-hot, relation row, or one-hot, weighted by p(y|view)/(1−ε)."""
    eps, table, p_true, _ = stats_by_hand(plain_cache, dataset, "uniform")
    run = setup(config(dataset, tmp_path / "r", cache=str(plain_cache), kd_signal=signal, temperature=T))
    assert run.run_config["resolved"]["kd_signal"]["name"] == signal
    assert run.run_config["resolved"]["kd_signal"]["epsilon"] == pytest.approx(eps, abs=1e-9)
    sig = SIGNALS[signal]
    torch.manual_seed(0)
    checked = 0
    for epoch in range(2):
        run.loader.set_epoch(epoch)
        for batch in run.loader:
            y = batch.label
            z = torch.randn(len(y), C) * 2
            if sig.target == "smoothed":
                target = torch.full((len(y), C), eps / (C - 1), dtype=torch.float64)
                target[torch.arange(len(y)), y] = 1 - eps
            elif sig.target == "relations":
                target = torch.from_numpy(table)[y]
            else:
                target = F.one_hot(y, C).double()
            w = None
            if sig.reweight:
                w = torch.tensor([p_true[(s, int(i), batch.view)] / (1 - eps) for s, i in zip(batch.shards, batch.index)])
            got = run.task.loss_terms(z, batch, run.task.teacher_targets(batch))
            assert float(got["loss"]) == pytest.approx(loss_by_hand(z, target, T, w), rel=1e-5, abs=1e-6)
            checked += len(y)
    assert checked == 2 * 21


def test_reweight_weights_have_mean_one_over_the_cache(plain_cache, dataset, tmp_path):
    run = setup(config(dataset, tmp_path / "r", cache=str(plain_cache), kd_signal="reweight"))
    ws = []
    for e in range(3):
        run.loader.set_epoch(e)
        ws += [run.task.signal.weights(b, "cpu") for b in run.loader]
    w = torch.cat(ws)
    assert len(w) == 63 and float(w.mean()) == pytest.approx(1.0, abs=1e-5) and float(w.std()) > 0.01


def run_cli(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res.exit_code, res.output


@pytest.mark.parametrize("signal", list(SIGNALS))
def test_each_signal_trains_from_the_cli(plain_cache, dataset, tmp_path, signal):
    out = tmp_path / "run"
    code, text = run_cli("train", *base_args(dataset, out, plain_cache), "--epochs", 1, "--kd-signal", signal)
    assert code == 0, text
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["kd_signal"]["name"] == signal
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kd_signal"] == signal and cfg["resolved"]["kd_signal"] == summary["kd_signal"]
    if signal == "full":
        assert not (out / "relations.npy").exists()
        return
    eps = summary["kd_signal"]["epsilon"]
    assert f"epsilon = {eps:.4f}" in text
    table = np.load(out / "relations.npy")
    s = cache_stats(CacheReader(str(plain_cache)), expand_urls(str(dataset)), "uniform")
    np.testing.assert_array_equal(table, s.relations)
    rel = json.loads((out / "relations.json").read_text())
    assert rel["epsilon"] == eps == s.epsilon and rel["class_entries"] == s.class_entries.tolist()
    assert rel["class_names"] == [f"class_{c}" for c in range(C)] and len(rel["confused_pairs"]) == C * (C - 1) // 2


def unlabelled(dataset, dst: Path) -> Path:
    dst.mkdir()
    for u in expand_urls(str(dataset)):
        with wds.TarWriter(str(dst / f"{shard_name(u)}.tar")) as w:
            for s in iter_samples(u):
                w.write({"__key__": s.key, s.ext: s.image})
    return dst


def test_refusals_exit_2_with_one_line(plain_cache, cache, dataset, teacher_weights, tmp_path):
    cases = [
        (base_args(dataset, tmp_path / "a", None) + ["--num-classes", C], "pass --cache CACHE"),
        (base_args(dataset, tmp_path / "b", plain_cache) + ["--mode", "labels"], "drop --mode labels"),
        (base_args(dataset, tmp_path / "c", plain_cache) + ["--teacher", "py:kdcache.models.zoo:tiny_cnn",
                                                           "--teacher-weights", teacher_weights], "drop --teacher"),
        (base_args(dataset, tmp_path / "d", cache), "precompute --mixup"),  # conftest's cache has mixup
        (base_args(unlabelled(dataset, tmp_path / "nocls"), tmp_path / "e", plain_cache), "has no cls label"),
    ]
    for args, needle in cases:
        code, text = run_cli("train", *args, "--kd-signal", "relations")
        lines = [ln for ln in text.strip().splitlines() if ln.startswith("error:")]
        assert code == 2 and len(lines) == 1 and needle in lines[0] and "--kd-signal" in lines[0], text
        assert "Traceback" not in text
    code, text = run_cli("train", *base_args(dataset, tmp_path / "f", plain_cache), "--kd-signal", "nonsense")
    assert code == 2 and "nonsense" in text


# ---- inspect --relations ---------------------------------------------------------------------------------


def test_inspect_relations_heatmap_and_json(plain_cache, dataset, tmp_path):
    png = tmp_path / "rel.png"
    code, text = run_cli("inspect", plain_cache, "--relations", png, "--data", dataset, "--json")
    assert code == 0, text
    d = json.loads(text)
    s = cache_stats(CacheReader(str(plain_cache)), expand_urls(str(dataset)), "uniform")
    assert d["layout"] == "heatmap" and d["epsilon"] == s.epsilon and d["png"] == str(png)
    np.testing.assert_allclose(np.array(d["relations"]), s.relations)
    assert sorted(d["order"]) == list(range(C))
    fields = documented_fields("inspect --json: relations")
    assert len(fields) > 10
    for f in fields:
        resolve(d, f)
    from PIL import Image

    assert Image.open(png).size[0] > 500
    code, text = run_cli("inspect", plain_cache, "--relations", tmp_path / "r2.png", "--data", dataset)
    assert code == 0 and f"{s.epsilon:.4f}" in text and "rank" in text, text


def test_related_classes_sit_together():
    """Two blocks of classes that confuse each other only within the block come out contiguous."""
    from kdcache.tools.inspection import related_order

    blocks = [[0, 3, 5], [1, 2, 4]]
    R = np.full((6, 6), 0.001)
    for b in blocks:
        for i in b:
            for j in b:
                R[i, j] = 0.15
    np.fill_diagonal(R, 0.6)
    order, _ = related_order(R, np.ones(6))
    pos = {c: order.index(c) for c in range(6)}
    for b in blocks:
        assert max(pos[c] for c in b) - min(pos[c] for c in b) == 2, order


def test_inspect_relations_many_classes_ranks_pairs(dataset, teacher_weights, tmp_path):
    """Beyond 100 classes the picture is the ranked table of the most confused pairs."""
    from kdcache.tools.precompute import precompute

    big = tmp_path / "big.zarr"
    precompute(precompute_config(dataset, big, None, teacher_weights=None, random_init=3, num_classes=120, topk=4,
                                 views=1, mixup=False))
    png = tmp_path / "pairs.png"
    code, text = run_cli("inspect", big, "--relations", png, "--data", dataset, "--top", 6, "--json")
    assert code == 0, text
    d = json.loads(text)
    assert d["layout"] == "pairs" and d["relations"] is None and len(d["confused_pairs"]) == 6
    means = [p["mean"] for p in d["confused_pairs"]]
    assert means == sorted(means, reverse=True) and png.stat().st_size > 1000


def test_inspect_relations_refusals(plain_cache, cache, dataset, tmp_path):
    code, text = run_cli("inspect", plain_cache, "--relations", tmp_path / "x.png")
    assert code == 2 and "--relations needs --data" in text
    code, text = run_cli("inspect", cache, "--relations", tmp_path / "x.png", "--data", dataset)
    assert code == 2 and "--mixup" in text and "Traceback" not in text
    assert not (tmp_path / "x.png").exists()


def test_a_derived_signal_resumes(plain_cache, dataset, tmp_path):
    """The statistics are recomputed on --resume and must equal the run's: the same cache gives the same ε."""
    out = tmp_path / "run"
    args = ["train", *base_args(dataset, out, plain_cache), "--epochs", 2, "--kd-signal", "relations+reweight"]
    code, text = run_cli(*args, "--stop-after", 3)
    assert code == 0 and (out / "checkpoint.pt").exists() and not (out / "summary.json").exists(), text
    code, text = run_cli(*args, "--resume")
    assert code == 0, text
    summary = json.loads(text.strip().splitlines()[-1])
    assert summary["steps"] == 12 and summary["kd_signal"]["name"] == "relations+reweight"
