"""RoI poolers (kind ``pooler``): the part of a RoI head that cuts each RoI out of the features.

* ``roi_pool`` / ``roi_align`` pool one feature map (the C4 design).  RoIs (in
  input pixels) are mapped to the map by ``mapping: feature_ratio`` (x by
  ``feat_w / input_w``, y by ``feat_h / input_h``, then ``spatial_scale=1``:
  the faster-rcnn-pytorch way) or ``stride`` (``spatial_scale=1/stride``).
* ``multiscale_roi_align`` pools each RoI from the pyramid level that fits its
  size (FPN Eq. 1, as ``torchvision.ops.MultiScaleRoIAlign``).

Pooling runs in float32: RoI coordinates in fp16/bf16 lose up to pixels and
move roi_pool's rounded bins, torchvision's ops need features and boxes of one
dtype and have no bfloat16 CPU kernels.  The result is cast back.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torchvision.ops import roi_align, roi_pool

from detkit.errors import ConfigError
from detkit.interfaces import Features, Pooler, ShapeSpec, is_multi_level


def _with_indices(boxes: Tensor, image_indices: Tensor) -> Tensor:
    """``[R, 5]`` (image index, x1, y1, x2, y2) in float32, the layout torchvision's ops take."""
    boxes = boxes.float()
    return torch.cat((image_indices.to(boxes.dtype).unsqueeze(1), boxes), dim=1)


class _SingleMapPooler(Pooler):
    """Shared by roi_pool and roi_align: one map, feature-ratio or stride mapping."""

    def __init__(self, params: BaseModel, *, input_shapes: dict[str, ShapeSpec], required_size: int | None = None):
        super().__init__()
        self.params = params
        name = type(self).__name__
        if len(input_shapes) != 1:
            raise ConfigError(
                f"model.roi_head.pooler: {name} pools one feature map, but the features have levels "
                f"{', '.join(input_shapes)}; use type multiscale_roi_align"
            )
        (shape,) = input_shapes.values()
        size = params.output_size or required_size
        if size is None:
            raise ConfigError(f"model.roi_head.pooler.output_size: {name} needs one (no backbone RoI tail sets it)")
        if required_size is not None and size != required_size:
            raise ConfigError(
                f"model.roi_head.pooler.output_size: {size}, but the box head takes {required_size} x "
                f"{required_size} RoIs"
            )
        self.output_size, self.out_channels, self.stride = int(size), shape.channels, shape.stride

    def _map(self, features: Tensor, boxes: Tensor, input_size: tuple[int, int]) -> tuple[Tensor, float]:
        if self.params.mapping == "stride":
            return boxes, 1.0 / self.stride
        fh, fw = features.shape[-2:]
        h, w = input_size
        # Divide then multiply, in this order, as the reference does: RoIPool rounds the mapped
        # coordinates, so another rounding of x / w * fw could move a bin.
        xs = boxes[:, 0::2] / w * fw
        ys = boxes[:, 1::2] / h * fh
        return torch.stack((xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]), dim=1), 1.0

    def forward(self, features: Features, boxes: Tensor, image_indices: Tensor, input_size: tuple[int, int]) -> Tensor:
        if is_multi_level(features):
            raise ValueError(f"{type(self).__name__} takes one feature map; use multiscale_roi_align for levels")
        out_dtype = features.dtype
        mapped, spatial_scale = self._map(features, boxes.float(), input_size)
        pooled = self._pool(features.float(), _with_indices(mapped, image_indices), spatial_scale)
        return pooled.to(out_dtype)


class RoIPool(_SingleMapPooler):
    """Max pooling over ``output_size x output_size`` rounded bins (Fast R-CNN)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        output_size: int | None = Field(None, gt=0, description="bins per side; null: what the box head takes")
        mapping: Literal["feature_ratio", "stride"] = "feature_ratio"

    def _pool(self, features: Tensor, boxes: Tensor, spatial_scale: float) -> Tensor:
        return roi_pool(features, boxes, self.output_size, spatial_scale)


class RoIAlign(_SingleMapPooler):
    """Bilinear sampling of ``output_size x output_size`` bins (Mask R-CNN's RoIAlign)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        output_size: int | None = Field(None, gt=0, description="bins per side; null: what the box head takes")
        mapping: Literal["feature_ratio", "stride"] = "feature_ratio"
        sampling_ratio: int = Field(2, ge=0, description="samples per bin side (0 = adaptive)")
        aligned: bool = Field(False, description="half-pixel offset")

    def _pool(self, features: Tensor, boxes: Tensor, spatial_scale: float) -> Tensor:
        p = self.params
        return roi_align(features, boxes, self.output_size, spatial_scale, p.sampling_ratio, p.aligned)


class MultiScaleRoIAlign(Pooler):
    """RoIAlign from the level ``k = floor(canonical_level + log2(sqrt(w*h) / canonical_scale) + 1e-6)``.

    ``k`` is clamped to the levels in ``in_features`` (FPN Eq. 1, torchvision's
    ``MultiScaleRoIAlign``).  Splitting RoIs by level reads the per-level
    counts back to the host once per level, as torchvision does.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        in_features: list[str] = Field(
            default_factory=lambda: ["P2", "P3", "P4", "P5"], min_length=1,
            description="pyramid levels to pool from, finest first",
        )
        output_size: int = Field(7, gt=0, description="bins per side")
        sampling_ratio: int = Field(2, ge=0, description="samples per bin side (0 = adaptive)")
        aligned: bool = Field(False, description="half-pixel offset (torchvision's detection models: false)")
        canonical_scale: float = Field(224.0, gt=0)
        canonical_level: int = Field(4, ge=0)

    def __init__(self, params: Params, *, input_shapes: dict[str, ShapeSpec], required_size: int | None = None):
        super().__init__()
        p = self.params = params
        if len(input_shapes) < 2 and not set(p.in_features) <= set(input_shapes):
            raise ConfigError(
                "model.roi_head.pooler: multiscale_roi_align needs multi-level features "
                "(a backbone with out_features and a neck such as fpn); for one map use roi_align"
            )
        missing = [n for n in p.in_features if n not in input_shapes]
        if missing:
            raise ConfigError(
                f"model.roi_head.pooler.in_features: {', '.join(missing)} not among the features "
                f"({', '.join(input_shapes)})"
            )
        if required_size is not None and required_size != p.output_size:
            raise ConfigError(
                f"model.roi_head.pooler.output_size: {p.output_size}, but the box head takes "
                f"{required_size} x {required_size} RoIs"
            )
        shapes = [input_shapes[n] for n in p.in_features]
        if len({s.channels for s in shapes}) != 1:
            raise ConfigError("model.roi_head.pooler.in_features: the pooled levels must have equal channels")
        levels = [math.log2(s.stride) for s in shapes]
        if any(l != round(l) for l in levels) or levels != sorted(levels):
            raise ConfigError("model.roi_head.pooler.in_features: strides must be powers of 2, finest first")
        self.in_features = list(p.in_features)
        self.scales = [1.0 / s.stride for s in shapes]
        self.k_min, self.k_max = int(levels[0]), int(levels[-1])
        self.output_size, self.out_channels = p.output_size, shapes[0].channels

    def levels(self, boxes: Tensor) -> Tensor:
        """``[R]`` int64 index into ``in_features`` of the level each RoI is pooled from."""
        p = self.params
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        k = torch.floor(p.canonical_level + torch.log2(torch.sqrt(area) / p.canonical_scale) + 1e-6)
        return k.clamp(self.k_min, self.k_max).to(torch.int64) - self.k_min

    def forward(self, features: Features, boxes: Tensor, image_indices: Tensor, input_size: tuple[int, int]) -> Tensor:
        if not is_multi_level(features):
            raise ValueError("multiscale_roi_align takes a dict of pyramid levels")
        p = self.params
        maps = [features[n] for n in self.in_features]
        out_dtype = maps[0].dtype
        rois = _with_indices(boxes, image_indices)
        if len(maps) == 1:
            return roi_align(maps[0].float(), rois, p.output_size, self.scales[0], p.sampling_ratio,
                             p.aligned).to(out_dtype)
        levels = self.levels(rois[:, 1:])
        out = rois.new_zeros((rois.shape[0], maps[0].shape[1], p.output_size, p.output_size))
        for level, (fmap, scale) in enumerate(zip(maps, self.scales)):
            idx = torch.nonzero(levels == level).squeeze(1)
            pooled = roi_align(fmap.float(), rois[idx], p.output_size, scale, p.sampling_ratio, p.aligned)
            # index_put_, not out[idx] = ...: traced, the latter strips a leading 1 of the pooled
            # shape as a fixed view, which fails when the level gets another number of RoIs.
            out.index_put_((idx,), pooled)
        return out.to(out_dtype)
