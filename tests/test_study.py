"""The distillation study's smoke version runs end to end and writes its table and plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_distill_study_quick(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import distill_study
    finally:
        sys.path.pop(0)
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
