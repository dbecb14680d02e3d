"""Validation: the centre view of every labelled image, and the one loop that runs a student over it.

``ValStream`` yields uint8 centre crops (``views.center_view``, rendered by PIL) with their labels;
ranks and workers own whole shards. ``val_logits`` runs a student (plain or multi-exit) over it and
yields every exit's logits with the labels, checked against the run's classes. The trainer's
evaluation (top-1/top-5, all ranks) and ``kdcache evaluate`` (confidence, early exit, ensemble) are
both reductions of this one loop.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, IterableDataset

from ..data.render import crop_tensor
from ..data.shards import decode_image, iter_samples
from ..data.views import center_view
from ..errors import BadImageError, KdcacheError
from ..models.exits import is_multi_exit
from ..runtime import guarded, raise_if_error, unbatched, worker_init, worker_items, worker_share
from .replay import ShardInfo
from .tasks import StudentInput


class ValStream(IterableDataset):
    """Validation batches: the centre view (``views.center_view``) of every labelled image at
    ``res``, as uint8 crops, with labels. Ranks and workers own whole shards."""

    def __init__(self, shards: list[ShardInfo], res: int, batch_size: int, rank: int, world: int,
                 skip_bad: bool = False):
        self.shards, self.res, self.batch_size, self.rank, self.world = shards, res, batch_size, rank, world
        self.skip_bad = skip_bad  # undecodable images are left out of the evaluation (not counted)

    def __iter__(self):
        return guarded(self._batches(worker_share(self.shards[self.rank :: self.world])))

    def _batches(self, shards: list[ShardInfo]):
        pix, lab = [], []
        for s in shards:
            for sample in iter_samples(s.url):
                if sample.cls is None:
                    raise KdcacheError(f"sample {sample.key!r} in val shard {s.url} has no cls label; --val-data needs "
                                       "labelled shards")
                try:
                    im = decode_image(sample)
                except BadImageError:
                    if not self.skip_bad:
                        raise
                    continue
                pix.append(crop_tensor(im, center_view(im.width, im.height), self.res))
                lab.append(sample.cls)
                if len(pix) == self.batch_size:
                    yield torch.stack(pix), torch.tensor(lab, dtype=torch.int64)
                    pix, lab = [], []
        if pix:
            yield torch.stack(pix), torch.tensor(lab, dtype=torch.int64)


@torch.no_grad()
def val_logits(model, stream: ValStream, inputs: StudentInput, num_classes: int, workers: int = 0,
               timeout: float = 600.0, out: str | None = None):
    """Per validation batch ``(logits, labels)`` on ``inputs.device``: ``logits`` is a list of every
    exit's float32 logits, shallow to deep (one entry for a plain student). The model runs as it is
    (the caller sets eval mode). A label outside the run's classes stops the pass."""
    device = inputs.device
    loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=unbatched,
                        pin_memory=device.type == "cuda", timeout=timeout if workers else 0,
                        worker_init_fn=worker_init if workers else None)
    multi = is_multi_exit(model)
    for item in worker_items(loader, timeout, out):
        pix, y = raise_if_error(item)
        pixels = pix.to(device, non_blocking=True).float().div_(255.0)
        if multi:
            zs = [t.float() for t in inputs.exits(model, pixels)["logits"]]
        else:
            zs = [inputs.logits(model, pixels).float()]
        y = y.to(device)
        if int(y.max()) >= num_classes or int(y.min()) < 0:
            raise KdcacheError(f"a val label lies outside 0..{num_classes - 1}; --val-data has other classes than "
                               "the run")
        yield zs, y
