"""Small tensor operations shared by the built-in components."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms


def group_and_cap(
    keep: Tensor, groups: Tensor, num_groups: int, cap: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Order NMS survivors by group and keep at most ``cap`` of each.

    ``keep``: indices into ``groups``, best first (as ``batched_nms`` returns
    them).  Returns ``(keep, kept_groups, counts)``: the indices with each
    group's contiguous, in group order and still best first within a group,
    their groups, and ``[num_groups]`` counts after the cap.  No host sync.
    """
    kept_groups = groups[keep]
    # A stable sort by group, written as a sort of unique (group, position) keys:
    # ONNX has no stable sort, and any sort of unique keys is stable.
    n = keep.shape[0]
    position = torch.arange(n, device=keep.device)
    order = torch.argsort(kept_groups * n + position)
    keep, kept_groups = keep[order], kept_groups[order]
    # index_add, not bincount: bincount on CUDA reads max() back to the host.
    counts = torch.zeros(num_groups, dtype=torch.int64, device=keep.device)
    counts.index_add_(0, kept_groups, torch.ones_like(kept_groups))
    if cap is not None:
        starts = torch.cumsum(counts, 0) - counts
        rank = position - starts[kept_groups]
        within = rank < cap
        keep, kept_groups = keep[within], kept_groups[within]
        counts = counts.clamp(max=cap)
    return keep, kept_groups, counts


def nms_per_image(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """``batched_nms`` over ``[N, K]`` rows (one image per row), one call per image.

    ``boxes [N, K, 4]``, ``scores [N, K]``, ``groups [N, K]`` (NMS runs within
    a group).  Returns indices into the flattened ``N * K`` boxes, image by
    image, best first within each.  The same boxes survive as with one
    ``batched_nms`` over all rows, but far faster on CUDA: torchvision's
    kernel builds an overlap mask over every pair of the boxes it is given and
    then walks it serially, so one call over N images does N times the work
    of N calls (figures in benchmarks/README.md).
    """
    n, k = scores.shape
    if n == 1:
        return batched_nms(boxes[0], scores[0], groups[0], iou_threshold)
    return torch.cat([batched_nms(boxes[i], scores[i], groups[i], iou_threshold) + i * k for i in range(n)])


def nms_first(boxes: Tensor, scores: Tensor, iou_threshold: float, need: int) -> Tensor:
    """NMS of ``boxes [K, 4]`` sorted best first, stopping once ``need`` of them survive.

    Greedy NMS decides each box from the better boxes only, so the survivors
    among the first ``m`` boxes are exactly the full run's survivors among
    them; once at least ``need`` survive, they hold the full run's ``need``
    best (up to the order of equal scores, which NMS never fixes).  Runs on
    the first ``2 * need`` boxes, then 4x more each time until enough survive
    or all are in: torchvision's kernel costs the square of its input, so
    when proposals overlap little (random weights, early training) the
    12000 x 12000 mask of a training step shrinks to 1200 x 1200, and when
    they overlap a lot the extra passes add at most ~10 %.  Returns indices
    into ``boxes``, best first (all survivors of the last pass; the caller
    caps them).
    """
    k = boxes.shape[0]
    m = min(k, max(2 * need, 64))
    while True:
        keep = nms(boxes[:m], scores[:m], iou_threshold)
        if m == k or keep.shape[0] >= need:
            return keep
        m = min(k, 4 * m)
