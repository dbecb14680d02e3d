"""Model factories for the tests, reachable as ``py:testmodels:NAME`` (tests/ is on sys.path under
pytest; subprocesses get it through PYTHONPATH)."""

from __future__ import annotations

import os
import time

import torch

from kdcache.models.zoo import SmallCNN, tiny_cnn


def fixed_cnn():
    """A factory without a num_classes parameter: always 7 classes."""
    return tiny_cnn(7)


def not_a_module(num_classes: int = 5):
    return "not a model"


class SlowCNN(SmallCNN):
    """tiny_cnn (same state-dict keys) whose forward pass also sleeps KD_TEST_DELAY seconds.

    KD_TEST_HOLD=FILE (with KD_TEST_HOLD_AT=N, default 1): the N-th forward pass creates FILE and then
    sleeps (at most 300 s), so a test can signal a run that is surely at work at a known point, on a
    machine of any speed."""

    calls = 0

    def forward(self, x):
        SlowCNN.calls += 1
        hold = os.environ.get("KD_TEST_HOLD")
        if hold and SlowCNN.calls == int(os.environ.get("KD_TEST_HOLD_AT", "1")):
            open(hold, "w").close()
            time.sleep(300)
        time.sleep(float(os.environ.get("KD_TEST_DELAY", "0")))
        return super().forward(x)


def slow_cnn(num_classes: int = 10) -> SlowCNN:
    return SlowCNN(num_classes, widths=(4, 8), blocks_per_stage=1)


class NonFiniteCNN(SmallCNN):
    """tiny_cnn (same state-dict keys) whose logit of class 0 is KD_TEST_NONFINITE ("nan", "inf" or
    "-inf"; default "nan") for every input that is one flat colour (each channel constant: a solid
    image's unmixed crop), and tiny_cnn's for every other input. A shard holding a solid image then
    makes the teacher's output non-finite there and nowhere else."""

    def forward(self, x):
        z = super().forward(x)
        flat = x.flatten(2).std(-1).amax(-1) < 1e-6
        bad = float(os.environ.get("KD_TEST_NONFINITE", "nan"))
        return torch.where(flat[:, None] & (torch.arange(z.shape[1], device=z.device) == 0), bad, z)


def nonfinite_cnn(num_classes: int = 10) -> NonFiniteCNN:
    return NonFiniteCNN(num_classes, widths=(4, 8), blocks_per_stage=1)
