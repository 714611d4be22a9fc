"""A detection confusion matrix with a background row and column.

Rows are the true class, columns the predicted class; index ``C`` is the
background.  Per image, detections scoring at least ``score_thresh`` are
matched one-to-one to ground-truth boxes of any class with IoU at least
``iou_thresh``, highest IoU first.  A matched pair counts at ``[true, predicted]``
(the diagonal when the classes agree), an unmatched ground-truth box at
``[true, background]`` (missed) and an unmatched detection at ``[background,
predicted]`` (a false alarm).  A detection whose match is a ``difficult`` box
is not counted, and neither are difficult boxes.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou


def match_pairs(iou: Tensor, iou_thresh: float) -> tuple[Tensor, Tensor]:
    """One-to-one ``(det, gt)`` index pairs from a ``[D, G]`` IoU matrix, highest IoU first."""
    det, gt = torch.nonzero(iou >= iou_thresh, as_tuple=True)
    if det.numel() == 0:
        return det, gt
    order = torch.sort(iou[det, gt], descending=True, stable=True).indices
    det, gt = det[order], gt[order]
    # Walk the pairs by falling IoU, taking one whose detection and box are both
    # still free.  Pairs are few (those above the threshold), so the loop is short.
    used_d: set[int] = set()
    used_g: set[int] = set()
    keep = []
    for i, (d, g) in enumerate(zip(det.tolist(), gt.tolist())):
        if d not in used_d and g not in used_g:
            used_d.add(d)
            used_g.add(g)
            keep.append(i)
    idx = torch.tensor(keep, dtype=torch.long)
    return det[idx], gt[idx]


def confusion_matrix(
    predictions: Sequence[Mapping[str, Tensor]],
    targets: Sequence[Mapping[str, Any]],
    num_classes: int,
    iou_thresh: float = 0.5,
    score_thresh: float = 0.0,
) -> Tensor:
    """int64 ``[C + 1, C + 1]`` counts over all images (see the module docstring)."""
    c = num_classes
    matrix = torch.zeros(c + 1, c + 1, dtype=torch.long)
    for pred, tgt in zip(predictions, targets):
        keep = pred["scores"].detach().cpu().reshape(-1) >= score_thresh
        boxes = pred["boxes"].detach().float().cpu().reshape(-1, 4)[keep]
        labels = pred["labels"].detach().long().cpu().reshape(-1)[keep]
        gt_boxes = tgt["boxes"].detach().float().cpu().reshape(-1, 4)
        gt_labels = tgt["labels"].detach().long().cpu().reshape(-1)
        diff = tgt.get("difficult")
        gt_diff = diff.detach().bool().cpu().reshape(-1) if diff is not None else torch.zeros_like(gt_labels, dtype=torch.bool)
        det_idx, gt_idx = match_pairs(box_iou(boxes, gt_boxes), iou_thresh)
        counted = ~gt_diff[gt_idx]
        pairs = gt_labels[gt_idx[counted]] * (c + 1) + labels[det_idx[counted]]
        matrix += torch.bincount(pairs, minlength=(c + 1) ** 2).reshape(c + 1, c + 1)
        det_free = torch.ones(len(labels), dtype=torch.bool)
        det_free[det_idx] = False
        gt_free = ~gt_diff
        gt_free[gt_idx] = False
        matrix[c, :c] += torch.bincount(labels[det_free], minlength=c)
        matrix[:c, c] += torch.bincount(gt_labels[gt_free], minlength=c)
    return matrix
