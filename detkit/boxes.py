"""Box coding between corner boxes and centre-form deltas.

Deltas ``(dx, dy, dw, dh)`` relate a box to a reference box (an anchor or a
RoI): ``dx = (cx - cx_ref) / w_ref``, ``dw = log(w / w_ref)``.  ``std``
divides encoded deltas and multiplies decoded ones (the RoI head's
``loc_normalize_std``).  All functions work on any leading shape, on the
tensors' device, without host synchronisation.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

__all__ = ["encode", "decode", "clip", "box_iou", "as_std"]

# exp() of larger deltas overflows float16/32 box sizes; torchvision uses the same bound.
_MAX_LOG_SCALE = math.log(1000.0 / 16)


def as_std(std: Sequence[float] | Tensor | None, like: Tensor) -> Tensor | None:
    if std is None:
        return None
    return torch.as_tensor(std, dtype=like.dtype, device=like.device)


def encode(ref: Tensor, boxes: Tensor, std: Sequence[float] | Tensor | None = None) -> Tensor:
    """Deltas that move ``ref`` ``[..., 4]`` onto ``boxes`` ``[..., 4]``."""
    w = ref[..., 2] - ref[..., 0]
    h = ref[..., 3] - ref[..., 1]
    cx = ref[..., 0] + 0.5 * w
    cy = ref[..., 1] + 0.5 * h
    eps = torch.finfo(ref.dtype).eps
    w = w.clamp(min=eps)
    h = h.clamp(min=eps)
    bw = boxes[..., 2] - boxes[..., 0]
    bh = boxes[..., 3] - boxes[..., 1]
    bcx = boxes[..., 0] + 0.5 * bw
    bcy = boxes[..., 1] + 0.5 * bh
    deltas = torch.stack(
        (
            (bcx - cx) / w,
            (bcy - cy) / h,
            torch.log(bw.clamp(min=eps) / w),
            torch.log(bh.clamp(min=eps) / h),
        ),
        dim=-1,
    )
    s = as_std(std, deltas)
    return deltas if s is None else deltas / s


def decode(ref: Tensor, deltas: Tensor, std: Sequence[float] | Tensor | None = None) -> Tensor:
    """Boxes obtained by applying ``deltas`` ``[..., 4]`` to ``ref`` (broadcastable)."""
    s = as_std(std, deltas)
    if s is not None:
        deltas = deltas * s
    ref = ref.to(deltas.dtype)
    w = ref[..., 2] - ref[..., 0]
    h = ref[..., 3] - ref[..., 1]
    cx = ref[..., 0] + 0.5 * w
    cy = ref[..., 1] + 0.5 * h
    dx, dy, dw, dh = deltas.unbind(-1)
    dw = dw.clamp(max=_MAX_LOG_SCALE)
    dh = dh.clamp(max=_MAX_LOG_SCALE)
    pcx = dx * w + cx
    pcy = dy * h + cy
    pw = torch.exp(dw) * w
    ph = torch.exp(dh) * h
    return torch.stack((pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph), dim=-1)


def clip(boxes: Tensor, height: Tensor | float, width: Tensor | float) -> Tensor:
    """Clip ``[..., 4]`` boxes to ``[0, width] x [0, height]`` (tensors broadcast per box)."""
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    w = torch.as_tensor(width, dtype=boxes.dtype, device=boxes.device)
    h = torch.as_tensor(height, dtype=boxes.dtype, device=boxes.device)
    x1 = torch.minimum(torch.maximum(boxes[..., 0], zero), w)
    y1 = torch.minimum(torch.maximum(boxes[..., 1], zero), h)
    x2 = torch.minimum(torch.maximum(boxes[..., 2], zero), w)
    y2 = torch.minimum(torch.maximum(boxes[..., 3], zero), h)
    return torch.stack((x1, y1, x2, y2), dim=-1)
