"""Small CNNs for the demo and the tests, reachable as ``py:kdcache.models.zoo:NAME`` specs.

Real models for small images (digits, thumbnails); nothing here is downloaded.
"""

from __future__ import annotations

from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stages with stride-2 pooling, global average pool, linear head."""

    def __init__(self, num_classes: int = 10, widths=(32, 64, 128), blocks_per_stage: int = 2):
        super().__init__()
        layers, cin = [], 3
        for i, w in enumerate(widths):
            for b in range(blocks_per_stage):
                layers.append(_block(cin, w))
                cin = w
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)
        self.num_classes = num_classes

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))

    def stage_names(self) -> list[str]:
        """The modules that end each stage (the last conv block before each pool, and the last
        block), as named in ``named_modules``: where ``kdcache.models.exits`` puts its exits."""
        f = self.features
        return [f"features.{i}" for i in range(len(f))
                if not isinstance(f[i], nn.MaxPool2d) and (i + 1 == len(f) or isinstance(f[i + 1], nn.MaxPool2d))]


def teacher_cnn(num_classes: int = 10) -> SmallCNN:
    """The demo's teacher (~0.6 M parameters)."""
    return SmallCNN(num_classes, widths=(32, 64, 128), blocks_per_stage=2)


def student_cnn(num_classes: int = 10) -> SmallCNN:
    """The demo's student (~25 k parameters)."""
    return SmallCNN(num_classes, widths=(8, 16, 32), blocks_per_stage=1)


def tiny_cnn(num_classes: int = 10) -> SmallCNN:
    """A very small model for tests."""
    return SmallCNN(num_classes, widths=(4, 8), blocks_per_stage=1)
