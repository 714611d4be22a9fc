"""PASCAL VOC average precision, following the VOC devkit rules.

Per class, detections of all images are ranked by score.  A detection is
matched to the ground-truth box of its class it overlaps most (IoU); it is a
true positive if that IoU is at least ``iou_thresh`` and the box is not yet
taken, a false positive if the box is taken (a duplicate) or the IoU is too
low, and neither if the box is ``difficult``.  AP is the area under the
interpolated precision/recall curve (all points; the 11 recall points 0,
0.1, ..., 1 with ``use_07_metric``).  Classes without non-difficult ground
truth get AP NaN and are left out of the mean.

Matching is per image and independent of other images, so :meth:`update`
resolves it at once (vectorised over an image's detections) and only keeps
``(label, score, tp, ignored)`` per detection and the positive count per class.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torchvision.ops import box_iou

from detkit.evaluation.base import Evaluator


def match_image(
    boxes: Tensor, scores: Tensor, labels: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
    gt_difficult: Tensor, iou_thresh: float,
) -> tuple[Tensor, Tensor]:
    """VOC matching of one image's ``[D]`` detections against its ``[G]`` ground truth.

    Returns ``tp`` and ``ignored`` (bool ``[D]``, in the input order); a
    detection that is neither is a false positive.
    """
    d = boxes.shape[0]
    tp = torch.zeros(d, dtype=torch.bool)
    ignored = torch.zeros(d, dtype=torch.bool)
    if d == 0 or gt_boxes.shape[0] == 0:
        return tp, ignored
    # Higher score first; ties keep input order (stable), as matching is order dependent.
    order = torch.sort(scores, descending=True, stable=True).indices
    iou = box_iou(boxes[order].double(), gt_boxes.double())
    iou[labels[order][:, None] != gt_labels[None, :]] = -1.0  # only boxes of the same class compete
    # argmax + gather, not max(dim=1): the values-and-indices reduction is
    # pathologically slow on small tensors under OpenMP on a busy CPU.
    best_gt = iou.argmax(dim=1)
    best_iou = iou.gather(1, best_gt[:, None])[:, 0]
    hit = best_iou >= iou_thresh
    diff = gt_difficult[best_gt] & hit
    # Each gt box is a TP for the first (highest-scored) detection whose best match
    # it is; later detections whose best match is the same box are duplicates (FP),
    # even if they overlap another free box well (the devkit's rule).
    cand = hit & ~diff
    pos = torch.arange(d)
    first = torch.full((gt_boxes.shape[0],), d, dtype=torch.long)
    first.scatter_reduce_(0, best_gt[cand], pos[cand], reduce="amin")
    tp_sorted = cand & (first[best_gt] == pos)
    tp[order] = tp_sorted
    ignored[order] = diff
    return tp, ignored


def average_precision(recall: Tensor, precision: Tensor, use_07_metric: bool = False) -> float:
    """AP from ``[D]`` recall/precision in rank order (the devkit's two interpolations)."""
    if recall.numel() == 0:
        return 0.0
    recall, precision = recall.double(), precision.double()
    if use_07_metric:
        points = torch.linspace(0, 1, 11, dtype=torch.float64)
        reached = recall[None, :] >= points[:, None] - 1e-12  # [11, D]
        best = torch.where(reached, precision[None, :], torch.zeros((), dtype=torch.float64)).amax(dim=1)
        return float(best.mean())
    # Precision made monotonically decreasing (max over all later ranks), then
    # summed over the recall steps.
    interp = precision.flip(0).cummax(0).values.flip(0)
    prev = torch.cat((recall.new_zeros(1), recall[:-1]))
    return float(((recall - prev) * interp).sum())


class VOCEvaluator(Evaluator):
    """Accumulates predictions and targets, then computes per-class AP and mAP.

    ``update(predictions, targets)``: per image ``{"boxes" [K, 4], "scores" [K],
    "labels" [K]}`` and ``{"boxes" [G, 4], "labels" [G], "difficult" [G]}``
    (``difficult`` optional), boxes in the same pixel frame.  ``compute()``
    reports both interpolations: ``mAP_11pt`` (VOC2007's 11 recall points) and
    ``mAP_allpt`` (VOC2010 on, every recall step); ``mAP`` and ``per_class``
    follow ``use_07_metric``.
    """

    headline = "mAP"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        iou_thresh: float | None = Field(None, gt=0, le=1, description="IoU for a match; default eval.iou_thresh")
        use_07_metric: bool | None = Field(
            None, description="mAP and per-class AP by the 11-point rule; default eval.use_07_metric"
        )

    def __init__(
        self, params: "VOCEvaluator.Params", *, classes: Sequence[str], category_ids: Sequence[int] | None = None
    ):
        # The unset fields stand for the eval section's values, which build_evaluators fills in;
        # the evaluator does not guess them.
        unset = [k for k in ("iou_thresh", "use_07_metric") if getattr(params, k) is None]
        if unset:
            raise ValueError(f"VOCEvaluator: {', '.join(unset)} not given (from a config: eval.{unset[0]})")
        self.classes = list(classes)
        self.iou_thresh = float(params.iou_thresh)
        self.use_07_metric = bool(params.use_07_metric)
        self.reset()

    @property
    def per_class_metric(self) -> str:
        """``AP50 (VOC07 11-pt)`` or ``AP50 (all-pt)``: the IoU and the interpolation of the per-class APs."""
        return f"AP{self.iou_thresh * 100:g} ({'VOC07 11-pt' if self.use_07_metric else 'all-pt'})"

    def reset(self) -> None:
        self._labels: list[Tensor] = []
        self._scores: list[Tensor] = []
        self._tp: list[Tensor] = []
        self._ignored: list[Tensor] = []
        self._npos = torch.zeros(len(self.classes), dtype=torch.long)
        self.num_images = 0

    def update(self, predictions: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Any]]) -> None:
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
        c = len(self.classes)
        for pred, tgt in zip(predictions, targets):
            boxes = pred["boxes"].detach().float().cpu().reshape(-1, 4)
            scores = pred["scores"].detach().float().cpu().reshape(-1)
            labels = pred["labels"].detach().long().cpu().reshape(-1)
            gt_boxes = tgt["boxes"].detach().float().cpu().reshape(-1, 4)
            gt_labels = tgt["labels"].detach().long().cpu().reshape(-1)
            diff = tgt.get("difficult")
            gt_diff = (
                diff.detach().bool().cpu().reshape(-1) if diff is not None
                else torch.zeros(len(gt_labels), dtype=torch.bool)
            )
            for name, lab in (("predicted", labels), ("target", gt_labels)):
                if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= c):
                    raise ValueError(f"{name} label out of range 0..{c - 1}: {lab.tolist()}")
            tp, ignored = match_image(boxes, scores, labels, gt_boxes, gt_labels, gt_diff, self.iou_thresh)
            self._labels.append(labels)
            self._scores.append(scores)
            self._tp.append(tp)
            self._ignored.append(ignored)
            self._npos += torch.bincount(gt_labels[~gt_diff], minlength=c)
            self.num_images += 1

    def pr_curves(self) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """Per class with ground truth: ``(recall, precision, score)`` float64 ``[D]`` in rank order."""
        if self._labels:
            labels = torch.cat(self._labels)
            scores = torch.cat(self._scores)
            tp = torch.cat(self._tp)
            keep = ~torch.cat(self._ignored)
            labels, scores, tp = labels[keep], scores[keep], tp[keep]
        else:
            labels = torch.zeros(0, dtype=torch.long)
            scores = torch.zeros(0)
            tp = torch.zeros(0, dtype=torch.bool)
        # One global ranking: by class, then score descending (stable for ties).
        order = torch.sort(scores, descending=True, stable=True).indices
        order = order[torch.sort(labels[order], stable=True).indices]
        labels, scores, tp = labels[order], scores[order], tp[order]
        counts = torch.bincount(labels, minlength=len(self.classes)).tolist()
        curves: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        start = 0
        for k, name in enumerate(self.classes):
            seg = tp[start : start + counts[k]]
            seg_scores = scores[start : start + counts[k]]
            start += counts[k]
            npos = int(self._npos[k])
            if npos == 0:
                continue
            ctp = seg.double().cumsum(0)
            cfp = (~seg).double().cumsum(0)
            curves[name] = (ctp / npos, ctp / (ctp + cfp), seg_scores.double())
        return curves

    def compute(self) -> dict[str, Any]:
        """``{"mAP", "mAP_11pt", "mAP_allpt", "per_class": {class: AP}, "iou_thresh"}``.

        Classes without (non-difficult) ground truth get AP NaN and stay out of the means.
        """
        curves = self.pr_curves()
        both: dict[bool, dict[str, float]] = {}
        for use_07 in (True, False):
            both[use_07] = {
                name: (average_precision(curves[name][0], curves[name][1], use_07) if name in curves else math.nan)
                for name in self.classes
            }
        means = {use_07: _nanmean(aps.values()) for use_07, aps in both.items()}
        return {
            "mAP": means[self.use_07_metric],
            "mAP_11pt": means[True],
            "mAP_allpt": means[False],
            "per_class": both[self.use_07_metric],
            "iou_thresh": self.iou_thresh,
        }


def _nanmean(values: Any) -> float:
    valid = [v for v in values if not math.isnan(v)]
    return sum(valid) / len(valid) if valid else math.nan
