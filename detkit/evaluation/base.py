"""The contract of an ``evaluator`` plugin.

An evaluator is registered in the ``detkit.evaluator`` entry-point group like
any other component and named in a config under ``eval.metric``
(``voc``, ``coco``, ``[voc, coco]`` or ``{type: voc, use_07_metric: true}``).
It is built with its ``Params`` plus two run-time values:

- ``classes``: the foreground class names, label ``k`` is ``classes[k]``;
- ``category_ids``: the data set's own id of each class (COCO ids, which need
  not be contiguous), or ``None`` (then ``k + 1``).

Then, for every batch, ``update(predictions, targets)`` with one entry per
image: predictions ``{"boxes" float [K, 4] xyxy, "scores" [K], "labels" int64
[K] in 0..C-1}`` and targets ``{"boxes" [G, 4], "labels" [G], "difficult"
[G] (optional), "image_id" (optional)}``, both in the original image's pixels.
``compute()`` returns ``{metric name: float, ..., "per_class": {class: float}}``
(NaN where a metric is undefined); ``headline`` names the metric that stands
for the evaluator (``eval.best`` defaults to ``<type>/<headline>``), and
``per_class_metric`` what the per-class numbers are (the heading of their
column in the printed table and ``metrics.json``; default: the headline).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping, Sequence

from torch import Tensor


class Evaluator(ABC):
    """Accumulates per-image detections and ground truth, then computes metrics."""

    headline: ClassVar[str]

    @property
    def per_class_metric(self) -> str:
        """What ``compute()["per_class"]`` holds, e.g. ``"AP50 (VOC07 11-pt)"``; override when not the headline."""
        return self.headline

    @abstractmethod
    def reset(self) -> None:
        """Forget everything seen so far."""

    @abstractmethod
    def update(self, predictions: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Any]]) -> None:
        """Add one batch: per image a prediction and its target (see the module docstring)."""

    @abstractmethod
    def compute(self) -> dict[str, Any]:
        """``{metric: float, ..., "per_class": {class: float}}`` over everything added."""
