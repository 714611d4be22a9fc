"""Region proposal network and the proposal creator that turns its outputs into RoIs."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import batched_nms

from detkit import boxes as box_ops
from detkit.errors import ConfigError
from detkit.interfaces import Features, ImageBatch, MatchedBoxes, ProposalGenerator, Proposals, Targets, is_multi_level
from detkit.registry import AnchorTargetSpec, BoxLossSpec, ClassLossSpec

from detkit_builtins.anchors import AnchorGenerator, AnchorParams, MultiLevelAnchorGenerator
from detkit_builtins.ops import group_and_cap, nms_first, nms_per_image


class ProposalParams(BaseModel):
    """Configuration of :class:`ProposalCreator` (the RPN's ``proposal`` section)."""

    model_config = ConfigDict(extra="forbid")

    nms_iou: float = Field(0.7, gt=0.0, le=1.0)
    train_pre_nms: int = Field(12000, gt=0, description="kept before NMS, per image (per level with levels)")
    train_post_nms: int = Field(600, gt=0, description="kept after NMS, per image")
    test_pre_nms: int = Field(3000, gt=0)
    test_post_nms: int = Field(300, gt=0)
    min_size: float = Field(16.0, ge=0.0, description="drop proposals narrower or lower (px, times scale)")
    min_size_before_topk: bool = Field(
        True,
        description="drop too-small boxes before the pre-NMS top-k (faster-rcnn-pytorch) or after it "
        "(torchvision: they still take a top-k place)",
    )
    score_thresh: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="drop proposals whose object probability is below this, with the too-small ones "
        "(torchvision's rpn_score_thresh: 0.05 in its MobileNetV3 models); 0: off",
    )


class ProposalCreator(nn.Module):
    """Decodes RPN deltas on anchors and keeps the best boxes of each image.

    Per image: decode (no std), clip to the image's true size, drop boxes
    narrower or lower than ``min_size * scale`` or scored under
    ``score_thresh`` (before or after the top-k, as ``min_size_before_topk``),
    keep the ``pre_nms`` best by object score (per level when there
    are several), NMS at ``nms_iou`` (levels independently), keep the
    ``post_nms`` best over all levels.
    Decoding, clipping and the top-k run batched; NMS runs once per image
    (grouped by level), so an image's proposals never depend on the other
    images.  With one map, NMS stops once ``post_nms`` boxes survive
    (:func:`~detkit_builtins.ops.nms_first`: the same proposals, and a
    fraction of the work when they overlap little); export traces the plain
    full NMS.  No tensor data is read in Python.
    """

    def __init__(self, params: ProposalParams):
        super().__init__()
        p = self.params = params
        self.nms_iou = p.nms_iou
        self.train_pre_nms, self.train_post_nms = p.train_pre_nms, p.train_post_nms
        self.test_pre_nms, self.test_post_nms = p.test_pre_nms, p.test_post_nms
        self.min_size = p.min_size
        self.min_size_before_topk = p.min_size_before_topk
        self.score_thresh = p.score_thresh

    def forward(
        self,
        locs: Tensor,
        fg_scores: Tensor,
        anchors: Tensor,
        image_sizes: Tensor,
        scale: float | Tensor = 1.0,
        num_per_level: Sequence[int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``locs [N, A, 4]``, ``fg_scores [N, A]``, ``anchors [A, 4]``, ``image_sizes [N, 2]`` (h, w).

        ``fg_scores`` are object log-odds (the RPN passes ``logit_object -
        logit_background``): they rank like the softmax probability but do not
        saturate, so anchors scored above ~17 (probability 1.0 in float32)
        keep their order, as torchvision's raw objectness does.
        ``score_thresh`` compares their sigmoid, the probability.

        ``num_per_level``: anchors of each level in ``A`` (levels concatenated);
        ``None`` is one level.  Returns ``rois [R, 4]`` and ``roi_indices [R]``
        (int64), grouped by image in batch order, best first within an image.
        """
        n, a = fg_scores.shape
        device = locs.device
        levels = list(num_per_level) if num_per_level is not None else [a]
        num_levels = len(levels)
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
        scores = fg_scores.to(boxes.dtype)
        if self.score_thresh > 0:  # a Python number from the config: no data read back
            valid = valid & (torch.sigmoid(scores) >= self.score_thresh)
        if self.min_size_before_topk:
            scores = scores.masked_fill(~valid, float("-inf"))

        # Top k of each level (shapes only: the level sizes are Python ints).
        idx, lvl, start = [], [], 0
        for level, count in enumerate(levels):
            k = _min_size(pre_nms, count)
            top = scores[:, start:start + count].topk(k, dim=1).indices + start  # [N, k], best first
            idx.append(top)
            lvl.append(torch.full_like(top[0], level))
            start += count
        top_idx = torch.cat(idx, dim=1) if num_levels > 1 else idx[0]
        top_lvl = torch.cat(lvl) if num_levels > 1 else lvl[0]
        kk = top_idx.shape[1]
        top_scores = scores.gather(1, top_idx)
        top_boxes = boxes.gather(1, top_idx.unsqueeze(-1).expand(n, kk, 4))
        top_valid = valid.gather(1, top_idx) & torch.isfinite(top_scores)
        image_idx = torch.arange(n, device=device).unsqueeze(1).expand(n, kk)
        # One NMS group per (image, level). Too-small boxes that still reached the
        # top k go into a group of their own (n * L) so they suppress nothing.
        groups = image_idx * num_levels + top_lvl.unsqueeze(0)
        groups = torch.where(top_valid, groups, torch.full_like(groups, n * num_levels))

        flat_boxes = top_boxes.reshape(-1, 4)
        flat_groups = groups.reshape(-1)
        if num_levels == 1 and not torch.jit.is_tracing():
            # One map: NMS per image over its valid boxes, best first, stopping once post_nms
            # survive (the same survivors; see nms_first). Export traces the plain path below.
            per_image = []
            for i in range(n):
                valid_i = torch.nonzero(top_valid[i]).squeeze(1)
                kept = nms_first(top_boxes[i, valid_i], top_scores[i, valid_i], self.nms_iou, post_nms)
                per_image.append(valid_i[kept] + i * kk)
            keep = torch.cat(per_image)
        else:
            # One NMS call per image: a single call over all N * kk boxes costs N times the work.
            keep = nms_per_image(top_boxes, top_scores, groups, self.nms_iou)  # by image, score order within

        # By image in batch order, best first over all levels, at most post_nms each;
        # image group n holds the too-small boxes.
        flat_images = torch.div(flat_groups, num_levels, rounding_mode="floor")
        keep, kept_images, _ = group_and_cap(keep, flat_images, n + 1, post_nms)
        selected = keep[kept_images < n]
        return flat_boxes[selected], flat_images[selected]


class RegionProposalNetwork(ProposalGenerator):
    """``conv_depth`` x (3x3 conv + ReLU), then 1x1 convs scoring (2) and regressing (4) each anchor.

    One map ``[N, in_channels, h, w]`` gives ``h*w*K`` anchors; with a dict of
    levels (all ``in_channels`` wide; needs ``anchor.sizes``, one list per
    level) the same head runs on every level and anchors, deltas and scores
    concatenate the levels finest first; proposals take the top ``pre_nms``
    per level, NMS per level, then the best ``post_nms`` over all levels.
    Training mode uses the ``train_*`` proposal counts and returns
    ``{"rpn_loc", "rpn_cls"}``: the ``anchor_target`` creator labels the
    anchors (float32, autocast off), ``loc_loss`` and ``cls_loss`` score them.
    Eval mode uses the ``test_*`` counts and returns no losses.  The 3x3 convs
    are ``conv1``, ``conv2``, ... (torchvision's v2 head has two).
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        mid_channels: int | None = Field(512, gt=0, description="3x3 conv width; null: in_channels")
        conv_depth: int = Field(1, ge=1, description="3x3 conv + ReLU blocks before the 1x1 score and box convs")
        anchor: AnchorParams = Field(default_factory=AnchorParams)
        proposal: ProposalParams = Field(default_factory=ProposalParams)
        cls_prior: float | None = Field(
            None, gt=0, lt=1,
            description="initial object probability of every anchor (the background logit's bias is "
            "log((1-p)/p)); null: zero bias, i.e. 0.5",
        )
        anchor_target: AnchorTargetSpec = Field(
            default_factory=lambda: {"type": "anchor_target"}, validate_default=True
        )
        loc_loss: BoxLossSpec = Field(default_factory=lambda: {"type": "smooth_l1"}, validate_default=True)
        cls_loss: ClassLossSpec = Field(default_factory=lambda: {"type": "cross_entropy"}, validate_default=True)

    def __init__(self, params: Params, *, in_channels: int, feat_stride: int | Sequence[int] = 16):
        super().__init__()
        p = self.params = params
        if isinstance(feat_stride, int):
            if p.anchor.sizes is not None:
                raise ConfigError(
                    "model.rpn.anchor.sizes: one list per feature level, but the features are one map "
                    f"(stride {feat_stride}); one map takes anchor.scales (times anchor.base_size)"
                )
            self.anchor_generator: nn.Module = AnchorGenerator(feat_stride, p.anchor)
            self.multi_level = False
        else:
            strides = list(feat_stride)
            if p.anchor.sizes is None:
                raise ConfigError(
                    f"model.rpn.anchor.sizes: missing; the features have {len(strides)} levels (strides "
                    f"{strides}), so give one list of anchor sizes (px) per level, e.g. "
                    f"{[[32 * 2 ** i] for i in range(len(strides))]}"
                )
            if len(p.anchor.sizes) != len(strides):
                raise ConfigError(
                    f"model.rpn.anchor.sizes: {len(p.anchor.sizes)} levels, but the features have "
                    f"{len(strides)} (strides {strides}); give one list per level"
                )
            self.anchor_generator = MultiLevelAnchorGenerator(strides, p.anchor)
            self.multi_level = True
        k = self.anchor_generator.num_per_cell
        mid = p.mid_channels or in_channels
        self.num_anchors_per_cell = k
        # conv1, conv2, ...: depth 1 keeps the key names of every earlier checkpoint.
        self.conv_names = [f"conv{i + 1}" for i in range(p.conv_depth)]
        for i, name in enumerate(self.conv_names):
            self.add_module(name, nn.Conv2d(in_channels if i == 0 else mid, mid, 3, padding=1))
        self.score = nn.Conv2d(mid, k * 2, 1)
        self.loc = nn.Conv2d(mid, k * 4, 1)
        self.proposal_creator = ProposalCreator(p.proposal)
        self.anchor_target = p.anchor_target.build()
        self.loc_loss = p.loc_loss.build()
        self.cls_loss = p.cls_loss.build()
        # The reference initialisation: normal(0, 0.01) for every conv.
        for layer in (*self.convs(), self.score, self.loc):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
        if p.cls_prior is not None:  # channels alternate (background, object) per anchor
            with torch.no_grad():
                self.score.bias[0::2] = math.log((1 - p.cls_prior) / p.cls_prior)

    def convs(self) -> list[nn.Module]:
        """The 3x3 convs, first first."""
        return [getattr(self, name) for name in self.conv_names]

    def anchors(
        self,
        feature_sizes: Sequence[tuple[int, int]],
        input_size: tuple[int, int] | None = None,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """``[A, 4]`` anchors for feature maps of ``feature_sizes`` (one ``(h, w)`` per level).

        ``input_size`` (the padded network input) is needed with multi-level
        anchors shifted by ``input_ratio`` strides.
        """
        if not self.multi_level:
            (h, w), = feature_sizes
            return self.anchor_generator(h, w, device)
        if input_size is None:
            raise ValueError("multi-level anchors need the input size")
        return torch.cat(self.anchor_generator(feature_sizes, input_size, device))

    def _head(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n = x.shape[0]
        for conv in self.convs():
            x = F.relu(conv(x))
        # NCHW -> NHWC keeps the K anchors of one cell contiguous, as the anchors are.
        locs = self.loc(x).permute(0, 2, 3, 1).reshape(n, -1, 4)
        scores = self.score(x).permute(0, 2, 3, 1).reshape(n, -1, 2)
        return locs, scores

    def forward(
        self, features: Features, images: ImageBatch, targets: Targets | None = None
    ) -> tuple[Proposals, dict[str, Tensor]]:
        maps = list(features.values()) if is_multi_level(features) else [features]
        if self.multi_level != is_multi_level(features):
            raise ValueError(
                "the RPN was built for " + ("multi-level" if self.multi_level else "single-map")
                + " features but got " + ("a dict of levels" if is_multi_level(features) else "one map")
            )
        outs = [self._head(m) for m in maps]
        locs = torch.cat([o[0] for o in outs], dim=1) if len(outs) > 1 else outs[0][0]
        scores = torch.cat([o[1] for o in outs], dim=1) if len(outs) > 1 else outs[0][1]
        sizes = [(m.shape[-2], m.shape[-1]) for m in maps]  # ints; traced values when exporting
        anchors = self.anchors(sizes, images.input_size, maps[0].device)
        num_per_level = [h * w * self.num_anchors_per_cell for h, w in sizes] if self.multi_level else None
        # softmax([b, o])[1] == sigmoid(o - b): rank by the log-odds, which never saturate.
        fg = scores[..., 1].detach() - scores[..., 0].detach()
        # faster-rcnn-pytorch's min_size rule: times each image's resize factor in training, 1 at test.
        scale = images.scales if self.training else 1.0
        # The proposal step is not differentiated: the RoI head treats RoIs as inputs.
        with torch.no_grad():
            rois, roi_indices = self.proposal_creator(
                locs.detach(), fg, anchors, images.image_sizes, scale, num_per_level
            )
        proposals = Proposals(rois, roi_indices)
        if not self.training:
            return proposals, {}
        if targets is None:
            raise ValueError("the RPN needs targets in train mode")
        n = locs.shape[0]
        with torch.autocast(locs.device.type, enabled=False):
            gt_locs, labels = self.anchor_target(
                [t["boxes"] for t in targets], anchors, images.image_sizes, generator=self.generator
            )
        flat_labels = labels.reshape(-1)
        gt_locs = gt_locs.reshape(-1, 4)
        # Box losses also get the boxes behind each row (anchors, matched ground truth): IoU-type losses need them.
        matched = MatchedBoxes(anchors.repeat(n, 1), gt_locs)
        rpn_loc = self.loc_loss(locs.reshape(-1, 4), gt_locs, flat_labels, boxes=matched)
        rpn_cls = self.cls_loss(scores.reshape(-1, 2), flat_labels)
        return proposals, {"rpn_loc": rpn_loc, "rpn_cls": rpn_cls}


def _min_size(limit: int, size: int | Tensor) -> int | Tensor:
    """``min(limit, size)``; a traced size (export) stays a tensor so the graph keeps it dynamic."""
    if isinstance(size, Tensor):
        return torch.clamp(size, max=limit)
    return min(limit, size)
