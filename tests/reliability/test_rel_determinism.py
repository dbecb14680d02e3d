"""Determinism across worker counts (DESIGN §5: results are a fixed function of data, settings and
seed).

- precompute with --workers 0, 1 and 2 writes bitwise-equal caches (the teacher's batches are a
  function of the shard, not of which worker rendered it);
- the training stream: for a fixed worker count two runs give the same batches, record for
  record; for any worker count every usable record appears exactly once per epoch, and each
  record's targets are those the cache stores for its key and that epoch's view. The order of
  the records legitimately depends on the worker count (each worker shuffles its own shards).

Real DataLoader worker processes on real files.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from conftest import precompute_config, write_dataset
from relhelpers import NC, assert_no_loss, tally


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from kdcache.tools.precompute import precompute
    from kdcache.models.zoo import tiny_cnn

    root = tmp_path_factory.mktemp("determinism")
    write_dataset(root / "train", shards=5, per_shard=5, seed=41)
    torch.manual_seed(5)
    torch.save(tiny_cnn(NC).state_dict(), root / "teacher.pt")
    for w in (0, 1, 2):
        s = precompute(precompute_config(root / "train", root / f"w{w}.zarr", root / "teacher.pt", views=2, topk=3,
                                         seed=5, res=32, mixup=True, batch_size=8, workers=w))
        assert s["shards_written"] == 5
    return root


def test_precompute_workers_0_1_2_write_bitwise_equal_caches(env):
    for w in (1, 2):
        d = assert_no_loss(env / "w0.zarr", env / f"w{w}.zarr")
        assert d["records"] == 25


def _epochs(env, workers, epochs=(0, 1)):
    """Per epoch: the batches as lists of (shard, key), and the number of records whose targets,
    view or key do not match what the cache stores for them (misaligned)."""
    from kdcache.learn.replay import ReplayStream, StreamConfig, epoch_batches, prepare_shards
    from kdcache.data.shards import expand_urls
    from kdcache.cache.store import CacheReader

    cache = str(env / "w0.zarr")
    reader = CacheReader(cache)
    stream = ReplayStream(prepare_shards(expand_urls(str(env / "train")), reader, False),
                          StreamConfig(batch_size=4, res=32, seed=3, cache=cache, workers=workers, shuffle_buffer=8))
    out = {}
    for e in epochs:
        view = e % reader.views
        stored = {n: reader.read_view(n, view) for n in reader.shard_names()}
        batches, misaligned = [], 0
        for b in epoch_batches(stream, e):
            assert b.view == view
            batches.append(list(zip(b.shards, b.keys)))
            for j, (shard, key) in enumerate(zip(b.shards, b.keys)):
                rec, i = stored[shard], int(b.index[j])
                ok = (str(rec.keys[i]) == key and np.array_equal(rec.logprobs[i], b.logprobs[j].numpy())
                      and np.array_equal(rec.classes[i].astype(np.int64), b.classes[j].numpy()))
                misaligned += not ok
        out[e] = (batches, misaligned)
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_training_stream_is_a_function_of_the_worker_count(env, workers):
    first, second = _epochs(env, workers), _epochs(env, workers)
    everything = Counter((f"train-{s:06d}", f"train{s}_{i:04d}") for s in range(5) for i in range(5))
    for e, (batches, misaligned) in first.items():
        assert batches == second[e][0], f"epoch {e}: two runs with {workers} workers differ"
        assert misaligned == 0 and second[e][1] == 0
        seen = Counter(r for b in batches for r in b)
        assert seen == everything, f"epoch {e}: records not seen exactly once: {seen - everything} {everything - seen}"
        assert [len(b) for b in batches] == [4] * 6 + [1]
    assert first[0][0] != first[1][0]  # epochs are shuffled differently
    tally(records_compared=2 * sum(len(b) for e in first for b in first[e][0]), records_lost=0)


def test_worker_counts_see_the_same_records_in_their_own_order(env):
    a, b = _epochs(env, 0, epochs=(0,)), _epochs(env, 2, epochs=(0,))
    ra = sorted(r for batch in a[0][0] for r in batch)
    rb = sorted(r for batch in b[0][0] for r in batch)
    assert ra == rb and len(ra) == 25
    assert a[0][1] == b[0][1] == 0
    tally(records_compared=50, records_lost=0)
