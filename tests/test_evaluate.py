"""`kdcache evaluate`: per-exit accuracy, the ensemble, early-exit bookkeeping and its compute, on real
runs trained on the conftest shards and cache."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from torch.utils.flop_counter import FlopCounterMode

from conftest import NUM_CLASSES, with_aug
from kdcache.cli import cli
from kdcache.errors import KdcacheError
from kdcache.tools.evaluate import collect, early_exit, evaluate_run, load_student
from kdcache.models.exits import MultiExit, exit_costs
from kdcache.learn.trainer import TrainConfig, train
from kdcache.models.zoo import student_cnn

RES = 32
STUDENT = "py:kdcache.models.zoo:student_cnn"


def run(dataset, cache, out, **kw):
    base = dict(data=str(dataset), cache=str(cache), student=STUDENT, out=str(out), epochs=1, batch_size=4, res=RES,
                workers=0, device="cpu", progress=False, val_data=str(dataset), lr=1e-2)
    base.update(kw)
    return train(TrainConfig(**with_aug(base)))


@pytest.fixture(scope="module")
def sd_run(dataset, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sd"
    summary = run(dataset, cache, out, self_distill=True)
    return out, summary


@pytest.fixture(scope="module")
def plain_run(dataset, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "plain"
    return out, run(dataset, cache, out)


@pytest.fixture(scope="module")
def outputs(sd_run, dataset):
    model, cfg = load_student(str(sd_run[0]), "cpu")
    conf, correct, ens = collect(model, cfg, str(dataset), batch_size=8)
    costs = exit_costs(model.cost_profile(RES))
    return conf, correct, ens, costs


def test_early_exit_by_hand():
    conf = torch.tensor([[0.95, 0.50, 0.2], [0.20, 0.80, 0.9], [0.10, 0.10, 0.3], [0.90, 0.99, 0.9]])
    correct = torch.tensor([[True, False, False], [False, True, False], [True, True, False], [False, True, True]])
    r = early_exit(conf, correct, [0.9, 0.7], costs=[10, 30, 60], full=50)
    # leaves at exit 1, 2, 3, 1 (>= the threshold): right, right, wrong, wrong
    assert r["share"] == [0.5, 0.25, 0.25] and r["top1"] == 0.5
    assert r["flops_per_sample"] == (10 + 30 + 60 + 10) / 4 and r["compute"] == r["flops_per_sample"] / 50
    assert early_exit(conf, correct, 0.9, [10, 30, 60], 50)["share"] == [0.5, 0.0, 0.5]  # one value for all
    with pytest.raises(KdcacheError, match="3 thresholds for 2 shallow exits"):
        early_exit(conf, correct, [0.1, 0.2, 0.3], [10, 30, 60], 50)


def test_early_exit_on_a_self_distilled_student(outputs):
    conf, correct, ens, costs = outputs
    N, E = conf.shape
    assert E == 3 and N == 21 and ens.shape == (N,)
    cum, full = costs["cumulative"], costs["full"]
    for t in (0.0, 0.3, 0.5, 0.7, 0.9, 0.99, 1.01):
        r = early_exit(conf, correct, t, cum, full)
        assert sum(r["share"]) == pytest.approx(1.0)
        assert cum[0] / full - 1e-12 <= r["compute"] <= cum[-1] / full + 1e-12
    first = early_exit(conf, correct, 0.0, cum, full)  # every sample leaves at the first exit
    assert first["share"] == [1.0, 0.0, 0.0] and first["compute"] == cum[0] / full
    assert first["top1"] == pytest.approx(correct[:, 0].double().mean().item())
    last = early_exit(conf, correct, 1.01, cum, full)  # no softmax passes: every sample reaches the deepest
    assert last["share"] == [0.0, 0.0, 1.0] and last["compute"] == cum[-1] / full
    assert last["top1"] == pytest.approx(correct[:, -1].double().mean().item())
    # a threshold between: the samples that leave early are those confident there
    mid = early_exit(conf, correct, [0.5, 0.5], cum, full)
    assert mid["share"][0] == pytest.approx((conf[:, 0] >= 0.5).double().mean().item())


def test_costs_are_the_real_model_truncated():
    torch.manual_seed(0)
    net = student_cnn(NUM_CLASSES)
    model = MultiExit(net, resolution=RES).eval()
    prof = model.cost_profile(RES)
    x = torch.zeros(1, 3, RES, RES)

    def flops(fn):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            fn()
        return fc.get_total_flops()

    # up to stage 1 (features.0) and stage 2 (features.2), counted by hand on the model's own layers
    assert prof["backbone"][0] == flops(lambda: net.features[:1](x))
    assert prof["backbone"][1] == flops(lambda: net.features[:3](x))
    assert prof["backbone"][2] == prof["full"] == flops(lambda: net(x))
    stage1 = net.features[:1](x)
    assert prof["heads"][0] == flops(lambda: model.exits[0](stage1)) > 0
    c = exit_costs(prof)
    assert c["cumulative"] == [prof["backbone"][0] + prof["heads"][0],
                               prof["backbone"][1] + prof["heads"][0] + prof["heads"][1],
                               prof["full"] + prof["heads"][0] + prof["heads"][1]]
    assert c["alone"][-1] == prof["full"] and c["alone"][0] < c["alone"][1] < c["alone"][2]


def test_evaluate_reports_every_exit_and_sweeps(sd_run, dataset, tmp_path):
    out, summary = sd_run
    rep = evaluate_run(str(out), str(dataset), thresholds=[0.0, 0.5], sweep=True, batch_size=6, device="cpu",
                       plot=str(tmp_path / "curve.png"))
    assert [e["top1"] for e in rep["exits"]] == pytest.approx(
        [summary["final_val_top1_exits"][n] for n in ("exit1", "exit2", "exit3")], abs=1e-12)
    assert rep["exits"][-1]["top1"] == pytest.approx(summary["final_val_top1"], abs=1e-12)
    assert rep["exits"][-1]["compute_alone"] == 1.0 and rep["early_exit"]["share"] == [1.0, 0.0, 0.0]
    assert 0 <= rep["ensemble"]["top1"] <= 1 and rep["ensemble"]["compute"] == rep["exits"][-1]["compute_cumulative"]
    assert len(rep["sweep"]) >= 20 and all(sum(p["share"]) == pytest.approx(1.0) for p in rep["sweep"])
    assert rep["plot"] == str(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_a_plain_run_has_one_exit(plain_run, dataset):
    out, summary = plain_run
    res = CliRunner().invoke(cli, ["evaluate", str(out), "--val-data", str(dataset), "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert not rep["self_distill"] and len(rep["exits"]) == 1
    assert rep["exits"][0]["top1"] == pytest.approx(summary["final_val_top1"], abs=1e-12)
    assert rep["exits"][0]["compute_alone"] == 1.0 and rep["early_exit"]["compute"] == 1.0
    assert rep["early_exit"]["share"] == [1.0] and rep["ensemble"]["top1"] == rep["exits"][0]["top1"]
    text = CliRunner().invoke(cli, ["evaluate", str(out), "--val-data", str(dataset), "--device", "cpu"])
    assert text.exit_code == 0 and "single exit" in text.output and "early exit" in text.output, text.output


@pytest.mark.parametrize("flags", [["--sweep"], ["--thresholds", "0.5"], ["--sweep", "--thresholds", "0.5,0.6"]])
def test_early_exit_flags_on_a_single_exit_run_are_refused(flags, plain_run, dataset):
    """A plain run has nothing to leave early from: --sweep printed rows of threshold nan and
    --thresholds was ignored without a word. One line, exit 2, and nothing written."""
    out, _ = plain_run
    res = CliRunner().invoke(cli, ["evaluate", str(out), "--val-data", str(dataset), "--device", "cpu", *flags])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "single-exit run" in lines[0], res.stderr
    assert "--self-distill" in lines[0] and ("--sweep" in flags) == ("--sweep" in lines[0])
    assert not (out / "early_exit.png").exists()


def test_evaluate_errors_exit_2(sd_run, dataset, tmp_path):
    res = CliRunner().invoke(cli, ["evaluate", str(tmp_path), "--val-data", str(dataset)])
    assert res.exit_code == 2 and "no config.json" in res.output, res.output
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_text((sd_run[0] / "config.json").read_text())
    (cut / "checkpoint.pt").write_bytes(b"")
    res = CliRunner().invoke(cli, ["evaluate", str(cut), "--val-data", str(dataset)])
    assert res.exit_code == 2 and "no model.pt" in res.output and "--resume" in res.output, res.output
    res = CliRunner().invoke(cli, ["evaluate", str(sd_run[0]), "--val-data", str(dataset), "--thresholds", "0.1,0.2,0.3"])
    assert res.exit_code == 2 and "3 thresholds for 2 shallow exits" in res.output, res.output
