"""Training targets for the two stages of Faster R-CNN.

:class:`AnchorTargetCreator` labels the RPN's anchors as object / background /
ignored and gives each its regression target; :class:`ProposalTargetCreator`
samples the RoIs the head is trained on.  Both work on the whole batch at once,
on the inputs' device, without host synchronisation: ground truth is padded to
``[N, Gmax]`` with a validity mask, and random subsampling ranks candidates by
random priorities and keeps those whose rank is below a quota held in a
tensor, so no shape depends on the data.

Everything runs in float32 whatever the autocast state: IoU in float16 is too
coarse for 0.7 / 0.5 thresholds.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from detkit.boxes import box_iou, encode
from detkit.interfaces import AnchorTargetCreatorBase, ProposalTargetCreatorBase, SampledRoIs


def pad_ground_truth(
    gt_boxes: Sequence[Tensor], device: torch.device, gt_labels: Sequence[Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Pad per-image ground truth to a batch.

    Returns boxes ``[N, Gmax, 4]`` float32 (zeros as padding), valid ``[N, Gmax]``
    bool and, if ``gt_labels`` is given, labels ``[N, Gmax]`` int64 (-1 padding).
    ``Gmax >= 1`` so that reductions over the gt axis are defined even when no
    image has a box.
    """
    n = len(gt_boxes)
    boxes = [b.to(device=device, dtype=torch.float32).reshape(-1, 4) for b in gt_boxes]
    # A length-1 dummy keeps Gmax >= 1; it is dropped again right away.
    dummy = torch.zeros(1, 4, device=device)
    padded = pad_sequence([*boxes, dummy], batch_first=True)[:n]
    # The mask is padded the same way rather than built from a tensor of
    # counts: torch.tensor(list, device="cuda") is a blocking host-to-device copy.
    ones = [torch.ones(b.shape[0], dtype=torch.bool, device=device) for b in boxes]
    valid = pad_sequence([*ones, torch.zeros(1, dtype=torch.bool, device=device)], batch_first=True)[:n]
    labels = None
    if gt_labels is not None:
        lab = [l.to(device=device, dtype=torch.int64).reshape(-1) for l in gt_labels]
        labels = pad_sequence(
            [*lab, torch.full((1,), -1, dtype=torch.int64, device=device)],
            batch_first=True,
            padding_value=-1,
        )[:n]
    return padded, valid, labels


def rank_within(
    priority: Tensor, candidate: Tensor, group: Tensor | None = None, num_groups: int = 0
) -> Tensor:
    """Rank of each candidate among the candidates of its row (or group), by ``priority``.

    ``priority`` in [0, 1) and ``candidate``: ``[N, K]`` with ``group=None``
    (rank within each row), or ``[K]`` with ``group [K]`` int64 in
    ``0..num_groups-1`` (rank within each group).  Non-candidates rank after
    every candidate; their values mean nothing.
    """
    # Adding 1 puts non-candidates after every candidate.
    key = priority + (~candidate).to(priority.dtype)
    if group is None:
        order = key.argsort(dim=-1)
        ranks = torch.empty_like(order)
        ranks.scatter_(-1, order, torch.arange(key.shape[-1], device=key.device).expand_as(order))
        return ranks
    # Sort by key, then stably by group: groups are contiguous, each sorted by key.
    order = key.argsort()
    order = order[group[order].argsort(stable=True)]
    # Where each group starts in that order (index_add, not bincount: no sync).
    counts = torch.zeros(num_groups, dtype=torch.int64, device=key.device)
    counts.index_add_(0, group, torch.ones_like(group))
    first = counts.cumsum(0) - counts
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(key.numel(), device=key.device) - first[group[order]]
    return ranks


def _std_tensor(std: Sequence[float] | Tensor, like: Tensor, cache: dict) -> Tensor:
    """``std`` as a tensor on ``like``'s device, made once per (values, device).

    Creating it on every call would be a blocking host-to-device copy on CUDA.
    """
    if isinstance(std, Tensor):
        return std.to(device=like.device, dtype=like.dtype)
    key = (tuple(float(s) for s in std), str(like.device), like.dtype)
    if key not in cache:
        cache[key] = torch.tensor(key[0], dtype=like.dtype, device=like.device)
    return cache[key]


def _uniform(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> Tensor:
    return torch.rand(shape, generator=generator, device=device)


class AnchorTargetCreator(AnchorTargetCreatorBase):
    """Assigns ground truth to anchors for training the RPN.

    ``forward(gt_boxes: list of [G_i, 4], anchors [A, 4], image_sizes [N, 2] (h, w),
    generator=None) -> (gt_locs [N, A, 4], labels [N, A] int64)``.

    An anchor is positive (1) if its IoU with some gt box is ``>= pos_iou_thresh``
    or if it is (one of) the anchors with the highest IoU for some gt box (a gt
    whose best IoU is 0 claims nothing); negative (0) if its best IoU is
    ``< neg_iou_thresh``; otherwise ignored (-1).  Each image then keeps at most
    ``n_sample * pos_ratio`` random positives and fills up to ``n_sample`` with
    random negatives; the rest become -1.  ``gt_locs`` are the deltas
    (:func:`detkit.boxes.encode`, no std) from each anchor to its best-matching
    gt box; zero in images without ground truth.  With ``allowed_border`` set,
    anchors reaching more than that many pixels outside the image's true size
    are ignored and take no part in matching.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        n_sample: int = Field(256, gt=0, description="anchors sampled per image")
        pos_iou_thresh: float = Field(0.7, gt=0, le=1)
        neg_iou_thresh: float = Field(0.3, ge=0, le=1)
        pos_ratio: float = Field(0.5, ge=0, le=1, description="largest share of positives in a sample")
        allowed_border: float | None = Field(
            None, description="ignore anchors crossing the image border by more than this (px); null: keep all"
        )

        @model_validator(mode="after")
        def _ordered(self) -> "AnchorTargetCreator.Params":
            if self.neg_iou_thresh > self.pos_iou_thresh:
                raise ValueError("neg_iou_thresh must not exceed pos_iou_thresh")
            return self

    def __init__(self, params: Params | None = None):
        super().__init__()
        p = self.params = params if params is not None else self.Params()
        self.n_sample = p.n_sample
        self.pos_iou_thresh = p.pos_iou_thresh
        self.neg_iou_thresh = p.neg_iou_thresh
        self.pos_ratio = p.pos_ratio
        self.allowed_border = p.allowed_border

    @torch.no_grad()
    def forward(
        self,
        gt_boxes: Sequence[Tensor],
        anchors: Tensor,
        image_sizes: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        with torch.autocast(anchors.device.type, enabled=False):
            return self._create(gt_boxes, anchors.float(), image_sizes, generator)

    def _create(
        self,
        gt_boxes: Sequence[Tensor],
        anchors: Tensor,
        image_sizes: Tensor,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        device = anchors.device
        n, a = len(gt_boxes), anchors.shape[0]
        gt, valid, _ = pad_ground_truth(gt_boxes, device)
        g = gt.shape[1]

        sizes = image_sizes.to(device=device, dtype=torch.float32)
        h, w = sizes[:, 0:1], sizes[:, 1:2]
        # Anchors centred in the zero padding of a smaller image of the batch
        # are not negatives of that image: they see no image at all.
        cx = (anchors[None, :, 0] + anchors[None, :, 2]) * 0.5
        cy = (anchors[None, :, 1] + anchors[None, :, 3]) * 0.5
        inside = (cx < w) & (cy < h)
        if self.allowed_border is not None:
            b = float(self.allowed_border)
            inside = inside & (
                (anchors[None, :, 0] >= -b)
                & (anchors[None, :, 1] >= -b)
                & (anchors[None, :, 2] <= w + b)
                & (anchors[None, :, 3] <= h + b)
            )

        # [N*G, A] -> [N, G, A] (contiguous, anchors innermost); padding gt and
        # ignored anchors get IoU -1 so they neither match nor win a gt's "best anchor".
        iou = box_iou(gt.reshape(-1, 4), anchors).reshape(n, g, a)
        iou = iou.masked_fill(~(valid[:, :, None] & inside[:, None, :]), -1.0)

        max_iou, argmax = iou.max(dim=1)  # [N, A]
        gt_best = iou.max(dim=2, keepdim=True).values  # [N, G, 1]
        is_gt_best = ((iou == gt_best) & (gt_best > 0)).any(dim=1)

        # Images without gt: max_iou is -1 for every anchor, so all are negatives.
        negative = inside & (max_iou < self.neg_iou_thresh)
        positive = inside & ((max_iou >= self.pos_iou_thresh) | is_gt_best)
        negative &= ~positive

        priority = _uniform((n, a), device, generator)
        n_pos_max = int(self.n_sample * self.pos_ratio)
        keep_pos = positive & (rank_within(priority, positive) < n_pos_max)
        neg_quota = self.n_sample - keep_pos.sum(dim=1, keepdim=True)  # [N, 1] tensor
        keep_neg = negative & (rank_within(priority, negative) < neg_quota)

        labels = torch.full((n, a), -1, dtype=torch.int64, device=device)
        labels = labels.masked_fill(keep_neg, 0).masked_fill(keep_pos, 1)

        matched = gt.gather(1, argmax[..., None].expand(n, a, 4))
        locs = encode(anchors.expand(n, a, 4), matched)
        has_gt = valid.any(dim=1)[:, None, None]
        locs = torch.where(has_gt, locs, locs.new_zeros(()))
        return locs, labels

    def extra_repr(self) -> str:
        return (
            f"n_sample={self.n_sample}, pos_iou_thresh={self.pos_iou_thresh}, "
            f"neg_iou_thresh={self.neg_iou_thresh}, pos_ratio={self.pos_ratio}, "
            f"allowed_border={self.allowed_border}"
        )


class ProposalTargetCreator(ProposalTargetCreatorBase):
    """Samples the RoIs the head is trained on and gives their targets.

    ``forward(rois [R, 4], roi_indices [R] int64, gt_boxes: list of [G_i, 4],
    gt_labels: list of [G_i] int64 in 0..C-1, loc_normalize_std (4,),
    generator=None) -> (sample_rois [N*n_sample, 4], sample_roi_indices
    [N*n_sample], gt_roi_locs [N*n_sample, 4], gt_roi_labels [N*n_sample])``.

    Each image's gt boxes are added to its proposals.  A candidate whose best
    IoU with the image's gt is ``>= pos_iou_thresh`` is foreground (label = gt
    label + 1); one in ``[neg_iou_thresh_lo, neg_iou_thresh_hi)`` is background
    (0); an image without gt has IoU 0 everywhere.  Every image gets exactly
    ``n_sample`` rows, in image order: up to ``n_sample * pos_ratio`` random
    foreground, then random background, then padding rows (label -1, box of
    zeros) when there are too few candidates.  ``gt_roi_locs`` =
    ``encode(roi, matched gt) / loc_normalize_std`` on foreground rows, zero
    elsewhere.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        n_sample: int = Field(128, gt=0, description="RoIs sampled per image")
        pos_ratio: float = Field(0.5, ge=0, le=1, description="largest share of foreground in a sample")
        pos_iou_thresh: float = Field(0.5, gt=0, le=1)
        neg_iou_thresh_hi: float = Field(0.5, ge=0, le=1)
        neg_iou_thresh_lo: float = Field(0.0, ge=0, le=1)

        @model_validator(mode="after")
        def _ordered(self) -> "ProposalTargetCreator.Params":
            if self.neg_iou_thresh_lo > self.neg_iou_thresh_hi:
                raise ValueError("neg_iou_thresh_lo must not exceed neg_iou_thresh_hi")
            return self

    def __init__(self, params: Params | None = None):
        super().__init__()
        p = self.params = params if params is not None else self.Params()
        self.n_sample = p.n_sample
        self.pos_ratio = p.pos_ratio
        self.pos_iou_thresh = p.pos_iou_thresh
        self.neg_iou_thresh_hi = p.neg_iou_thresh_hi
        self.neg_iou_thresh_lo = p.neg_iou_thresh_lo
        self._std_cache: dict = {}

    @torch.no_grad()
    def forward(
        self,
        rois: Tensor,
        roi_indices: Tensor,
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        loc_normalize_std: Sequence[float] | Tensor,
        generator: torch.Generator | None = None,
    ) -> SampledRoIs:
        with torch.autocast(rois.device.type, enabled=False):
            return self._create(
                rois.detach().float(), roi_indices, gt_boxes, gt_labels, loc_normalize_std, generator
            )

    def _create(
        self,
        rois: Tensor,
        roi_indices: Tensor,
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
        loc_normalize_std: Sequence[float] | Tensor,
        generator: torch.Generator | None,
    ) -> SampledRoIs:
        device = rois.device
        n, s = len(gt_boxes), self.n_sample
        gt, valid, gt_lab = pad_ground_truth(gt_boxes, device, gt_labels)
        g = gt.shape[1]

        # Candidates: every proposal, then every padded gt slot (padding slots
        # are never sampled; keeping them avoids a data-dependent shape).
        gt_img = torch.arange(n, device=device)[:, None].expand(n, g).reshape(-1)
        cand = torch.cat((rois, gt.reshape(-1, 4)), dim=0)
        cand_img = torch.cat((roi_indices.to(device=device, dtype=torch.int64), gt_img))
        real = torch.cat((torch.ones_like(roi_indices, dtype=torch.bool, device=device), valid.reshape(-1)))
        k = cand.shape[0]

        # IoU of each candidate with the gt of its own image: [K, N*G] -> pick its row.
        iou = box_iou(cand, gt.reshape(-1, 4)).reshape(k, n, g)
        iou = iou.gather(1, cand_img[:, None, None].expand(k, 1, g)).squeeze(1)
        iou = iou.masked_fill(~valid[cand_img], -1.0)
        max_iou, argmax = iou.max(dim=1)
        max_iou = max_iou.clamp(min=0)  # no gt in the image: IoU 0 with everything

        positive = real & (max_iou >= self.pos_iou_thresh)
        negative = real & (max_iou < self.neg_iou_thresh_hi) & (max_iou >= self.neg_iou_thresh_lo)
        negative &= ~positive

        priority = _uniform((k,), device, generator)
        pos_rank = rank_within(priority, positive, cand_img, n)
        neg_rank = rank_within(priority, negative, cand_img, n)
        n_pos_max = int(s * self.pos_ratio)
        keep_pos = positive & (pos_rank < n_pos_max)
        pos_per_image = torch.zeros(n, dtype=torch.int64, device=device).index_add_(
            0, cand_img, keep_pos.to(torch.int64)
        )
        neg_offset = pos_per_image[cand_img]
        keep_neg = negative & (neg_rank < s - neg_offset)

        # Output slot of each kept candidate; the rest go to a dump row at the end.
        slot = torch.where(keep_pos, pos_rank, neg_offset + neg_rank)
        dest = torch.where(keep_pos | keep_neg, cand_img * s + slot, torch.full_like(slot, n * s))

        matched_gt = gt[cand_img, argmax]
        label = gt_lab[cand_img, argmax] + 1
        label = torch.where(keep_pos, label, torch.zeros_like(label))
        locs = encode(cand, matched_gt, _std_tensor(loc_normalize_std, cand, self._std_cache))
        locs = torch.where(keep_pos[:, None], locs, locs.new_zeros(()))

        sample_rois = rois.new_zeros(n * s + 1, 4)
        sample_rois[dest] = cand
        gt_roi_locs = rois.new_zeros(n * s + 1, 4)
        gt_roi_locs[dest] = locs
        gt_roi_labels = torch.full((n * s + 1,), -1, dtype=torch.int64, device=device)
        gt_roi_labels[dest] = label
        sample_roi_indices = torch.arange(n, device=device).repeat_interleave(s)
        return SampledRoIs(sample_rois[:-1], sample_roi_indices, gt_roi_locs[:-1], gt_roi_labels[:-1])

    def extra_repr(self) -> str:
        return (
            f"n_sample={self.n_sample}, pos_ratio={self.pos_ratio}, "
            f"pos_iou_thresh={self.pos_iou_thresh}, neg_iou_thresh_hi={self.neg_iou_thresh_hi}, "
            f"neg_iou_thresh_lo={self.neg_iou_thresh_lo}"
        )
