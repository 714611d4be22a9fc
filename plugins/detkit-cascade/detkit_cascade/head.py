"""Cascade R-CNN's RoI head (Cai & Vasconcelos, 2018): stages of rising IoU threshold, each refining the last.

Built only from detkit's public contracts: the head is a
:class:`detkit.interfaces.RoIHead`, and its poolers, box heads, samplers and
losses are whatever components the config names, built through
:func:`detkit.registry.registry` exactly as the built-in head builds its own.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detkit import boxes as box_ops
from detkit.interfaces import (
    Features, ImageBatch, MatchedBoxes, Proposals, RoIHead, RoIPredictions, RoITail, ShapeSpec, Targets,
)
from detkit.registry import ComponentSpec, registry

from detkit_cascade.params import CascadeParams


class CascadeStage(nn.Module):
    """One stage: pool the RoIs, run its box head, predict box deltas and class logits.

    ``cls_loc`` gives 4 deltas per RoI (class-agnostic) or ``(C+1)*4``;
    ``score`` gives ``C+1`` logits (class 0 background).  ``loc_std`` is the
    stage's box-coder std (from the config, not saved in checkpoints).
    """

    def __init__(
        self,
        pooler: ComponentSpec,
        box_head: ComponentSpec,
        *,
        num_classes: int,
        input_shapes: dict[str, ShapeSpec],
        tail: RoITail | None,
        class_agnostic: bool,
        loc_std: tuple[float, float, float, float],
        cls_prior: float | None,
    ):
        super().__init__()
        required = registry("box_head").get(box_head.type).factory.input_size(tail)
        self.pooler = pooler.build(input_shapes=input_shapes, required_size=required)
        self.box_head = box_head.build(
            in_channels=self.pooler.out_channels, roi_size=self.pooler.output_size, tail=tail
        )
        self.class_agnostic = class_agnostic
        features = self.box_head.out_features
        self.cls_loc = nn.Linear(features, 4 if class_agnostic else (num_classes + 1) * 4)
        self.score = nn.Linear(features, num_classes + 1)
        # The reference initialisation of Fast R-CNN's predictors.
        nn.init.normal_(self.cls_loc.weight, std=0.001)
        nn.init.normal_(self.score.weight, std=0.01)
        nn.init.zeros_(self.cls_loc.bias)
        nn.init.zeros_(self.score.bias)
        if cls_prior is not None:
            with torch.no_grad():
                self.score.bias[0] = math.log(1 - cls_prior)
                self.score.bias[1:] = math.log(cls_prior / num_classes)
        self.register_buffer("loc_std", torch.tensor(loc_std), persistent=False)

    def forward(
        self, features: Features, boxes: Tensor, image_indices: Tensor, input_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """``(deltas [R, K, 4], logits [R, C+1])`` with ``K`` 1 (class-agnostic) or ``C+1``."""
        hidden = self.box_head(self.pooler(features, boxes, image_indices, input_size))
        deltas = self.cls_loc(hidden)
        return deltas.reshape(deltas.shape[0], -1, 4), self.score(hidden)

    def deltas_for(self, deltas: Tensor, labels: Tensor) -> Tensor:
        """``[R, K, 4] -> [R, 4]``: the class-agnostic deltas, or each row's own label's (0: background slot)."""
        if self.class_agnostic:
            return deltas[:, 0]
        r = deltas.shape[0]
        index = labels.clamp(min=0).reshape(r, 1, 1).expand(r, 1, 4)
        return deltas.gather(1, index).squeeze(1)


class CascadeRoIHead(RoIHead):
    """Cascade R-CNN: ``num_stages`` RoI stages, stage ``k`` trained at ``iou_thresholds[k]``.

    Training: stage 0 samples among the RPN's proposals and the ground truth;
    stage ``k > 0`` among the boxes stage ``k-1`` regressed from its own
    sampled RoIs (detached, clipped to the image) and the ground truth, with
    its own IoU threshold and box-coder std.  Losses ``s<k>_roi_loc`` and
    ``s<k>_roi_cls`` are already multiplied by ``stage_loss_weights[k]`` (so
    the trainer's total is the paper's weighted sum; ``loss_weights`` of the
    trainer still apply on top).

    Inference: each stage scores and refines the previous stage's boxes; the
    class scores are the mean of every stage's softmax probabilities (the
    paper's ensemble) and the boxes are the last stage's regression of the
    boxes it scored, the same for every class when class-agnostic.
    """

    Params = CascadeParams

    def __init__(
        self,
        params: CascadeParams | None = None,
        *,
        num_classes: int,
        input_shapes: dict[str, ShapeSpec],
        tail: RoITail | None = None,
    ):
        super().__init__()
        p = self.params = params if params is not None else CascadeParams()
        self.num_classes = num_classes
        self.stages = nn.ModuleList(
            CascadeStage(
                p.pooler[k], p.box_head[k], num_classes=num_classes, input_shapes=input_shapes, tail=tail,
                class_agnostic=p.class_agnostic, loc_std=p.loc_normalize_stds[k], cls_prior=p.cls_prior,
            )
            for k in range(p.num_stages)
        )
        self.proposal_targets = nn.ModuleList(
            registry("target_creator").build(p.stage_sampler(k)) for k in range(p.num_stages)
        )
        self.loc_loss = p.loc_loss.build()
        self.cls_loss = p.cls_loss.build()
        self.stage_loss_weights = list(p.stage_loss_weights)

    def compile_modules(self) -> list[nn.Module]:
        """Each stage's box head, once (C4 stages share the backbone's one tail)."""
        heads: list[nn.Module] = []
        for stage in self.stages:
            if all(stage.box_head is not h for h in heads):
                heads.append(stage.box_head)
        return heads

    @property
    def iou_thresholds(self) -> list[float]:
        return list(self.params.iou_thresholds)

    def forward(
        self, features: Features, proposals: Proposals, images: ImageBatch, targets: Targets | None = None
    ) -> tuple[RoIPredictions | None, dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("the cascade RoI head needs targets in train mode")
            return None, self._losses(features, proposals, images, targets)
        return self._predict(features, proposals, images), {}

    def _losses(
        self, features: Features, proposals: Proposals, images: ImageBatch, targets: Targets
    ) -> dict[str, Tensor]:
        input_size = images.input_size
        gt_boxes = [t["boxes"] for t in targets]
        gt_labels = [t["labels"] for t in targets]
        boxes, image_indices = proposals.boxes.detach(), proposals.image_indices
        losses: dict[str, Tensor] = {}
        for k, stage in enumerate(self.stages):
            # IoU in half precision would move the thresholds: sample in float32.
            with torch.autocast(images.tensor.device.type, enabled=False):
                sampled = self.proposal_targets[k](
                    boxes, image_indices, gt_boxes, gt_labels, stage.loc_std, generator=self.generator
                )
            deltas, logits = stage(features, sampled.boxes, sampled.image_indices, input_size)
            # Background rows regress nothing in the loss; for refinement they take their best class.
            labels = sampled.labels
            own = stage.deltas_for(deltas, labels)
            matched = MatchedBoxes(sampled.boxes, sampled.loc_targets, stage.loc_std)
            w = self.stage_loss_weights[k]
            losses[f"s{k}_roi_loc"] = w * self.loc_loss(own, sampled.loc_targets, labels, boxes=matched)
            losses[f"s{k}_roi_cls"] = w * self.cls_loss(logits, labels)
            if k + 1 < len(self.stages):
                if not stage.class_agnostic:
                    best = logits[:, 1:].detach().argmax(dim=1) + 1
                    own = stage.deltas_for(deltas, torch.where(labels > 0, labels, best))
                # Padding rows (label -1, zero boxes) stay zero-area boxes; the next sampler sees
                # them only when an image had fewer candidates than n_sample.
                boxes = self._refine(sampled.boxes, own.detach(), sampled.image_indices, stage, images)
                image_indices = sampled.image_indices
        return losses

    def _predict(self, features: Features, proposals: Proposals, images: ImageBatch) -> RoIPredictions:
        input_size = images.input_size
        boxes, image_indices = proposals.boxes, proposals.image_indices
        stage_probs = []
        for k, stage in enumerate(self.stages):
            deltas, logits = stage(features, boxes, image_indices, input_size)
            probs = F.softmax(logits.float(), dim=-1)
            stage_probs.append(probs)
            if k + 1 < len(self.stages):
                best = probs[:, 1:].argmax(dim=1) + 1
                boxes = self._refine(boxes, stage.deltas_for(deltas, best), image_indices, stage, images)
        # The last stage's deltas on the boxes it scored: [R, 1, 4] shared by every class, or [R, C, 4].
        per_class = deltas.float() if stage.class_agnostic else deltas.float()[:, 1:]
        final = box_ops.decode(boxes.float().unsqueeze(1), per_class, stage.loc_std.float())
        final = final.expand(-1, self.num_classes, -1)
        scores = torch.stack(stage_probs).mean(dim=0)[:, 1:]
        return RoIPredictions(final, scores, image_indices)

    @staticmethod
    def _refine(
        boxes: Tensor, deltas: Tensor, image_indices: Tensor, stage: CascadeStage, images: ImageBatch
    ) -> Tensor:
        """The stage's regressed boxes, in float32, clipped to each image's resized area, as the next stage's RoIs."""
        refined = box_ops.decode(boxes.float(), deltas.float(), stage.loc_std.float())
        sizes = images.image_sizes.to(refined.dtype)[image_indices]  # [R, 2] (h, w)
        return box_ops.clip(refined, sizes[:, 0], sizes[:, 1]).detach()
