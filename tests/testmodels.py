"""Model factories for the tests, reachable as ``py:testmodels:NAME`` (tests/ is on sys.path under
pytest; subprocesses get it through PYTHONPATH)."""

from __future__ import annotations

import os
import time

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
