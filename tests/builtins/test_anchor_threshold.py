"""The RPN's anchor labelling: an anchor whose IoU equals pos_iou_thresh is positive (>=, not >)."""

from __future__ import annotations

import torch
from torchvision.ops import box_iou

from detkit.registry import registry

GT = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
# Exactly the gt (IoU 1: the gt's best anchor), IoU 70 / 100 = 0.7, and one far away (IoU 0).
ANCHORS = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 7.0], [30.0, 30.0, 40.0, 40.0]])


def anchor_labels(creator, gt_boxes, anchors, image_sizes):
    """The creator's labels [N, A]; the one place that knows its call signature."""
    _, labels = creator(gt_boxes, anchors, image_sizes, generator=torch.Generator().manual_seed(0))
    return labels


def test_an_anchor_at_exactly_the_positive_threshold_is_positive():
    creator = registry("target_creator").build(
        {"type": "anchor_target", "pos_iou_thresh": 0.7, "neg_iou_thresh": 0.3, "n_sample": 256}
    )
    # The premise: in float32 the middle anchor's IoU is the threshold itself, not a hair above it.
    iou = box_iou(GT, ANCHORS)[0]
    assert iou[1] == torch.tensor(0.7, dtype=torch.float32) and iou[0] == 1 and iou[2] == 0
    labels = anchor_labels(creator, [GT], ANCHORS, torch.tensor([[48, 48]]))
    # The middle anchor is not the gt's best anchor (the first one is), so only the threshold
    # makes it positive; with `>` it would fall between the thresholds and be ignored (-1).
    assert labels.tolist() == [[1, 1, 0]]
