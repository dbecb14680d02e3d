"""The self-distillation study's smoke version (`--quick`) runs end to end: demo data, teacher,
cache, multi-exit students trained and evaluated in worker processes, the table and the plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_selfdistill_study_quick(tmp_path):
    out = tmp_path / "sd-study"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "selfdistill_study.py"), "--out", str(out),
                          "--quick"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    results = json.loads((out / "results.json").read_text())
    arms = results["arms"]
    assert set(arms) == {"plain, cached KD", "independent, labels", "self-distilled, cached KD"}
    assert results["seeds"] == [0, 1]
    assert list(arms["plain, cached KD"]["exits"]) == ["exit3"]  # the plain student: the deepest column
    for a in (arms["independent, labels"], arms["self-distilled, cached KD"]):
        assert list(a["exits"]) == ["exit1", "exit2", "exit3"]
        for e in a["exits"].values():
            assert len(e["values"]) == 2 and all(0.0 <= v <= 1.0 for v in e["values"])
        assert a["curve"] and all(0 < p["compute"] for p in a["curve"])
    # each run was evaluated from its own files: the deepest exit's top-1 is the trainer's final one
    for run in (out / "runs").iterdir():
        ev = json.loads((run / "eval.json").read_text())
        assert ev["exits"][-1]["top1"] == pytest.approx(ev["summary_val_top1"], abs=1e-12)
    table = (out / "table.md").read_text()
    assert "self-distilled, cached KD" in table and "exit1" in table and "Paired differences" in table
    assert "self-distilled − plain, cached KD" in results["paired"]
    assert (out / "selfdistill_early_exit.png").read_bytes()[:4] == b"\x89PNG"
