"""Anchor and proposal target creators on small hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch

from detkit.boxes import encode
from detkit.interfaces import SampledRoIs
from detkit.registry import ComponentValidationError, registry
from detkit_builtins.targets import AnchorTargetCreator, ProposalTargetCreator, rank_within

STD = (0.1, 0.1, 0.2, 0.2)


def boxes(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def sizes(*hw) -> torch.Tensor:
    return torch.tensor(hw, dtype=torch.int64).reshape(-1, 2)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def as_rows(t: torch.Tensor) -> list[tuple]:
    return sorted(tuple(r) for r in t.tolist())


NO_BOX = torch.zeros(0, 4)
NO_LABEL = torch.zeros(0, dtype=torch.int64)


# --------------------------------------------------------------------- helpers
def test_rank_within_rows_and_groups():
    pri = torch.tensor([[0.5, 0.1, 0.9, 0.3], [0.2, 0.8, 0.4, 0.6]])
    cand = torch.tensor([[True, True, False, True], [True, False, True, True]])
    ranks = rank_within(pri, cand)
    assert ranks[0][cand[0]].tolist() == [2, 0, 1]
    assert ranks[1][cand[1]].tolist() == [0, 1, 2]
    flat_p = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.2, 0.7])
    flat_c = torch.tensor([True, True, True, False, True, True])
    group = torch.tensor([0, 1, 0, 0, 1, 1])
    r = rank_within(flat_p, flat_c, group, 2)
    # group 0 candidates: 0.5, 0.9 -> 0, 1; group 1: 0.1, 0.2, 0.7 -> 0, 1, 2
    assert [r[i].item() for i in (0, 2, 1, 4, 5)] == [0, 1, 0, 1, 2]


# ------------------------------------------------------------ anchor targets
def test_anchor_labels_by_threshold_and_loc_targets():
    gt = boxes([0, 0, 10, 10])
    anchors = boxes(
        [0, 0, 10, 10],  # IoU 1     -> 1
        [0, 0, 10, 12],  # IoU 0.833 -> 1
        [0, 0, 10, 20],  # IoU 0.5   -> -1
        [0, 0, 10, 40],  # IoU 0.25  -> 0
        [50, 50, 60, 60],  # IoU 0   -> 0
    )
    locs, labels = AnchorTargetCreator(AnchorTargetCreator.Params(n_sample=100))([gt], anchors, sizes(64, 64), gen())
    assert labels.tolist() == [[1, 1, -1, 0, 0]]
    assert torch.allclose(locs[0, 0], torch.zeros(4))
    # anchor 1: centre (5, 6), 10x12; gt centre (5, 5), 10x10
    assert torch.allclose(locs[0, 1], torch.tensor([0.0, -1 / 12, 0.0, math.log(10 / 12)]))
    assert torch.allclose(locs[0, 3], torch.tensor([0.0, -15 / 40, 0.0, math.log(10 / 40)]))


def test_anchor_every_gt_gets_its_best_anchors():
    gt = boxes([0, 0, 10, 10], [100, 100, 110, 110])  # the second overlaps no anchor
    anchors = boxes(
        [0, 0, 10, 20],  # IoU 0.5 with gt 0 (tied best) -> 1 despite < 0.7
        [0, 0, 20, 10],  # IoU 0.5 (tied best)            -> 1
        [0, 0, 10, 40],  # IoU 0.25                       -> 0
        [50, 50, 60, 60],  # IoU 0 with both: gt 1 claims nothing -> 0
    )
    locs, labels = AnchorTargetCreator(AnchorTargetCreator.Params(n_sample=100))([gt], anchors, sizes(128, 128), gen())
    assert labels.tolist() == [[1, 1, 0, 0]]
    # regression target of the best anchors is gt 0
    assert torch.allclose(locs[0, 0], encode(anchors[0], gt[0]))


def test_anchor_best_anchor_targets_its_argmax_gt():
    # anchor 0 is gt 0's best anchor but overlaps gt 1 more: it regresses onto gt 1.
    gt = boxes([0, 0, 10, 10], [0, 0, 10, 16])
    anchors = boxes([0, 0, 10, 14], [40, 40, 50, 50])
    locs, labels = AnchorTargetCreator(AnchorTargetCreator.Params(n_sample=100))([gt], anchors, sizes(64, 64), gen())
    assert labels[0, 0].item() == 1
    assert torch.allclose(locs[0, 0], encode(anchors[0], gt[1]))


@pytest.fixture
def crowded():
    """12 anchors equal to the gt box (positives) and 20 far away (negatives)."""
    gt = boxes([10, 10, 30, 30])
    anchors = torch.cat([gt.repeat(12, 1), boxes([60, 60, 70, 70]).repeat(20, 1)])
    return gt, anchors


def test_anchor_sampling_caps(crowded):
    gt, anchors = crowded
    atc = AnchorTargetCreator(AnchorTargetCreator.Params(n_sample=16, pos_ratio=0.25))
    _, labels = atc([gt, gt], anchors, sizes([96, 96], [96, 96]), gen())
    for lab in labels:
        assert (lab == 1).sum().item() == 4  # 16 * 0.25
        assert (lab == 0).sum().item() == 12  # filled up to 16
        assert (lab[:12] >= 0).sum().item() == 4 and (lab[12:] == 1).sum().item() == 0


def test_anchor_sampling_fills_with_negatives_when_few_positives(crowded):
    gt, anchors = crowded
    anchors = anchors[11:]  # one positive, 20 negatives
    _, labels = AnchorTargetCreator(AnchorTargetCreator.Params(n_sample=8, pos_ratio=0.5))([gt], anchors, sizes(96, 96), gen())
    assert (labels == 1).sum().item() == 1
    assert (labels == 0).sum().item() == 7
    # too few negatives: all of them are kept
    _, labels = AnchorTargetCreator(AnchorTargetCreator.Params(n_sample=64))([gt], anchors, sizes(96, 96), gen())
    assert (labels == 1).sum().item() == 1 and (labels == 0).sum().item() == 20


def test_anchor_empty_ground_truth(crowded):
    gt, anchors = crowded
    atc = AnchorTargetCreator(AnchorTargetCreator.Params(n_sample=10))
    locs, labels = atc([NO_BOX, gt], anchors, sizes([96, 96], [96, 96]), gen())
    assert (labels[0] == 1).sum().item() == 0 and (labels[0] == 0).sum().item() == 10
    assert torch.equal(locs[0], torch.zeros_like(locs[0]))
    assert (labels[1] == 1).sum().item() == 5
    # no image has a box at all
    locs, labels = atc([NO_BOX, NO_BOX], anchors, sizes([96, 96], [96, 96]), gen())
    assert labels.shape == (2, 32) and ((labels == 0).sum(dim=1) == 10).all()
    assert ((labels == 0) | (labels == -1)).all() and not locs.any()


def test_anchor_gt_of_another_image_is_not_matched(crowded):
    gt, anchors = crowded
    _, labels = AnchorTargetCreator(AnchorTargetCreator.Params(n_sample=100))([NO_BOX, gt], anchors, sizes([96, 96], [96, 96]))
    assert (labels[0] == 0).all()
    assert (labels[1][:12] == 1).all()


def test_anchor_reproducible_with_seed(crowded):
    gt, anchors = crowded
    atc = AnchorTargetCreator(AnchorTargetCreator.Params(n_sample=8, pos_ratio=0.5))
    args = ([gt, gt], anchors, sizes([96, 96], [96, 96]))
    a = atc(*args, generator=gen(3))[1]
    b = atc(*args, generator=gen(3))[1]
    assert torch.equal(a, b)
    others = [atc(*args, generator=gen(s))[1] for s in range(4, 8)]
    assert any(not torch.equal(a, o) for o in others)


def test_anchor_batch_independence(crowded):
    gt, anchors = crowded
    atc = AnchorTargetCreator(AnchorTargetCreator.Params(n_sample=8, pos_ratio=0.5))
    shifted = gt + 2
    base = atc([gt, gt], anchors, sizes([96, 96], [96, 96]), gen(1))
    changed = atc([gt, torch.cat([shifted, gt + 40])], anchors, sizes([96, 96], [96, 96]), gen(1))
    assert torch.equal(base[1][0], changed[1][0])
    assert torch.equal(base[0][0], changed[0][0])
    assert not torch.equal(base[0][1], changed[0][1])


def test_anchor_allowed_border_uses_each_image_true_size():
    gt = boxes([0, 0, 30, 30])
    anchors = boxes([0, 0, 30, 30], [0, 0, 10, 10], [-4, -4, 6, 6])
    atc = AnchorTargetCreator(AnchorTargetCreator.Params(n_sample=100, allowed_border=0))
    _, labels = atc([gt, gt], anchors, sizes([20, 20], [40, 40]), gen())
    # image 0 (20x20): anchor 0 crosses the border -> ignored even with IoU 1;
    # anchor 1 becomes gt's best inside anchor (IoU 1/9) -> positive.
    assert labels[0].tolist() == [-1, 1, -1]
    assert labels[1].tolist() == [1, 0, -1]
    _, labels = AnchorTargetCreator(AnchorTargetCreator.Params(n_sample=100, allowed_border=5))([gt], anchors, sizes(40, 40), gen())
    assert labels[0].tolist() == [1, 0, 0]
    _, labels = AnchorTargetCreator(AnchorTargetCreator.Params(n_sample=100))([gt], anchors, sizes(20, 20), gen())
    assert labels[0].tolist() == [1, 0, 0]


def test_anchor_target_is_float32_under_autocast():
    gt = boxes([0.0, 0.0, 10.0, 10.0])
    anchors = boxes([0, 0, 10, 12]).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        locs, labels = AnchorTargetCreator(AnchorTargetCreator.Params(n_sample=4))([gt], anchors, sizes(16, 16))
    assert locs.dtype == torch.float32 and labels.tolist() == [[1]]


# ---------------------------------------------------------- proposal targets
def test_proposal_hand_case_order_labels_locs():
    gt = boxes([0, 0, 10, 10])
    rois = boxes(
        [0, 0, 10, 12],  # IoU 0.833 -> fg
        [0, 0, 10, 40],  # IoU 0.25  -> bg
        [0, 0, 10, 20],  # IoU 0.5   -> fg (>= 0.5)
        [50, 50, 60, 60],  # IoU 0   -> bg
    )
    ptc = ProposalTargetCreator(ProposalTargetCreator.Params(n_sample=8, pos_ratio=0.5))
    sampled = ptc(rois, torch.zeros(4, dtype=torch.int64), [gt], [torch.tensor([1])], STD, gen())
    assert isinstance(sampled, SampledRoIs)
    out_rois, out_idx, locs, labels = sampled.boxes, sampled.image_indices, sampled.loc_targets, sampled.labels
    assert out_rois.shape == (8, 4) and out_idx.tolist() == [0] * 8
    assert labels.tolist() == [2, 2, 2, 0, 0, -1, -1, -1]
    assert as_rows(out_rois[:3]) == as_rows(torch.cat([rois[[0, 2]], gt]))
    assert as_rows(out_rois[3:5]) == as_rows(rois[[1, 3]])
    assert torch.equal(out_rois[5:], torch.zeros(3, 4))
    for r, l in zip(out_rois[:3], locs[:3]):
        assert torch.allclose(l, encode(r, gt[0]) / torch.tensor(STD))
    row = [i for i in range(3) if out_rois[i].tolist() == [0, 0, 10, 12]][0]
    assert torch.allclose(locs[row], torch.tensor([0.0, (-1 / 12) / 0.1, 0.0, math.log(10 / 12) / 0.2]))
    assert torch.equal(locs[3:], torch.zeros(5, 4))


def test_proposal_labels_follow_matched_gt():
    gt = boxes([0, 0, 10, 10], [40, 40, 60, 60])
    rois = boxes([0, 0, 10, 11], [40, 40, 60, 62])
    _, _, _, labels = ProposalTargetCreator(ProposalTargetCreator.Params(n_sample=4, pos_ratio=1.0))(
        rois, torch.zeros(2, dtype=torch.int64), [gt], [torch.tensor([4, 0])], STD
    )
    # two rois + two appended gt boxes: each labelled by its own gt (+1)
    assert sorted(labels.tolist()) == [1, 1, 5, 5]


def test_proposal_sampling_caps():
    gt = boxes([10, 10, 30, 30])
    rois = torch.cat([gt.repeat(10, 1), boxes([60, 60, 70, 70]).repeat(10, 1)])
    ptc = ProposalTargetCreator(ProposalTargetCreator.Params(n_sample=8, pos_ratio=0.25))
    _, _, _, labels = ptc(rois, torch.zeros(20, dtype=torch.int64), [gt], [torch.tensor([0])], STD, gen())
    assert labels.tolist() == [1, 1, 0, 0, 0, 0, 0, 0]


def test_proposal_negative_lower_threshold():
    gt = boxes([0, 0, 10, 10])
    rois = boxes([0, 0, 10, 40], [50, 50, 60, 60])  # IoU 0.25 and 0
    ptc = ProposalTargetCreator(ProposalTargetCreator.Params(n_sample=4, pos_ratio=0.25, neg_iou_thresh_lo=0.1))
    out, _, _, labels = ptc(rois, torch.zeros(2, dtype=torch.int64), [gt], [torch.tensor([0])], STD)
    assert labels.tolist() == [1, 0, -1, -1]
    assert out[1].tolist() == [0, 0, 10, 40]


def test_proposal_empty_ground_truth_gives_background_only():
    rois = boxes([0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 40])
    gt = boxes([0, 0, 10, 10])
    out, idx, locs, labels = ProposalTargetCreator(ProposalTargetCreator.Params(n_sample=4))(
        torch.cat([rois, rois]), torch.tensor([0, 0, 0, 1, 1, 1]), [NO_BOX, gt], [NO_LABEL, torch.tensor([2])], STD
    )
    assert idx.tolist() == [0] * 4 + [1] * 4
    assert labels[:4].tolist() == [0, 0, 0, -1]
    assert as_rows(out[:3]) == as_rows(rois)
    assert not locs[:4].any()
    assert labels[4] == 3  # image 1 still matches its own gt
    # no image has ground truth at all
    _, _, _, labels = ProposalTargetCreator(ProposalTargetCreator.Params(n_sample=2))(rois, torch.zeros(3, dtype=torch.int64), [NO_BOX], [NO_LABEL], STD)
    assert labels.tolist() == [0, 0]


def test_proposal_images_only_see_their_own_rois_and_gt():
    gt0, gt1 = boxes([0, 0, 10, 10]), boxes([40, 40, 50, 50])
    rois = boxes([40, 40, 50, 51], [0, 0, 10, 11], [0, 0, 10, 11], [40, 40, 50, 51])
    idx = torch.tensor([1, 0, 1, 0])
    ptc = ProposalTargetCreator(ProposalTargetCreator.Params(n_sample=4, pos_ratio=0.5))
    out, out_idx, _, labels = ptc(rois, idx, [gt0, gt1], [torch.tensor([0]), torch.tensor([1])], STD, gen())
    # image 0: its fg roi + its gt; bg: its roi that only overlaps image 1's gt
    assert labels.tolist() == [1, 1, 0, -1, 2, 2, 0, -1]
    assert as_rows(out[:2]) == as_rows(torch.cat([rois[1:2], gt0]))
    assert out[2].tolist() == [40, 40, 50, 51]
    assert as_rows(out[4:6]) == as_rows(torch.cat([rois[3:4], gt1]))
    assert out[6].tolist() == [0, 0, 10, 11]


def test_proposal_batch_independence_without_subsampling():
    g = torch.Generator().manual_seed(0)
    gts = [boxes([4, 4, 30, 30], [20, 10, 60, 50]), boxes([8, 8, 40, 40])]
    labels_in = [torch.tensor([0, 2]), torch.tensor([1])]
    rois = torch.rand(30, 2, generator=g) * 40
    rois = torch.cat([rois, rois + 5 + torch.rand(30, 2, generator=g) * 30], dim=1)
    idx = torch.randint(0, 2, (30,), generator=g)
    ptc = ProposalTargetCreator(ProposalTargetCreator.Params(n_sample=64, pos_ratio=1.0))
    both = ptc(rois, idx, gts, labels_in, STD, gen())
    for i in range(2):
        alone = ptc(rois[idx == i], torch.zeros(int((idx == i).sum()), dtype=torch.int64), gts[i : i + 1], labels_in[i : i + 1], STD, gen())
        part = slice(64 * i, 64 * (i + 1))
        key = lambda r, l, y: sorted(zip(map(tuple, r.tolist()), map(tuple, l.tolist()), y.tolist()))  # noqa: E731
        assert key(both[0][part], both[2][part], both[3][part]) == key(alone[0], alone[2], alone[3])


def test_proposal_reproducible_with_seed():
    gt = boxes([10, 10, 30, 30])
    rois = torch.cat([gt.repeat(10, 1) + torch.arange(10.0)[:, None], boxes([60, 60, 70, 70]).repeat(10, 1)])
    ptc = ProposalTargetCreator(ProposalTargetCreator.Params(n_sample=6, pos_ratio=0.5))
    args = (rois, torch.zeros(20, dtype=torch.int64), [gt], [torch.tensor([0])], STD)
    a = ptc(*args, generator=gen(5))[0]
    assert torch.equal(a, ptc(*args, generator=gen(5))[0])
    assert any(not torch.equal(a, ptc(*args, generator=gen(s))[0]) for s in range(6, 10))


def test_target_creators_built_through_registry():
    atc = registry("target_creator").build({"type": "anchor_target", "n_sample": 32, "allowed_border": 0})
    assert isinstance(atc, AnchorTargetCreator) and atc.n_sample == 32 and atc.allowed_border == 0
    ptc = registry("target_creator").build({"type": "proposal_target", "n_sample": 16})
    assert isinstance(ptc, ProposalTargetCreator) and ptc.n_sample == 16
    with pytest.raises(ComponentValidationError, match="neg_iou_thresh"):
        registry("target_creator").validate({"type": "anchor_target", "neg_iou_thresh": 0.8})


# ---------------------------------------------------------- no host syncs
@pytest.fixture
def no_host_reads(monkeypatch):
    """Make every Python-level read of tensor data fail (what would sync a GPU)."""

    def forbidden(self, *args, **kwargs):
        raise AssertionError("tensor data read on the host")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)


def test_target_creators_never_read_tensor_data(crowded, no_host_reads):
    gt, anchors = crowded
    image_sizes = sizes([96, 96], [96, 96])
    locs, labels = AnchorTargetCreator(AnchorTargetCreator.Params(n_sample=16, allowed_border=0))([gt, NO_BOX], anchors, image_sizes, gen())
    out = ProposalTargetCreator(ProposalTargetCreator.Params(n_sample=8))(
        anchors, torch.zeros(32, dtype=torch.int64), [gt, NO_BOX], [torch.tensor([1]), NO_LABEL], STD, gen()
    )
    assert labels.shape == (2, 32) and out[3].shape == (16,)


def test_no_host_reads_fixture_catches_a_read(no_host_reads):
    with pytest.raises(AssertionError, match="host"):
        torch.ones(2).sum().item()
    with pytest.raises(AssertionError, match="host"):
        bool(torch.ones(()) > 0)


def test_anchors_in_the_padding_of_a_smaller_image_are_ignored():
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0], [40.0, 40.0, 56.0, 56.0]])
    gt = [torch.tensor([[30.0, 30.0, 60.0, 60.0]]), torch.zeros(0, 4)]
    _, labels = AnchorTargetCreator(AnchorTargetCreator.Params(n_sample=100))(gt, anchors, sizes(64, 64, 32, 32), gen())
    assert labels[0].tolist() == [0, 1]  # image 0 is 64x64: both anchors see it
    assert labels[1].tolist() == [0, -1]  # image 1 is 32x32: the second anchor lies in its padding


def test_constructors_take_their_validated_params():
    """Defaults live once, in Params: the constructor reads them from there."""
    atc = AnchorTargetCreator()
    assert atc.params == AnchorTargetCreator.Params()
    assert atc.n_sample == AnchorTargetCreator.Params().n_sample
    ptc = ProposalTargetCreator(ProposalTargetCreator.Params(n_sample=7))
    assert ptc.n_sample == 7 and ptc.pos_ratio == ProposalTargetCreator.Params().pos_ratio
    with pytest.raises(Exception, match="neg_iou_thresh"):
        AnchorTargetCreator.Params(pos_iou_thresh=0.3, neg_iou_thresh=0.5)  # validated when the Params are made
