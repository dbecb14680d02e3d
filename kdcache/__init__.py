"""kdcache: consistent knowledge distillation from cached teacher outputs.

The teacher runs once on seeded augmented views of every image; its top-k outputs and the view
geometry go into a sharded Zarr v3 cache. A student then trains on exactly those views, from the
cache, in ``kdcache train`` or in any training loop of your own:

    import kdcache

    cache = kdcache.open_cache("cache.zarr")
    loader = kdcache.ReplayLoader("data/train", cache, batch_size=256, device="cuda")
    for epoch in range(epochs):
        loader.set_epoch(epoch)                      # view epoch mod V of every record
        for batch in loader:
            logits = model(batch.images)
            loss = kdcache.kd_loss(logits, batch.targets, temperature=1.0)

docs/api.md is the contract (shapes, dtypes, determinism, DDP, resume). The names below load on
first use, so ``import kdcache`` (and the ``kdcache`` command) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__

# public name -> module that defines it
_API = {
    "open_cache": "kdcache.cache.handle",
    "Cache": "kdcache.cache.handle",
    "Record": "kdcache.cache.handle",
    "ReplayLoader": "kdcache.learn.loader",
    "Batch": "kdcache.learn.replay",
    "Targets": "kdcache.learn.losses",
    "kd_loss": "kdcache.learn.losses",
    "sparse_kd_loss": "kdcache.learn.losses",
    "LiveTeacher": "kdcache.learn.live",
    "LiveEnsemble": "kdcache.learn.live",
    "SpotCheck": "kdcache.learn.spotcheck",
    "AugSpec": "kdcache.data.views",
    "View": "kdcache.data.views",
    "render": "kdcache.data.render",
    "create_model": "kdcache.models.factory",
    "KdcacheError": "kdcache.errors",
    "PrecomputeConfig": "kdcache.tools.config",
    "VerifyConfig": "kdcache.tools.config",
    "EvaluateConfig": "kdcache.tools.config",
    "TrainConfig": "kdcache.learn.config",
    "SelfDistillConfig": "kdcache.learn.config",
    "precompute": "kdcache.tools.precompute",
    "train": "kdcache.learn.trainer",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .cache.handle import Cache, Record, open_cache
    from .data.render import render
    from .data.views import AugSpec, View
    from .errors import KdcacheError
    from .learn.config import SelfDistillConfig, TrainConfig
    from .tools.config import EvaluateConfig, PrecomputeConfig, VerifyConfig
    from .learn.live import LiveEnsemble, LiveTeacher
    from .learn.loader import ReplayLoader
    from .learn.losses import Targets, kd_loss, sparse_kd_loss
    from .learn.replay import Batch
    from .learn.spotcheck import SpotCheck
    from .learn.trainer import train
    from .tools.precompute import precompute
