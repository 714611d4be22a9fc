"""Faster R-CNN training: targets, the four losses, and one optimisation step."""

from __future__ import annotations

from typing import Annotated, Any, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from detkit.interfaces import Detector, MatchedBoxes, Trainer
from detkit.registry import Component, ComponentSpec, registry

# The trainer's slots each take one role of their kind: a classification loss in a
# box-loss slot would only fail at the first step, so configs are refused instead.
AnchorTargetSpec = Annotated[ComponentSpec, Component("target_creator", role="anchor")]
ProposalTargetSpec = Annotated[ComponentSpec, Component("target_creator", role="proposal")]
BoxLossSpec = Annotated[ComponentSpec, Component("loss", role="box")]
ClassLossSpec = Annotated[ComponentSpec, Component("loss", role="classification")]


class FasterRCNNTrainer(Trainer):
    """Trains a :class:`~detkit_builtins.faster_rcnn.FasterRCNN` end to end (approximate joint training).

    ``forward(imgs [N, 3, H, W] 0..1, bboxes: list of [G_i, 4], labels: list of
    [G_i] in 0..C-1, scale=1.0, image_sizes [N, 2] or None)`` returns the named
    scalar losses ``{"rpn_loc", "rpn_cls", "roi_loc", "roi_cls", "total"}``;
    ``total`` is the plain sum of the other four.  ``train_step`` (from
    :class:`~detkit.interfaces.Trainer`) zeroes, runs forward and backward
    through an ``amp`` helper, clips to ``grad_clip`` and steps.

    Batch averaging: every loss pools the samples of all images before
    normalising.  ``rpn_loc``/``roi_loc`` sum the smooth L1 of the positive
    anchors / foreground RoIs of the whole batch and divide by their total
    count; ``rpn_cls``/``roi_cls`` average the cross entropy over all sampled
    (non-ignored) anchors / RoIs of the batch.  With the usual full samples
    (``n_sample`` anchors and RoIs in every image) the classification losses
    equal the mean of the per-image losses; the box losses weight each image
    by its number of positives.

    Targets are created in float32 with autocast disabled; only the network
    runs in reduced precision under ``amp``.  ``seed`` fixes the random
    sampling of anchors and RoIs (one ``torch.Generator`` per device).
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        anchor_target: AnchorTargetSpec = Field(
            default_factory=lambda: {"type": "anchor_target"}, validate_default=True
        )
        proposal_target: ProposalTargetSpec = Field(
            default_factory=lambda: {"type": "proposal_target"}, validate_default=True
        )
        rpn_loc_loss: BoxLossSpec = Field(
            default_factory=lambda: {"type": "smooth_l1", "sigma": 1.0}, validate_default=True
        )
        rpn_cls_loss: ClassLossSpec = Field(
            default_factory=lambda: {"type": "cross_entropy"}, validate_default=True
        )
        roi_loc_loss: BoxLossSpec = Field(
            default_factory=lambda: {"type": "smooth_l1", "sigma": 1.0}, validate_default=True
        )
        roi_cls_loss: ClassLossSpec = Field(
            default_factory=lambda: {"type": "cross_entropy"}, validate_default=True
        )
        grad_clip: float | None = Field(None, gt=0, description="max total gradient norm; null: no clipping")
        seed: int | None = Field(None, description="seed of the target sampling; null: torch's global RNG")

    def __init__(
        self,
        model: Detector,
        optimizer: torch.optim.Optimizer | None = None,
        anchor_target: Any = "anchor_target",
        proposal_target: Any = "proposal_target",
        rpn_loc_loss: Any = "smooth_l1",
        rpn_cls_loss: Any = "cross_entropy",
        roi_loc_loss: Any = "smooth_l1",
        roi_cls_loss: Any = "cross_entropy",
        grad_clip: float | None = None,
        seed: int | None = None,
    ):
        super().__init__()
        self.model = model
        self.optimizer = optimizer
        # Each accepts a ComponentSpec (from a config) or a mapping/name (direct use).
        self.anchor_target = registry("target_creator").build(anchor_target)
        self.proposal_target = registry("target_creator").build(proposal_target)
        self.rpn_loc_loss = registry("loss").build(rpn_loc_loss)
        self.rpn_cls_loss = registry("loss").build(rpn_cls_loss)
        self.roi_loc_loss = registry("loss").build(roi_loc_loss)
        self.roi_cls_loss = registry("loss").build(roi_cls_loss)
        self.grad_clip = grad_clip
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def get_extra_state(self) -> dict[str, Tensor]:
        """The seeded sampling generators' states, so a resumed run samples on as before."""
        return {key: g.get_state() for key, g in self._generators.items()}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        for key, value in state.items():
            g = torch.Generator(device=torch.device(key))
            g.set_state(value.cpu())
            self._generators[key] = g

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The sampling generator for ``device`` (created and seeded on first use), or None."""
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def forward(
        self,
        imgs: Tensor,
        bboxes: Sequence[Tensor],
        labels: Sequence[Tensor],
        scale: float | Tensor = 1.0,
        image_sizes: Tensor | None = None,
    ) -> dict[str, Tensor]:
        n = imgs.shape[0]
        if len(bboxes) != n or len(labels) != n:
            raise ValueError(f"{n} images but {len(bboxes)} box lists and {len(labels)} label lists")
        device = imgs.device
        input_size = (int(imgs.shape[-2]), int(imgs.shape[-1]))
        if image_sizes is None:
            # Filled on the device: torch.tensor(..., device="cuda") would block on a copy.
            image_sizes = torch.empty(n, 2, dtype=torch.int64, device=device)
            image_sizes[:, 0], image_sizes[:, 1] = input_size
        else:
            image_sizes = image_sizes.to(device)
        bboxes = [b.to(device) for b in bboxes]
        labels = [l.to(device) for l in labels]

        features = self.model(imgs, mode="extractor")
        rpn = self.model(
            features, mode="rpn", image_sizes=image_sizes, scale=scale, input_size=input_size
        )

        generator = self.generator(device)
        # IoU and box coding in half precision would move the 0.7 / 0.5 thresholds.
        with torch.autocast(device.type, enabled=False):
            gt_rpn_locs, gt_rpn_labels = self.anchor_target(
                bboxes, rpn.anchors, image_sizes, generator=generator
            )
            sample_rois, sample_indices, gt_roi_locs, gt_roi_labels = self.proposal_target(
                rpn.rois.detach(),
                rpn.roi_indices,
                bboxes,
                labels,
                self.model.loc_normalize_std,
                generator=generator,
            )

        roi_cls_locs, roi_scores = self.model(
            features, mode="head", rois=sample_rois, roi_indices=sample_indices, input_size=input_size
        )

        flat_labels = gt_rpn_labels.reshape(-1)
        # Box losses also get the boxes behind each row (anchors, matched ground truth): IoU-type losses need them.
        rpn_boxes = MatchedBoxes(rpn.anchors.repeat(n, 1), gt_rpn_locs.reshape(-1, 4))
        rpn_loc = self.rpn_loc_loss(
            rpn.locs.reshape(-1, 4), gt_rpn_locs.reshape(-1, 4), flat_labels, boxes=rpn_boxes
        )
        rpn_cls = self.rpn_cls_loss(rpn.scores.reshape(-1, rpn.scores.shape[-1]), flat_labels)

        # Each sample's deltas for its own class; background/padding rows are
        # masked by the loss (labels <= 0), class 0's slot is a harmless pick.
        s = roi_cls_locs.shape[0]
        per_class = roi_cls_locs.reshape(s, -1, 4)
        index = gt_roi_labels.clamp(min=0).reshape(s, 1, 1).expand(s, 1, 4)
        roi_locs = per_class.gather(1, index).squeeze(1)
        roi_boxes = MatchedBoxes(sample_rois, gt_roi_locs, self.model.loc_normalize_std)
        roi_loc = self.roi_loc_loss(roi_locs, gt_roi_locs, gt_roi_labels, boxes=roi_boxes)
        roi_cls = self.roi_cls_loss(roi_scores, gt_roi_labels)

        total = rpn_loc + rpn_cls + roi_loc + roi_cls
        return {"rpn_loc": rpn_loc, "rpn_cls": rpn_cls, "roi_loc": roi_loc, "roi_cls": roi_cls, "total": total}
