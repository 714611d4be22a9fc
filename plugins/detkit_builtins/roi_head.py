"""The RoI head: pool each RoI, run the backbone's tail, classify and refine."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torchvision.ops import roi_align, roi_pool

from detkit.interfaces import RoIHead as RoIHeadBase
from detkit.interfaces import RoITail


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

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        tail: RoITail,
        feat_stride: int = 16,
        pool: str = "roi_pool",
        mapping: str = "feature_ratio",
        sampling_ratio: int = 2,
        aligned: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.roi_size = tail.roi_size
        self.feat_stride = feat_stride
        self.pool, self.mapping = pool, mapping
        self.sampling_ratio, self.aligned = sampling_ratio, aligned
        self.classifier = tail.module
        self.cls_loc = nn.Linear(tail.out_features, (num_classes + 1) * 4)
        self.score = nn.Linear(tail.out_features, num_classes + 1)
        nn.init.normal_(self.cls_loc.weight, std=0.001)
        nn.init.normal_(self.score.weight, std=0.01)
        nn.init.zeros_(self.cls_loc.bias)
        nn.init.zeros_(self.score.bias)

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
        self, features: Tensor, rois: Tensor, roi_indices: Tensor, input_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        pooled = self.pool_rois(features, rois, roi_indices, input_size)
        hidden = self.classifier(pooled)
        return self.cls_loc(hidden), self.score(hidden)
