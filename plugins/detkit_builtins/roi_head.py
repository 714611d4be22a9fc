"""RoI heads: pool each RoI, run a box head, classify and refine.

* :class:`RoIHead` pools one feature map and runs the backbone's tail on it
  (the C4 design of the original Faster R-CNN).
* :class:`MultiScaleRoIHead` pools each RoI from the pyramid level that fits
  its size (FPN, Eq. 1, as ``torchvision.ops.MultiScaleRoIAlign``) and runs
  two fully connected layers (``TwoMLPHead``) on it.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import roi_align, roi_pool

from detkit.errors import ConfigError
from detkit.interfaces import Features, RoITail, ShapeSpec, is_multi_level
from detkit.interfaces import RoIHead as RoIHeadBase


CLS_PRIOR_DESCRIPTION = (
    "initial foreground probability of the classifier (bias of the background logit log(1-p), of "
    "each class log(p/C)), which steadies the first steps from scratch; null: zero bias"
)


def _init_predictors(cls_loc: nn.Linear, score: nn.Linear, cls_prior: float | None = None) -> None:
    """The reference initialisation: classifier normal(0, 0.01), box regression normal(0, 0.001)."""
    nn.init.normal_(cls_loc.weight, std=0.001)
    nn.init.normal_(score.weight, std=0.01)
    nn.init.zeros_(cls_loc.bias)
    nn.init.zeros_(score.bias)
    if cls_prior is not None:
        with torch.no_grad():
            score.bias[0] = math.log(1 - cls_prior)
            score.bias[1:] = math.log(cls_prior / (score.out_features - 1))


class RoIHead(RoIHeadBase):
    """``features [N, in_channels, h, w]`` + ``rois [R, 4]`` -> ``([R, (C+1)*4], [R, C+1])``.

    RoIs (in input pixels) are mapped to the feature map.  ``mapping:
    feature_ratio`` (default, the faster-rcnn-pytorch way) scales x by
    ``feat_w / input_w`` and y by ``feat_h / input_h`` and pools with
    ``spatial_scale=1``; ``stride`` pools with ``spatial_scale=1/feat_stride``.
    The pooled ``[R, in_channels, roi_size, roi_size]`` go through the
    backbone's tail (``classifier``), then ``cls_loc`` and ``score``.
    Class 0 is background.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        pool: Literal["roi_pool", "roi_align"] = "roi_pool"
        mapping: Literal["feature_ratio", "stride"] = "feature_ratio"
        sampling_ratio: int = Field(2, ge=0, description="roi_align only: samples per bin side (0 = adaptive)")
        aligned: bool = Field(False, description="roi_align only: half-pixel offset")
        cls_prior: float | None = Field(None, gt=0, lt=1, description=CLS_PRIOR_DESCRIPTION)

    def __init__(
        self,
        params: Params | None = None,
        *,
        num_classes: int,
        in_channels: int | None = None,
        tail: RoITail | None = None,
        feat_stride: int = 16,
        input_shapes: dict[str, ShapeSpec] | None = None,
        **kwargs: Any,
    ):
        super().__init__()
        p = self.params = params if params is not None else self.Params(**kwargs)
        if input_shapes is not None or tail is None:
            raise ConfigError(
                "model.roi_head: roi_head pools one feature map through the backbone's RoI tail; "
                "with multi-level features (a neck) use type multiscale_roi_head"
            )
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.roi_size = tail.roi_size
        self.feat_stride = feat_stride
        self.pool, self.mapping = p.pool, p.mapping
        self.sampling_ratio, self.aligned = p.sampling_ratio, p.aligned
        self.classifier = tail.module
        self.cls_loc = nn.Linear(tail.out_features, (num_classes + 1) * 4)
        self.score = nn.Linear(tail.out_features, num_classes + 1)
        _init_predictors(self.cls_loc, self.score, p.cls_prior)

    def pool_rois(
        self, features: Tensor, rois: Tensor, roi_indices: Tensor, input_size: tuple[int, int]
    ) -> Tensor:
        """``[R, in_channels, roi_size, roi_size]`` features of each RoI."""
        # Pool in float32: RoI coordinates in fp16/bf16 lose up to pixels and
        # move roi_pool's rounded bins, torchvision's pooling needs features and
        # boxes of one dtype, and it has no bfloat16 CPU kernels. Cast back after.
        out_dtype = features.dtype
        features = features.float()
        rois = rois.float()
        if self.mapping == "feature_ratio":
            fh, fw = features.shape[-2:]
            h, w = input_size
            # Divide then multiply, in this order, as the reference does: RoIPool rounds
            # the mapped coordinates, so a different rounding of x/w*fw could move a bin.
            # Python-scalar arithmetic per axis: no small tensors copied to the device.
            xs = rois[:, 0::2] / w * fw
            ys = rois[:, 1::2] / h * fh
            rois = torch.stack((xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]), dim=1)
            spatial_scale = 1.0
        else:
            spatial_scale = 1.0 / self.feat_stride
        boxes = torch.cat((roi_indices.to(rois.dtype).unsqueeze(1), rois), dim=1)
        if self.pool == "roi_pool":
            pooled = roi_pool(features, boxes, self.roi_size, spatial_scale)
        else:
            pooled = roi_align(
                features, boxes, self.roi_size, spatial_scale, self.sampling_ratio, self.aligned
            )
        return pooled.to(out_dtype)

    def forward(
        self, features: Features, rois: Tensor, roi_indices: Tensor, input_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        if is_multi_level(features):
            raise ValueError("roi_head takes one feature map; use multiscale_roi_head for levels")
        pooled = self.pool_rois(features, rois, roi_indices, input_size)
        hidden = self.classifier(pooled)
        return self.cls_loc(hidden), self.score(hidden)


class TwoMLPHead(nn.Module):
    """``[R, C, s, s] -> [R, hidden]``: flatten, ``fc6`` (+ norm) + ReLU, ``fc7`` (+ norm) + ReLU (the FPN box head).

    ``norm``: ``none``, or ``gn`` (GroupNorm, 32 groups over the features of each RoI) /
    ``bn`` (BatchNorm over the RoIs of a batch) after each layer, for training from scratch.
    """

    def __init__(self, in_features: int, hidden: int, norm: str = "none"):
        super().__init__()
        self.fc6 = nn.Linear(in_features, hidden, bias=norm == "none")
        self.fc7 = nn.Linear(hidden, hidden, bias=norm == "none")
        self.norm6, self.norm7 = (_fc_norm(norm, hidden) for _ in range(2))

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm6(self.fc6(x.flatten(1))))
        return F.relu(self.norm7(self.fc7(x)))


def _fc_norm(norm: str, features: int) -> nn.Module:
    if norm == "gn":
        return nn.GroupNorm(math.gcd(32, features), features)
    if norm == "bn":
        return nn.BatchNorm1d(features)
    return nn.Identity()


class MultiScaleRoIHead(RoIHeadBase):
    """Pyramid features + ``rois [R, 4]`` -> ``([R, (C+1)*4], [R, C+1])``.

    Each RoI of size ``sqrt(w*h)`` is pooled (RoIAlign, ``roi_size`` bins,
    ``spatial_scale = 1/stride``) from level
    ``k = floor(canonical_level + log2(size / canonical_scale) + 1e-6)``
    clamped to the levels in ``in_features`` (FPN Eq. 1 and torchvision's
    ``MultiScaleRoIAlign``), then goes through :class:`TwoMLPHead`
    (``box_head``), ``cls_loc`` and ``score``.  Class 0 is background.
    Splitting RoIs by level reads the per-level counts back to the host once
    per level, as torchvision does.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        in_features: list[str] = Field(
            default_factory=lambda: ["P2", "P3", "P4", "P5"], min_length=1,
            description="pyramid levels to pool from, finest first",
        )
        roi_size: int = Field(7, gt=0)
        sampling_ratio: int = Field(2, ge=0, description="samples per bin side (0 = adaptive)")
        aligned: bool = Field(False, description="half-pixel offset (torchvision's detection models: false)")
        canonical_scale: float = Field(224.0, gt=0)
        canonical_level: int = Field(4, ge=0)
        representation_size: int = Field(1024, gt=0, description="width of fc6 and fc7")
        norm: Literal["none", "gn", "bn"] = Field(
            "none", description="normalisation after fc6 and fc7: gn (GroupNorm, 32 groups) or bn, for training from scratch"
        )
        cls_prior: float | None = Field(None, gt=0, lt=1, description=CLS_PRIOR_DESCRIPTION)

    def __init__(
        self,
        params: Params | None = None,
        *,
        num_classes: int,
        input_shapes: dict[str, ShapeSpec] | None = None,
        in_channels: int | None = None,
        tail: RoITail | None = None,
        feat_stride: Any = None,
        **kwargs: Any,
    ):
        super().__init__()
        p = self.params = params if params is not None else self.Params(**kwargs)
        if not input_shapes:
            raise ConfigError(
                "model.roi_head: multiscale_roi_head needs multi-level features "
                "(a backbone with out_features and a neck such as fpn)"
            )
        missing = [n for n in p.in_features if n not in input_shapes]
        if missing:
            raise ConfigError(
                f"model.roi_head.in_features: {', '.join(missing)} not among the features "
                f"({', '.join(input_shapes)})"
            )
        shapes = [input_shapes[n] for n in p.in_features]
        if len({s.channels for s in shapes}) != 1:
            raise ConfigError("model.roi_head.in_features: the pooled levels must have equal channels")
        levels = [math.log2(s.stride) for s in shapes]
        if any(l != round(l) for l in levels) or levels != sorted(levels):
            raise ConfigError("model.roi_head.in_features: strides must be powers of 2, finest first")
        self.num_classes = num_classes
        self.in_features = list(p.in_features)
        self.scales = [1.0 / s.stride for s in shapes]
        self.k_min, self.k_max = int(levels[0]), int(levels[-1])
        self.roi_size = p.roi_size
        self.sampling_ratio, self.aligned = p.sampling_ratio, p.aligned
        self.canonical_scale, self.canonical_level = p.canonical_scale, p.canonical_level
        channels = shapes[0].channels
        self.box_head = TwoMLPHead(channels * p.roi_size * p.roi_size, p.representation_size, p.norm)
        self.cls_loc = nn.Linear(p.representation_size, (num_classes + 1) * 4)
        self.score = nn.Linear(p.representation_size, num_classes + 1)
        _init_predictors(self.cls_loc, self.score, p.cls_prior)

    def levels(self, rois: Tensor) -> Tensor:
        """``[R]`` int64 index into ``in_features`` of the level each RoI is pooled from."""
        area = (rois[:, 2] - rois[:, 0]) * (rois[:, 3] - rois[:, 1])
        k = torch.floor(self.canonical_level + torch.log2(torch.sqrt(area) / self.canonical_scale) + 1e-6)
        return (k.clamp(self.k_min, self.k_max).to(torch.int64) - self.k_min)

    def pool_rois(self, features: dict[str, Tensor], rois: Tensor, roi_indices: Tensor) -> Tensor:
        """``[R, channels, roi_size, roi_size]`` features of each RoI, from its level."""
        maps = [features[n] for n in self.in_features]
        out_dtype = maps[0].dtype
        rois = rois.float()
        boxes = torch.cat((roi_indices.to(rois.dtype).unsqueeze(1), rois), dim=1)
        if len(maps) == 1:
            return roi_align(maps[0].float(), boxes, self.roi_size, self.scales[0], self.sampling_ratio,
                             self.aligned).to(out_dtype)
        levels = self.levels(rois)
        out = rois.new_zeros((rois.shape[0], maps[0].shape[1], self.roi_size, self.roi_size))
        for level, (fmap, scale) in enumerate(zip(maps, self.scales)):
            idx = torch.nonzero(levels == level).squeeze(1)
            out[idx] = roi_align(fmap.float(), boxes[idx], self.roi_size, scale, self.sampling_ratio, self.aligned)
        return out.to(out_dtype)

    def forward(
        self, features: Features, rois: Tensor, roi_indices: Tensor, input_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        if not is_multi_level(features):
            raise ValueError("multiscale_roi_head takes a dict of pyramid levels")
        hidden = self.box_head(self.pool_rois(features, rois, roi_indices))
        return self.cls_loc(hidden), self.score(hidden)
