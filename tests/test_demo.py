"""The quick demo end to end: its report comes from the run files, and its artifacts open with the
other commands."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner

from kdcache.cli import cli
from kdcache.data.shards import expand_urls, iter_samples
from kdcache.cache.store import CacheReader


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "kdcache-demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--quick", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, result.output


def _table_rows(output: str) -> dict[str, tuple[float, float]]:
    rows = {}
    for label in ("teacher (labels)", "student, labels only", "student, cached KD"):
        m = re.search(re.escape(label) + r"\s+([\d.]+)%\s+([\d.]+)%", output)
        assert m, f"row {label!r} missing from the demo's table:\n{output}"
        rows[label] = (float(m.group(1)), float(m.group(2)))
    return rows


def test_table_is_read_back_from_run_files(demo_run):
    out, output = demo_run
    rows = _table_rows(output)
    for run, label in (("teacher", "teacher (labels)"), ("student-labels", "student, labels only"),
                       ("student-kd", "student, cached KD")):
        summary = json.loads((out / "runs" / run / "summary.json").read_text())
        assert rows[label][0] == pytest.approx(100 * summary["final_val_top1"], abs=0.051)
        assert rows[label][1] == pytest.approx(100 * summary["best_val_top1"], abs=0.051)
    kd = json.loads((out / "runs" / "student-kd" / "summary.json").read_text())
    labels = json.loads((out / "runs" / "student-labels" / "summary.json").read_text())
    assert kd["mode"] == "cached" and labels["mode"] == "labels"
    assert kd["epochs"] == labels["epochs"] and kd["images_seen"] == labels["images_seen"]  # same budget
    report = json.loads((out / "report.json").read_text())
    stages = json.loads((out / "stages.json").read_text())
    assert set(report["stage_seconds"]) == {"data", "teacher", "cache", "student-kd", "student-labels"}
    for name, sec in report["stage_seconds"].items():
        assert sec == stages[name]["seconds"] and sec > 0
        assert re.search(rf"{re.escape(name)}\s+{sec:.1f} s", output)
    assert (out / "curves.png").stat().st_size > 1000


def test_artifacts_open_with_other_commands(demo_run):
    out, _ = demo_run
    train_urls = expand_urls(str(out / "data" / "train"))
    val_urls = expand_urls(str(out / "data" / "val"))
    n_train = sum(1 for u in train_urls for _ in iter_samples(u))
    n_val = sum(1 for u in val_urls for _ in iter_samples(u))
    assert n_train + n_val == 480
    reader = CacheReader(str(out / "cache.zarr"))
    assert all(reader.is_complete(s) for s in reader.shard_names())
    assert sum(reader.check_shard(s) for s in reader.shard_names()) == n_train

    runner = CliRunner()
    inspected = runner.invoke(cli, ["inspect", str(out / "cache.zarr"), "--json"])
    assert inspected.exit_code == 0, inspected.output
    assert json.loads(inspected.output)["totals"]["records"] == n_train * reader.views

    verified = runner.invoke(cli, [
        "verify", str(out / "cache.zarr"), "--data", str(out / "data" / "train"),
        "--teacher", "py:kdcache.models.zoo:teacher_cnn", "--teacher-weights", str(out / "runs" / "teacher" / "model.pt"),
        "--num-classes", "10", "--samples", "12", "--device", "cpu",
    ])
    assert verified.exit_code == 0, verified.output

    from kdcache.models.zoo import student_cnn

    student = student_cnn(10)
    student.load_state_dict(torch.load(out / "runs" / "student-kd" / "model.pt", weights_only=True))


def test_rerun_reuses_finished_stages(demo_run):
    out, _ = demo_run
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("summary.json")}
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--quick", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    for stage in ("data", "teacher", "cache", "student-kd", "student-labels"):
        assert f"{stage}: already done in an earlier run, reusing it" in result.output
    after = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("summary.json")}
    assert before == after  # no run was redone


def _printed_command(output: str, words: tuple[str, ...]) -> list[str]:
    """The arguments of the command the demo printed that starts with ``kdcache`` and ``words``
    (continuation lines joined, the executable's path dropped)."""
    import shlex

    lines = output.replace("\\\n", " ").splitlines()
    for line in lines:
        if not line.split() or not line.split()[0].endswith("kdcache"):
            continue
        args = shlex.split(line)
        if len(args) > len(words) and args[0].endswith("kdcache") and tuple(args[1:1 + len(words)]) == words:
            return args[1:]
    raise AssertionError(f"no `kdcache {' '.join(words)}` command in the demo's output:\n{output}")


def test_the_printed_train_command_reproduces_the_demo(demo_run, monkeypatch):
    """The train command the demo prints (built from the settings its own student ran with) gives
    the demo's figure. The quick demo keeps the test short; a printed command that dropped a setting
    (batch size, learning rate, warm-up, epochs, workers, crops) trains another schedule and lands
    elsewhere even at two epochs, and the full demo builds its command the same way."""
    out, output = demo_run
    args = _printed_command(output, ("train",))
    assert args[args.index("--out") + 1].endswith("runs/my-student")
    for flag, value in (("--batch-size", "64"), ("--lr", "0.003"), ("--warmup-steps", "20"), ("--epochs", "2")):
        assert args[args.index(flag) + 1] == value, args
    monkeypatch.chdir(out.parent)  # the printed paths are relative to where the demo ran
    res = CliRunner().invoke(cli, args + ["--no-progress"])
    assert res.exit_code == 0, res.output
    mine = json.loads(res.stdout.strip().splitlines()[-1])
    demo = json.loads((out / "runs" / "student-kd" / "summary.json").read_text())
    assert mine["mode"] == demo["mode"] == "cached" and mine["steps"] == demo["steps"]
    assert abs(mine["final_val_top1"] - demo["final_val_top1"]) <= 0.01


def test_quick_says_it_is_a_smoke_run(demo_run):
    _, output = demo_run
    assert "note: --quick is a smoke run, not a result" in output


def test_the_printed_render_command_writes_into_the_demo_folder(demo_run, monkeypatch):
    out, output = demo_run
    args = next(_printed_command(line, ("inspect",)) for line in output.splitlines() if "--render" in line)
    monkeypatch.chdir(out.parent)
    before = set(out.parent.iterdir())
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert set(out.parent.iterdir()) == before  # nothing new where the demo ran
    assert (out / "record.png").exists()
