"""Runs ``kdcache ARGS`` and records the batches the training loop consumes, one JSON line per batch
(epoch, view, and the shard, key and top-1 cached class of every record) in
``$KD_TEST_BATCHES/rank<RANK>.jsonl``. For the many-rank tests: launched by ``torch.distributed.run``
as a script, it observes the batches ``kdcache train``'s ReplayLoader hands the loop (the real stream, loader and loop) without
changing them."""

from __future__ import annotations

import json
import os
import sys

import kdcache.learn.loader as loader_module
from kdcache.cli import cli

_epoch_batches = loader_module.epoch_batches


def recorded_batches(stream, epoch, *args, **kwargs):
    path = os.path.join(os.environ["KD_TEST_BATCHES"], f"rank{os.environ.get('RANK', '0')}.jsonl")
    with open(path, "a") as f:
        for batch in _epoch_batches(stream, epoch, *args, **kwargs):
            top1 = batch.classes[:, 0].tolist() if batch.classes is not None else [None] * len(batch)
            f.write(json.dumps({"epoch": epoch, "view": batch.view,
                                "records": [[s, k, c] for s, k, c in zip(batch.shards, batch.keys, top1)]}) + "\n")
            f.flush()
            yield batch


loader_module.epoch_batches = recorded_batches

if __name__ == "__main__":
    cli(args=sys.argv[1:], prog_name="kdcache")
