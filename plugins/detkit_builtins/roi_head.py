"""The RoI head: pool each proposal, run a box head, classify and refine; in training, its own losses.

One class for every built-in architecture; the parts are components named in
the config: a ``pooler`` (``roi_pool``, ``roi_align``, ``multiscale_roi_align``),
a ``box_head`` (``backbone_tail``, ``two_mlp``), the ``proposal_target``
creator that samples the RoIs it trains on, and its two losses.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.nn import functional as F

from detkit import boxes as box_ops
from detkit.interfaces import (
    Features, ImageBatch, MatchedBoxes, Proposals, RoIHead as RoIHeadBase, RoIPredictions, RoITail, ShapeSpec,
    Targets,
)
from detkit.registry import (
    BoxHeadSpec, BoxLossSpec, ClassLossSpec, PoolerSpec, ProposalTargetSpec, registry,
)

CLS_PRIOR_DESCRIPTION = (
    "initial foreground probability of the classifier (bias of the background logit log(1-p), of "
    "each class log(p/C)), which steadies the first steps from scratch; null: zero bias"
)


def init_predictors(cls_loc: nn.Linear, score: nn.Linear, cls_prior: float | None = None) -> None:
    """The reference initialisation: classifier normal(0, 0.01), box regression normal(0, 0.001)."""
    nn.init.normal_(cls_loc.weight, std=0.001)
    nn.init.normal_(score.weight, std=0.01)
    nn.init.zeros_(cls_loc.bias)
    nn.init.zeros_(score.bias)
    if cls_prior is not None:
        with torch.no_grad():
            score.bias[0] = math.log(1 - cls_prior)
            score.bias[1:] = math.log(cls_prior / (score.out_features - 1))


def class_deltas(roi_cls_locs: Tensor, labels: Tensor) -> Tensor:
    """``[S, (C+1)*4]`` -> ``[S, 4]``: each row's deltas for its own label (row 0's slot for background/padding)."""
    s = roi_cls_locs.shape[0]
    index = labels.clamp(min=0).reshape(s, 1, 1).expand(s, 1, 4)
    return roi_cls_locs.reshape(s, -1, 4).gather(1, index).squeeze(1)


class RoIHead(RoIHeadBase):
    """Features + proposals -> per-class boxes and scores; train mode: ``{"roi_loc", "roi_cls"}``.

    The pooled ``[R, C, s, s]`` RoIs go through ``box_head`` to ``[R, F]``, then
    ``cls_loc`` (``(C+1)*4`` deltas, divided by ``loc_normalize_std``) and
    ``score`` (``C+1`` logits, class 0 background).  In training the
    ``proposal_target`` creator samples ``n_sample`` RoIs per image among the
    proposals and the ground truth, in float32 with autocast off (IoU in half
    precision would move the thresholds); ``roi_loc`` is the box loss on each
    foreground RoI's own class deltas, ``roi_cls`` the classification loss.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        pooler: PoolerSpec = Field(default_factory=lambda: {"type": "roi_pool"}, validate_default=True)
        box_head: BoxHeadSpec = Field(default_factory=lambda: {"type": "backbone_tail"}, validate_default=True)
        proposal_target: ProposalTargetSpec = Field(
            default_factory=lambda: {"type": "proposal_target"}, validate_default=True
        )
        loc_loss: BoxLossSpec = Field(default_factory=lambda: {"type": "smooth_l1"}, validate_default=True)
        cls_loss: ClassLossSpec = Field(default_factory=lambda: {"type": "cross_entropy"}, validate_default=True)
        loc_normalize_std: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
        cls_prior: float | None = Field(None, gt=0, lt=1, description=CLS_PRIOR_DESCRIPTION)

    def __init__(
        self,
        params: Params,
        *,
        num_classes: int,
        input_shapes: dict[str, ShapeSpec],
        tail: RoITail | None = None,
    ):
        super().__init__()
        p = self.params = params
        self.num_classes = num_classes
        box_head_cls = registry("box_head").get(p.box_head.type).factory
        self.pooler = p.pooler.build(input_shapes=input_shapes, required_size=box_head_cls.input_size(tail))
        self.box_head = p.box_head.build(
            in_channels=self.pooler.out_channels, roi_size=self.pooler.output_size, tail=tail
        )
        self.cls_loc = nn.Linear(self.box_head.out_features, (num_classes + 1) * 4)
        self.score = nn.Linear(self.box_head.out_features, num_classes + 1)
        init_predictors(self.cls_loc, self.score, p.cls_prior)
        self.proposal_target = p.proposal_target.build()
        self.loc_loss = p.loc_loss.build()
        self.cls_loss = p.cls_loss.build()
        # Non-persistent: from the config, not trained.
        self.register_buffer("loc_std", torch.tensor(p.loc_normalize_std), persistent=False)

    @property
    def loc_normalize_std(self) -> Sequence[float]:
        return self.params.loc_normalize_std

    def predict_boxes(
        self, features: Features, boxes: Tensor, image_indices: Tensor, input_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """``([R, (C+1)*4] deltas, [R, C+1] logits)`` of the given RoIs."""
        hidden = self.box_head(self.pooler(features, boxes, image_indices, input_size))
        return self.cls_loc(hidden), self.score(hidden)

    def compile_modules(self) -> list[nn.Module]:
        return [self.box_head]  # fixed [R, C, S, S] inputs: R is n_sample (train) or the proposal cap

    def forward(
        self, features: Features, proposals: Proposals, images: ImageBatch, targets: Targets | None = None
    ) -> tuple[RoIPredictions | None, dict[str, Tensor]]:
        input_size = images.input_size
        if self.training:
            if targets is None:
                raise ValueError("the RoI head needs targets in train mode")
            with torch.autocast(images.tensor.device.type, enabled=False):
                sampled = self.proposal_target(
                    proposals.boxes.detach(), proposals.image_indices,
                    [t["boxes"] for t in targets], [t["labels"] for t in targets],
                    self.loc_std, generator=self.generator,
                )
            roi_cls_locs, roi_scores = self.predict_boxes(features, sampled.boxes, sampled.image_indices, input_size)
            matched = MatchedBoxes(sampled.boxes, sampled.loc_targets, self.loc_std)
            roi_loc = self.loc_loss(class_deltas(roi_cls_locs, sampled.labels), sampled.loc_targets,
                                    sampled.labels, boxes=matched)
            return None, {"roi_loc": roi_loc, "roi_cls": self.cls_loss(roi_scores, sampled.labels)}
        roi_cls_locs, roi_scores = self.predict_boxes(features, proposals.boxes, proposals.image_indices, input_size)
        return self.decode(proposals, roi_cls_locs, roi_scores), {}

    def decode(self, proposals: Proposals, roi_cls_locs: Tensor, roi_scores: Tensor) -> RoIPredictions:
        """Per-class boxes (network-input pixels, unclipped) and foreground probabilities."""
        r, c = roi_cls_locs.shape[0], self.num_classes
        locs = roi_cls_locs.float().reshape(r, c + 1, 4)[:, 1:]
        boxes = box_ops.decode(proposals.boxes.float().unsqueeze(1), locs, self.loc_std.float())  # [R, C, 4]
        probs = F.softmax(roi_scores.float(), dim=-1)[:, 1:]
        return RoIPredictions(boxes, probs, proposals.image_indices)
