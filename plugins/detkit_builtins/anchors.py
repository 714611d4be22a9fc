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

Multi-level anchors (``sizes``, one list per feature level: the FPN paper's
one size per level) follow torchvision's layout instead, since its RPN weights
are tied to that: ratios outer, sizes inner, ``w = size / sqrt(r)`` on the x
axis and ``h = size * sqrt(r)`` on the y axis (ratio = height / width),
corners rounded to integers; shifted by each level's stride, the same
row-major cell order, levels concatenated finest first.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn


class AnchorParams(BaseModel):
    """Configuration of the anchors (the RPN's ``anchor`` section)."""

    model_config = ConfigDict(extra="forbid")

    ratios: list[float] = Field(default_factory=lambda: [0.5, 1.0, 2.0], min_length=1)
    scales: list[float] = Field(
        default_factory=lambda: [8.0, 16.0, 32.0], min_length=1,
        description="single map: anchor sizes as multiples of base_size",
    )
    base_size: float = Field(16.0, gt=0)
    sizes: list[list[float]] | None = Field(
        None,
        description="multi-level features: anchor sizes in pixels, one list per level, finest first "
        "(FPN: [[32], [64], [128], [256], [512]]); replaces scales and base_size",
    )
    offset: float = Field(0.0, ge=0.0, le=1.0)
    level_stride: Literal["nominal", "input_ratio"] = Field(
        "nominal",
        description="multi-level: shift anchors by each level's nominal stride, or by input size // "
        "feature size per axis (torchvision's rule; differs only on levels coarser than the padding)",
    )

    @model_validator(mode="after")
    def _sizes(self) -> "AnchorParams":
        if self.sizes is not None:
            if not self.sizes or any(not level or any(v <= 0 for v in level) for level in self.sizes):
                raise ValueError("sizes: give one non-empty list of positive sizes per level")
            if len({len(level) for level in self.sizes}) != 1:
                raise ValueError("sizes: every level needs the same number of sizes (one RPN head serves all)")
        return self

    @property
    def num_per_cell(self) -> int:
        per_level = len(self.sizes[0]) if self.sizes is not None else len(self.scales)
        return len(self.ratios) * per_level


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


def level_base_anchors(sizes: Sequence[float], ratios: Sequence[float]) -> Tensor:
    """``[len(ratios) * len(sizes), 4]`` anchors of one level centred on 0 (torchvision's layout).

    Computed in float32 as torchvision does, so the rounded corners agree.
    """
    size = torch.as_tensor(list(sizes), dtype=torch.float32)
    ratio = torch.as_tensor(list(ratios), dtype=torch.float32)
    h_ratio = torch.sqrt(ratio)
    w_ratio = 1 / h_ratio
    ws = (w_ratio[:, None] * size[None, :]).reshape(-1)
    hs = (h_ratio[:, None] * size[None, :]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def _grid(base: Tensor, feat_h: int, feat_w: int, stride_h: float, stride_w: float, offset: float,
          device: torch.device) -> Tensor:
    """``base`` shifted to every cell, y outer, x inner, the anchors of one cell contiguous."""
    ys = (torch.arange(feat_h, dtype=torch.float32, device=device) + offset) * stride_h
    xs = (torch.arange(feat_w, dtype=torch.float32, device=device) + offset) * stride_w
    sy, sx = torch.meshgrid(ys, xs, indexing="ij")  # y outer, x inner
    shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)
    return (shifts + base.to(device).unsqueeze(0)).reshape(-1, 4)


class AnchorGenerator(nn.Module):
    """Anchors of one feature map: ``(feat_h, feat_w) -> [feat_h * feat_w * K, 4]``.

    ``K = len(ratios) * len(scales)`` per cell.  Results are cached per
    (feature size, device) since every batch of one size reuses them.
    """

    def __init__(self, stride: int, params: AnchorParams | None = None):
        super().__init__()
        p = self.params = params if params is not None else AnchorParams()
        self.stride = stride
        self.offset = p.offset
        # Kept as a plain attribute, not a buffer: it is derived from the config
        # and must not appear in (or be required by) checkpoints.
        self.base = base_anchors(p.ratios, p.scales, p.base_size)
        self._cache: dict[tuple[int, int, torch.device], Tensor] = {}

    @property
    def num_per_cell(self) -> int:
        return self.base.shape[0]

    def forward(self, feat_h: int, feat_w: int, device: torch.device | str = "cpu") -> Tensor:
        device = torch.device(device)
        if torch.jit.is_tracing():  # export: the sizes are traced values, the graph computes the grid
            return _grid(self.base, feat_h, feat_w, self.stride, self.stride, self.offset, device)
        key = (int(feat_h), int(feat_w), device)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        anchors = _grid(self.base, key[0], key[1], self.stride, self.stride, self.offset, device)
        if len(self._cache) > 64:  # many input sizes (multi-scale training): stay bounded
            self._cache.clear()
        self._cache[key] = anchors
        return anchors


class MultiLevelAnchorGenerator(nn.Module):
    """Anchors of several feature levels, one base set per level (``sizes[l]`` x ``ratios``).

    ``forward(feature_sizes [(h, w) per level], input_size (H, W), device)``
    returns a list of ``[h_l * w_l * K, 4]`` per level (cached per shape and
    device).  ``strides`` are the levels' nominal strides.
    """

    def __init__(self, strides: Sequence[int], params: AnchorParams):
        super().__init__()
        p = self.params = params
        if p.sizes is None:
            raise ValueError("multi-level anchors need anchor.sizes (one list per level)")
        if len(p.sizes) != len(strides):
            raise ValueError(
                f"anchor.sizes has {len(p.sizes)} levels but the features have {len(strides)} "
                f"(strides {list(strides)})"
            )
        self.strides = [int(s) for s in strides]
        self.offset = p.offset
        self.level_stride = p.level_stride
        self.bases = [level_base_anchors(s, p.ratios) for s in p.sizes]
        self._cache: dict[tuple, list[Tensor]] = {}

    @property
    def num_per_cell(self) -> int:
        return self.bases[0].shape[0]

    def forward(
        self,
        feature_sizes: Sequence[tuple[int, int]],
        input_size: tuple[int, int],
        device: torch.device | str = "cpu",
    ) -> list[Tensor]:
        device = torch.device(device)
        if torch.jit.is_tracing():  # export: the sizes are traced values, the graph computes the grids
            return self._grids(feature_sizes, input_size, device)
        sizes = tuple((int(h), int(w)) for h, w in feature_sizes)
        key = (sizes, (int(input_size[0]), int(input_size[1])), device)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        out = self._grids(sizes, key[1], device)
        if len(self._cache) > 64:
            self._cache.clear()
        self._cache[key] = out
        return out

    def _grids(self, sizes: Sequence[tuple[Any, Any]], input_size: tuple[Any, Any], device: torch.device) -> list[Tensor]:
        out = []
        for base, stride, (fh, fw) in zip(self.bases, self.strides, sizes):
            if self.level_stride == "input_ratio":
                sh, sw = input_size[0] // fh, input_size[1] // fw
            else:
                sh = sw = stride
            out.append(_grid(base, fh, fw, sh, sw, self.offset, device))
        return out
