"""The Faster R-CNN losses: smooth L1 on box deltas, GIoU on decoded boxes, cross entropy on class logits.

All are computed in float32 (predictions made under autocast arrive in
float16/bfloat16) and never divide by zero: a batch without positives, or
without any non-ignored row, gives a loss of 0 rather than NaN.  Counts stay
tensors so nothing synchronises with the device.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from torchvision.ops import generalized_box_iou_loss

from detkit.interfaces import BoxLoss, ClassificationLoss, MatchedBoxes


class SmoothL1Loss(BoxLoss):
    """Smooth L1 over the rows whose label is positive, per positive row.

    ``forward(pred [M, 4], target [M, 4], labels [M]) -> scalar``:
    ``sum_{labels > 0} sum_4 f(pred - target) / max(#(labels > 0), 1)`` with
    ``f(x) = 0.5 (sigma x)^2`` if ``|x| < 1 / sigma^2`` else ``|x| - 0.5 / sigma^2``
    (the Fast R-CNN loss; ``sigma = 3`` is the usual RPN choice, 1 for the head).
    """


    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        sigma: float = Field(1.0, gt=0, description="transition point is 1 / sigma^2")

    def __init__(self, params: Params | None = None):
        super().__init__()
        self.sigma = (params if params is not None else self.Params()).sigma

    def forward(self, pred: Tensor, target: Tensor, labels: Tensor, boxes: MatchedBoxes | None = None) -> Tensor:
        sigma2 = self.sigma**2
        positive = labels > 0
        # Mask before the non-linearity (not after, not by a product): a
        # non-finite prediction on an ignored row must leak NaN into neither
        # the loss nor the gradient.
        diff = torch.where(positive[:, None], pred.float() - target.float(), 0.0).abs()
        per_coord = torch.where(diff < 1.0 / sigma2, 0.5 * sigma2 * diff**2, diff - 0.5 / sigma2)
        per_row = per_coord.sum(dim=-1)
        return per_row.sum() / positive.sum().clamp(min=1)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"


class GIoULoss(BoxLoss):
    """Generalized IoU loss (Rezatofighi et al., 2019) between predicted and matched boxes.

    ``forward(pred [M, 4], target [M, 4], labels [M], boxes: MatchedBoxes) -> scalar``:
    the predicted deltas are decoded on ``boxes.ref`` and compared with the
    matched ground truth ``boxes.gt``; ``1 - GIoU`` is summed over the rows
    with ``labels > 0`` and divided by their count (at least 1), like
    :class:`SmoothL1Loss`, times ``weight``.  ``target`` only serves through
    ``boxes``.  Scale-invariant, so its size differs from smooth L1's: a
    ``weight`` of a few (torchvision's GIoU heads use 1-2) keeps the balance.
    """


    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        weight: float = Field(1.0, gt=0, description="multiplies the loss")

    def __init__(self, params: Params | None = None):
        super().__init__()
        self.weight = (params if params is not None else self.Params()).weight

    def forward(self, pred: Tensor, target: Tensor, labels: Tensor, boxes: MatchedBoxes | None = None) -> Tensor:
        if boxes is None:
            raise ValueError("giou needs the matched boxes (boxes=MatchedBoxes(...)): a box loss on boxes, not deltas")
        positive = labels > 0
        # Mask the deltas before decoding (exp): an ignored row's non-finite
        # prediction must reach neither the loss nor the gradient.
        deltas = torch.where(positive[:, None], pred.float(), 0.0)
        predicted = boxes.decode(deltas)
        gt = torch.where(positive[:, None], boxes.gt.float(), predicted.detach())
        per_row = generalized_box_iou_loss(predicted, gt, reduction="none")
        per_row = torch.where(positive, per_row, 0.0)
        return self.weight * per_row.sum() / positive.sum().clamp(min=1)

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


class CrossEntropyLoss(ClassificationLoss):
    """Softmax cross entropy, averaged over the rows whose label is not ``ignore_index``.

    ``forward(logits [M, K], labels [M] int64) -> scalar``; 0 when every row is ignored.
    """


    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        ignore_index: int = Field(-1, description="label of rows that do not count")

    def __init__(self, params: Params | None = None):
        super().__init__()
        self.ignore_index = (params if params is not None else self.Params()).ignore_index

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        total = F.cross_entropy(
            logits.float(), labels, ignore_index=self.ignore_index, reduction="sum"
        )
        # F.cross_entropy's "mean" is NaN when every row is ignored.
        return total / (labels != self.ignore_index).sum().clamp(min=1)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}"
