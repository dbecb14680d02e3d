"""Building a run's student: the model from its spec, with exits when it self-distils. One builder for
the trainer (a new run) and ``evaluate`` (a finished one, from its config.json)."""

from __future__ import annotations

from ..errors import KdcacheError
from ..models.exits import MultiExit
from ..models.factory import ModelInfo, create_model


def build_student(spec: str, num_classes: int, res: int, weights: str | None = None,
                  classes_from: str | None = None, exits=None) -> tuple[ModelInfo, object]:
    """``(info, model)``: the student of ``spec`` with ``num_classes`` outputs at ``res`` px, its
    weights loaded from ``weights`` if given. ``exits`` (``"all"`` or stage numbers) wraps it in a
    ``MultiExit`` whose deepest exit is the model's own head; ``None`` leaves it plain. Errors name
    the student (``student: ...``)."""
    try:
        info = create_model(spec, num_classes=num_classes, weights=weights, resolution=res, classes_from=classes_from)
        model = info.model
        if exits is not None:
            model = MultiExit(model, exits, resolution=res, num_classes=num_classes)
    except KdcacheError as e:
        raise KdcacheError(f"student: {e}") from None
    return info, model
