"""Anchor boxes: a set of base shapes repeated over the feature grid.

The default layout reproduces the faster-rcnn-pytorch order exactly, because
the RPN's ``score``/``loc`` channels of an imported checkpoint are tied to it:

* base anchors: ratios in the outer loop, scales in the inner loop;
  ``h = base_size * s * sqrt(r)``, ``w = base_size * s * sqrt(1 / r)``, written
  ``[-h/2, -w/2, h/2, w/2]`` and read as ``(x1, y1, x2, y2)`` (so ``h`` lies on
  the x axis; the set of shapes is the same, the order is not);
* shifted to ``((x + offset) * stride, (y + offset) * stride)`` for every
  feature cell, y outer and x inner (row-major), the anchors of one cell
  contiguous.  ``offset = 0`` is the reference layout, ``0.5`` centres them.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn


class AnchorParams(BaseModel):
    """Configuration of :class:`AnchorGenerator` (the RPN's ``anchor`` section)."""

    model_config = ConfigDict(extra="forbid")

    ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0], min_length=1)
    scales: list[float] = Field(default_factory=lambda: [8.0, 16.0, 32.0], min_length=1)
    base_size: float = Field(16.0, gt=0)
    offset: float = Field(0.0, ge=0.0, le=1.0)


def base_anchors(
    ratios: Sequence[float], scales: Sequence[float], base_size: float = 16.0
) -> Tensor:
    """``[len(ratios) * len(scales), 4]`` anchors centred on 0, in the reference order."""
    out = []
    for r in ratios:
        for s in scales:
            h = base_size * s * math.sqrt(r)
            w = base_size * s * math.sqrt(1.0 / r)
            out.append([-h / 2.0, -w / 2.0, h / 2.0, w / 2.0])
    return torch.tensor(out, dtype=torch.float32)


class AnchorGenerator(nn.Module):
    """Anchors of a feature map: ``(feat_h, feat_w) -> [feat_h * feat_w * K, 4]``.

    ``K = len(ratios) * len(scales)`` per cell.  Results are cached per
    (feature size, device) since every batch of one size reuses them.
    """

    def __init__(
        self,
        stride: int,
        ratios: Sequence[float] = (0.5, 1.0, 2.0),
        scales: Sequence[float] = (8.0, 16.0, 32.0),
        base_size: float = 16.0,
        offset: float = 0.0,
    ):
        super().__init__()
        self.stride = stride
        self.offset = offset
        # Kept as a plain attribute, not a buffer: it is derived from the config
        # and must not appear in (or be required by) checkpoints.
        self.base = base_anchors(ratios, scales, base_size)
        self._cache: dict[tuple[int, int, torch.device], Tensor] = {}

    @property
    def num_per_cell(self) -> int:
        return self.base.shape[0]

    def forward(self, feat_h: int, feat_w: int, device: torch.device | str = "cpu") -> Tensor:
        device = torch.device(device)
        key = (int(feat_h), int(feat_w), device)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        ys = (torch.arange(feat_h, dtype=torch.float32, device=device) + self.offset) * self.stride
        xs = (torch.arange(feat_w, dtype=torch.float32, device=device) + self.offset) * self.stride
        sy, sx = torch.meshgrid(ys, xs, indexing="ij")  # y outer, x inner
        shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)
        anchors = (shifts + self.base.to(device).unsqueeze(0)).reshape(-1, 4)
        if len(self._cache) > 64:  # many input sizes (multi-scale training): stay bounded
            self._cache.clear()
        self._cache[key] = anchors
        return anchors
