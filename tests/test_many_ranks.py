"""Four ranks for real: ``python -m torch.distributed.run --nproc_per_node 4`` (gloo, CPU).

- a 4-rank precompute writes the same cache, file for file and byte for byte, as one process;
- a 4-rank DDP train sees every record exactly once per epoch across the ranks (by shard, key and
  view, with the cached targets of that view), every rank running the same number of steps.

The batches a rank consumes are recorded by ``tests/rank_batches.py``, which wraps
``kdcache.learn.trainer.epoch_batches`` and otherwise runs the CLI unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NUM_CLASSES, TEACHER, precompute_config, write_dataset

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
RANKS, SHARDS, PER_SHARD, VIEWS = 4, 8, 4, 3


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]), OMP_NUM_THREADS="1")


def _torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS), *map(str, args)]


@pytest.fixture(scope="module")
def ranks_data(tmp_path_factory) -> Path:
    """8 shards of 4 images: two shards, 8 records, per rank."""
    root = tmp_path_factory.mktemp("ranks") / "train"
    write_dataset(root, shards=SHARDS, per_shard=PER_SHARD, seed=11)
    return root


@pytest.fixture(scope="module")
def one_rank_cache(ranks_data, teacher_weights, tmp_path_factory) -> Path:
    from kdcache.tools.precompute import precompute

    out = tmp_path_factory.mktemp("one") / "cache.zarr"
    summary = precompute(precompute_config(ranks_data, out, teacher_weights, views=VIEWS))
    assert summary["shards_written"] == SHARDS
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_four_rank_precompute_equals_one_rank_byte_for_byte(ranks_data, teacher_weights, one_rank_cache, tmp_path):
    out = tmp_path / "four.zarr"
    cmd = _torchrun("-m", "kdcache", "precompute", "--data", ranks_data, "--teacher", TEACHER, "--teacher-weights",
                    teacher_weights, "--num-classes", NUM_CLASSES, "--out", out, "-V", VIEWS, "-k", 3, "--seed", 7,
                    "--res", 32, "--mixup", "-b", 8, "--workers", 0, "--threads", 1, "--device", "cpu", "--no-progress")
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == RANKS
    assert sorted(s["shards_written"] for s in summaries) == [SHARDS // RANKS] * RANKS  # disjoint shares
    assert sum(s["records"] for s in summaries) == SHARDS * PER_SHARD * VIEWS

    one, four = _files(one_rank_cache), _files(out)
    assert sorted(four) == sorted(one)  # the same files: no claims left, no extra groups
    assert not (out / ".claims").exists()
    differing = [name for name in one if one[name] != four[name]]
    assert differing == []  # every array chunk, shard index and zarr.json (manifest, group attrs, digests)
    # and the parts that would matter most, spelled out
    root = json.loads(four["zarr.json"])["attributes"]["kdcache"]
    assert root == json.loads(one["zarr.json"])["attributes"]["kdcache"]
    assert root["shards"] == [f"train-{i:06d}" for i in range(SHARDS)]
    for i in range(SHARDS):
        attrs = json.loads(four[f"train-{i:06d}/zarr.json"])["attributes"]
        assert attrs["complete"] is True and attrs["num_samples"] == PER_SHARD and len(attrs["view_digests"]) == VIEWS


def _read_batches(path: Path) -> dict[int, list[dict]]:
    out = {}
    for r in range(RANKS):
        f = path / f"rank{r}.jsonl"
        assert f.exists(), f"rank {r} consumed no batch"
        out[r] = [json.loads(line) for line in f.read_text().splitlines()]
    return out


def test_four_rank_ddp_epochs_see_every_record_once(ranks_data, one_rank_cache, tmp_path):
    from kdcache.cache.store import CacheReader

    batches_dir, run = tmp_path / "batches", tmp_path / "run"
    batches_dir.mkdir()
    epochs = 2
    cmd = _torchrun(TESTS / "rank_batches.py", "train", "--data", ranks_data, "--cache", one_rank_cache, "--student",
                    "py:kdcache.models.zoo:tiny_cnn", "--out", run, "--epochs", epochs, "--batch-size", 3, "--workers", 1,
                    "--threads", 1, "--device", "cpu", "--no-progress")
    proc = subprocess.run(cmd, env={**_env(), "KD_TEST_BATCHES": str(batches_dir)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == RANKS and summary["records_dropped"] == 0

    reader = CacheReader(str(one_rank_cache))
    all_records = {(f"train-{s:06d}", f"train{s}_{i:04d}") for s in range(SHARDS) for i in range(PER_SHARD)}
    per_rank = _read_batches(batches_dir)
    steps = {r: [sum(b["epoch"] == e for b in bs) for e in range(epochs)] for r, bs in per_rank.items()}
    # 8 records per rank, batches of 3: ceil(8 / 3) = 3 steps on every rank, every epoch
    assert all(s == [3] * epochs for s in steps.values()), steps
    assert summary["steps"] == 3 * epochs
    for e in range(epochs):
        seen = [(shard, key, top1, b["view"]) for bs in per_rank.values() for b in bs if b["epoch"] == e
                for shard, key, top1 in b["records"]]
        assert {v for *_, v in seen} == {e % VIEWS}  # epoch e replays view e mod V
        pairs = [(shard, key) for shard, key, _, _ in seen]
        assert len(pairs) == len(all_records) and set(pairs) == all_records  # each record once, none missing
        ranks_of = {}
        for r, bs in per_rank.items():
            for b in bs:
                if b["epoch"] == e:
                    for shard, _, _ in b["records"]:
                        ranks_of.setdefault(shard, set()).add(r)
        assert all(len(rs) == 1 for rs in ranks_of.values())  # a shard belongs to one rank in an epoch
        for shard in {s for s, _ in all_records}:  # the targets each rank trained on are that view's
            view = reader.read_view(shard, e % VIEWS)
            cached = {str(k): int(c) for k, c in zip(view.keys, view.classes[:, 0])}
            got = {key: top1 for s, key, top1, _ in seen if s == shard}
            assert got == cached, (shard, e)


def test_the_ranks_benchmark_checks_hold_on_its_quick_point(tmp_path):
    """benchmarks/ranks_bench.py (the same two checks at scale) on its quick point: 640 images in 8
    shards, 4 ranks: equal caches file for file, every record once across the ranks, equal steps."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import ranks_bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    r = ranks_bench.main(["--quick", "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")])
    assert r["ok"] and r["caches_equal"] and r["files_differing"] == []
    assert r["records_seen"] == r["records_expected"] == 640 and r["views"] == [0]
    assert r["same_steps"] and len(r["steps_per_rank"]) == 4
    assert json.loads((tmp_path / "r.json").read_text())["cache_files"] == r["cache_files"] > 8
