"""Small tensor operations shared by the built-in components."""

from __future__ import annotations

import torch
from torch import Tensor


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
