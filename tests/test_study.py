"""The studies' smoke versions run end to end and write their tables and plots."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def study(name: str):
    """A script of benchmarks/, imported as a module."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_distill_study_quick(tmp_path):
    distill_study = study("distill_study")
    out = tmp_path / "study"
    res = distill_study.main(["--out", str(out), "--quick"])
    arms = {r["arm"] for r in res["results"]}
    assert arms == set(distill_study.ARMS)
    assert all(0.0 <= r["val_top1"] <= 1.0 and r["curve"] for r in res["results"])
    assert [r["V"] for r in res["sweep"]] == [1, 2, "live"] and all(r["val_top1"] for r in res["sweep"])
    table = (out / "table.md").read_text()
    assert all(arm in table for arm in distill_study.ARMS) and "| 2 |" in table
    assert (out / "curves.png").stat().st_size > 1000 and (out / "views.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["teacher"]["val_images"] > 0


def test_targets_study_quick(tmp_path):
    """The targets study's smoke run: every arm trains and is scored, the sampled cache is sized
    against the top-K one, the compact cache is smaller, and the table and reliability plot exist."""
    targets_study = study("targets_study")
    out = tmp_path / "targets"
    res = targets_study.main(["--out", str(out), "--quick"])
    assert set(res["arms"]) == set(targets_study.arms(2))
    for r in res["arms"].values():
        assert 0.0 <= r["top1"]["mean"] <= 1.0 and 0.0 <= r["ece"]["mean"] <= 1.0 and r["nll"]["mean"] > 0
        assert sum(p["count"] for p in r["pooled_curve"]) > 0
    c = res["caches"]
    assert res["samples"] in (2, 4) and c["compact"]["total"] < c["topk"]["total"] < c["dense"]["total"]
    assert 0.0 < res["teacher"]["top1"] <= 1.0
    table = (out / "table.md").read_text()
    assert all(arm in table for arm in targets_study.arms(2)) and f"sampled, N = {res['samples']}" in table
    assert (out / "reliability.png").stat().st_size > 1000


def test_decompose_study_quick(tmp_path):
    """The decomposition study's smoke run: every arm trains on its signal, the derived arms record the
    cache's ε, and the table, plot and relations picture exist."""
    decompose_study = study("decompose_study")
    out = tmp_path / "decompose"
    res = decompose_study.main(["--out", str(out), "--quick"])
    arms = [r["arm"] for r in res["results"]]
    assert arms == list(decompose_study.DEFAULT_ARMS)
    assert all(0.0 <= r["val_top1"] <= 1.0 and r["curve"] for r in res["results"])
    eps = res["signals"]["epsilon"]
    assert 0.0 < eps < 1.0
    for arm, spec in decompose_study.ARMS.items():
        if arm not in arms:
            continue
        summary = json.loads((out / "runs" / f"{arm.replace(' ', '_').replace('+', '-')}-s0" / "summary.json").read_text())
        got = summary["kd_signal"]
        if spec.get("mode") == "labels":
            assert got is None
        else:
            assert got["name"] == spec.get("kd_signal", "full")
            if "kd_signal" in spec:
                assert got["epsilon"] == eps
    table = (out / "table.md").read_text()
    assert all(f"| {arm} |" in table for arm in arms) and "share of full KD's gain" in table
    assert (out / "decompose.png").stat().st_size > 1000 and (out / "relations.png").stat().st_size > 1000


def test_ensemble_study_quick(tmp_path):
    """The ensemble study's smoke run: member B is trained at its own resolution, the three caches
    hold the members they should (one each, both for the ensemble), every arm trains, and the
    table compares the ensemble with each member."""
    ensemble_study = study("ensemble_study")
    out = tmp_path / "ensemble"
    res = ensemble_study.main(["--out", str(out), "--quick"])
    assert [r["arm"] for r in res["results"]] == list(ensemble_study.ARMS)
    assert all(0.0 <= r["val_top1"] <= 1.0 and r["curve"] for r in res["results"])
    assert res["members"]["A"]["res"] == 32 and res["members"]["B"]["res"] == 48
    assert json.loads((out / "teacher-b" / "config.json").read_text())["res"] == 48

    def teacher_of(name):
        return json.loads((out / "caches" / f"{name}-V2.zarr" / "zarr.json").read_text())["attributes"]["kdcache"]["teacher"]

    assert "members" not in teacher_of("A") and "members" not in teacher_of("B")
    ens = teacher_of("AB")["members"]
    assert [m["resolution"] for m in ens] == [32, 48]
    assert [m["weights_sha256"] for m in ens] == [teacher_of("A")["weights_sha256"], teacher_of("B")["weights_sha256"]]
    labels = json.loads((out / "runs" / "labels_only-s0" / "config.json").read_text())
    assert labels["mode"] == "labels"
    table = (out / "table.md").read_text()
    assert all(f"| {arm} |" in table for arm in ensemble_study.ARMS) and "ensemble over this arm" in table
