"""`make bench-gpu` (benchmarks/gpu_suite.py) in its CPU smoke form: every section runs the code
paths the GPU run takes (the kernel under TRITON_INTERPRET=1) and lands in the JSON and markdown."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_cpu_suite_writes_every_section(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_suite
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "out"
    rc = gpu_suite.main(["--out", str(out), "--device", "cpu", "--quick", "--budget-s", "400"])
    r = json.loads((out / "gpu_suite.json").read_text())
    md = (out / "gpu_suite.md").read_text()
    assert rc == 0, {k: s.get("error") for k, s in r["sections"].items()}
    assert r["quick"] and r["environment"]["device"] == "cpu" and r["environment"]["torch"]
    assert set(r["sections"]) == {"loss", "precompute", "train"}
    assert not any(s.get("error") for s in r["sections"].values())

    loss = r["sections"]["loss"]
    combos = {(x["dtype"], x["tail"]) for x in loss["rows"]}
    assert combos == {(d, t) for d in ("float32", "bfloat16") for t in ("uniform", "renorm", "bucket", "sampled")}
    for row in loss["rows"]:
        assert row["naive_ms"] > 0 and row["reference_ms"] > 0 and row["triton_ms"] > 0, row
        # the naive dense losses and the kernel agree with the reference (every tail, sampled targets too)
        assert row["naive_vs_reference"] < 1e-4 and row["triton_vs_reference"] < 1e-4, row
        # the table's ×naive and ×ref columns have their ratios (×ref was once never computed)
        assert row["triton_speedup_vs_reference"] == pytest.approx(row["reference_ms"] / row["triton_ms"]), row
        assert row["triton_speedup_vs_naive"] == pytest.approx(row["naive_ms"] / row["triton_ms"]), row
    assert any("compiled" in s["what"] and "CPU" in s["why"] for s in loss["skipped"])

    pre = r["sections"]["precompute"]
    assert {(x["backend"], x["targets"]) for x in pre["rows"]} == {("pil", "topk"), ("torch", "topk"), ("pil", "sample")}
    assert all(x["ratio"] > 0 and x["images"] == 48 for x in pre["rows"])
    assert "| --render pil --targets sample |" in md
    assert {(x["backend"], x["where"]) for x in pre["render_per_core"]} == {("pil", "cpu"), ("torch", "cpu")}
    diff = pre["render_diff"]  # the torch backend on the CPU is within a level of PIL's pixels
    assert diff["pixels"][0]["a"] == "torch-cpu" and diff["pixels"][0]["max"] <= 1 and diff["teacher"]

    tr = r["sections"]["train"]
    ran = {(x["backend"], x["mode"]) for x in tr["rows"] if not x["compile"] and x.get("images_per_s")}
    assert ran == {(b, m) for b in ("pil", "torch") for m in ("labels", "cached", "live")}
    assert {x["backend"] for x in tr["ratios"]} == {"pil", "torch"}
    assert sum("compile" in s["what"] for s in tr["skipped"]) == 6

    for heading in ("## Sparse-KD loss", "## Precompute data path", "## Training throughput", "## Skipped"):
        assert heading in md
    assert "CPU smoke figures, not GPU performance" in md


def test_a_section_cut_short_still_renders(tmp_path):
    """A precompute row without its teacher-only figure (the section stopped after it) prints '-'
    instead of breaking the report (the first GPU run lost its markdown that way)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_suite
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    res = {"environment": {"device": "cuda", "torch": "x", "python": "3", "cpu_count": 1}, "quick": False,
           "budget_s": 1, "seconds": 1, "date": "d",
           "sections": {"precompute": {"rows": [{"what": "--render pil", "images_per_s": 644.2, "views_per_s": 2576.7}],
                                       "settings": {}, "error": "Traceback ..."}}}
    md = gpu_suite.markdown(res)
    assert "| --render pil | 644.2 | 2576.7 | - | **-** |" in md
