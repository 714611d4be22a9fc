"""Region proposal network and the proposal creator that turns its outputs into RoIs."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import batched_nms

from detkit import boxes as box_ops
from detkit.interfaces import ProposalGenerator, RPNOutput

from detkit_builtins.anchors import AnchorGenerator, AnchorParams
from detkit_builtins.ops import group_and_cap


class ProposalParams(BaseModel):
    """Configuration of :class:`ProposalCreator` (the RPN's ``proposal`` section)."""

    model_config = ConfigDict(extra="forbid")

    nms_iou: float = Field(0.7, gt=0.0, le=1.0)
    train_pre_nms: int = Field(12000, gt=0)
    train_post_nms: int = Field(600, gt=0)
    test_pre_nms: int = Field(3000, gt=0)
    test_post_nms: int = Field(300, gt=0)
    min_size: float = Field(16.0, ge=0.0)


class ProposalCreator(nn.Module):
    """Decodes RPN deltas on anchors and keeps the best boxes of each image.

    Per image: decode (no std), clip to the image's true size, drop boxes
    narrower or lower than ``min_size * scale``, keep the ``pre_nms`` best by
    object probability, NMS at ``nms_iou``, keep the ``post_nms`` best.
    All images go through in one batched pass (``batched_nms`` grouped by
    image), so an image's proposals never depend on the other images.
    """

    def __init__(
        self,
        nms_iou: float = 0.7,
        train_pre_nms: int = 12000,
        train_post_nms: int = 600,
        test_pre_nms: int = 3000,
        test_post_nms: int = 300,
        min_size: float = 16.0,
    ):
        super().__init__()
        self.nms_iou = nms_iou
        self.train_pre_nms, self.train_post_nms = train_pre_nms, train_post_nms
        self.test_pre_nms, self.test_post_nms = test_pre_nms, test_post_nms
        self.min_size = min_size

    def forward(
        self,
        locs: Tensor,
        fg_scores: Tensor,
        anchors: Tensor,
        image_sizes: Tensor,
        scale: float | Tensor = 1.0,
    ) -> tuple[Tensor, Tensor]:
        """``locs [N, A, 4]``, ``fg_scores [N, A]``, ``anchors [A, 4]``, ``image_sizes [N, 2]`` (h, w).

        Returns ``rois [R, 4]`` and ``roi_indices [R]`` (int64), grouped by image
        in batch order, best first within an image.
        """
        n, a = fg_scores.shape
        device = locs.device
        pre_nms = self.train_pre_nms if self.training else self.test_pre_nms
        post_nms = self.train_post_nms if self.training else self.test_post_nms

        # float32 even under autocast: half precision is ~0.5 px at 600 px coordinates.
        boxes = box_ops.decode(anchors.float().unsqueeze(0), locs.float())  # [N, A, 4]
        sizes = image_sizes.to(device=device, dtype=boxes.dtype)
        boxes = box_ops.clip(boxes, sizes[:, 0:1], sizes[:, 1:2])

        if isinstance(scale, Tensor):
            min_size = self.min_size * scale.to(device=device, dtype=boxes.dtype)
            min_size = min_size.reshape(-1, 1) if min_size.dim() else min_size  # [N, 1] or scalar
        else:
            min_size = self.min_size * float(scale)  # a Python number: no host-to-device copy
        ws = boxes[..., 2] - boxes[..., 0]
        hs = boxes[..., 3] - boxes[..., 1]
        valid = (ws >= min_size) & (hs >= min_size)
        scores = fg_scores.to(boxes.dtype).masked_fill(~valid, float("-inf"))

        k = min(pre_nms, a)
        top_scores, top_idx = scores.topk(k, dim=1)  # [N, k], sorted best first
        top_boxes = boxes.gather(1, top_idx.unsqueeze(-1).expand(n, k, 4))
        image_idx = torch.arange(n, device=device).unsqueeze(1).expand(n, k)
        top_valid = torch.isfinite(top_scores)
        # Too-small boxes that were still drawn into the top k (images with fewer
        # than k valid boxes) go into a group of their own so they suppress nothing.
        groups = torch.where(top_valid, image_idx, torch.full_like(image_idx, n))

        flat_boxes = top_boxes.reshape(-1, 4)
        flat_scores = top_scores.reshape(-1)
        flat_groups = groups.reshape(-1)
        keep = batched_nms(flat_boxes, flat_scores, flat_groups, self.nms_iou)  # score order

        # By image in batch order, best first, at most post_nms each; group n holds the too-small boxes.
        keep, kept_groups, _ = group_and_cap(keep, flat_groups, n + 1, post_nms)
        selected = keep[kept_groups < n]
        return flat_boxes[selected], flat_groups[selected]


class RegionProposalNetwork(ProposalGenerator):
    """3x3 conv + ReLU, then 1x1 convs scoring (2) and regressing (4) each anchor.

    ``features [N, in_channels, h, w]`` -> :class:`RPNOutput` with
    ``locs [N, h*w*K, 4]``, ``scores [N, h*w*K, 2]`` (logits: background,
    object), proposals ``rois [R, 4]`` / ``roi_indices [R]`` and the
    ``anchors [h*w*K, 4]``.  Training mode uses the ``train_*`` proposal
    counts, eval mode the ``test_*`` ones.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        mid_channels: int = Field(512, gt=0)
        anchor: AnchorParams = Field(default_factory=AnchorParams)
        proposal: ProposalParams = Field(default_factory=ProposalParams)

    def __init__(
        self,
        in_channels: int,
        feat_stride: int = 16,
        mid_channels: int = 512,
        anchor: AnchorParams | dict[str, Any] | None = None,
        proposal: ProposalParams | dict[str, Any] | None = None,
    ):
        super().__init__()
        anchor = AnchorParams.model_validate(anchor or {}) if not isinstance(anchor, AnchorParams) else anchor
        proposal = (
            ProposalParams.model_validate(proposal or {})
            if not isinstance(proposal, ProposalParams)
            else proposal
        )
        self.anchor_generator = AnchorGenerator(
            feat_stride, anchor.ratios, anchor.scales, anchor.base_size, anchor.offset
        )
        k = self.anchor_generator.num_per_cell
        self.num_anchors_per_cell = k
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 3, padding=1)
        self.score = nn.Conv2d(mid_channels, k * 2, 1)
        self.loc = nn.Conv2d(mid_channels, k * 4, 1)
        self.proposal_creator = ProposalCreator(**proposal.model_dump())
        for layer in (self.conv1, self.score, self.loc):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def anchors(self, feat_h: int, feat_w: int, device: torch.device | str = "cpu") -> Tensor:
        return self.anchor_generator(feat_h, feat_w, device)

    def forward(
        self, features: Tensor, image_sizes: Tensor, scale: float | Tensor = 1.0
    ) -> RPNOutput:
        n, _, h, w = features.shape
        x = F.relu(self.conv1(features))
        # NCHW -> NHWC keeps the K anchors of one cell contiguous, as the anchors are.
        locs = self.loc(x).permute(0, 2, 3, 1).reshape(n, -1, 4)
        scores = self.score(x).permute(0, 2, 3, 1).reshape(n, -1, 2)
        anchors = self.anchors(h, w, features.device)
        fg = F.softmax(scores.detach(), dim=-1)[..., 1]
        # The proposal step is not differentiated: the RoI head treats RoIs as inputs.
        with torch.no_grad():
            rois, roi_indices = self.proposal_creator(locs.detach(), fg, anchors, image_sizes, scale)
        return RPNOutput(locs, scores, rois, roi_indices, anchors)
