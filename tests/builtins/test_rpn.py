"""Region proposal network (its outputs and its own losses) and proposal creator."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from detkit.errors import ConfigError
from detkit.interfaces import ImageBatch, Proposals
from detkit.registry import registry
from detkit_builtins.rpn import ProposalCreator, ProposalParams, RegionProposalNetwork


def creator(**kw) -> ProposalCreator:
    return ProposalCreator(ProposalParams(**kw)).eval()


def image_batch(sizes: torch.Tensor, input_size: tuple[int, int]) -> ImageBatch:
    """What the preprocessing would hand the RPN: padded ``input_size``, true ``sizes``, scale 1."""
    n = sizes.shape[0]
    return ImageBatch(torch.zeros(n, 3, *input_size), sizes, sizes, torch.ones(n))


def rpn_outputs(rpn, feats, sizes, input_size):
    """``(proposals, locs, scores, anchors)`` of an eval-mode RPN."""
    proposals, losses = rpn(feats, image_batch(sizes, input_size))
    assert losses == {}
    locs, scores = rpn._head(feats)
    anchors = rpn.anchors([tuple(feats.shape[-2:])], input_size)
    return proposals, locs, scores, anchors


def test_hand_computed_decode_clip_min_size_and_order():
    anchors = torch.tensor(
        [
            [0.0, 0.0, 20.0, 20.0],  # moved right by 0.5 * 20 = 10 px -> [10, 0, 30, 20]
            [40.0, 40.0, 60.0, 60.0],  # grows x2 around its centre -> [30, 30, 70, 70], clipped to 64
            [0.0, 0.0, 10.0, 10.0],  # 10 px < min_size 16: dropped
        ]
    )
    locs = torch.tensor([[[0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.6931472, 0.6931472], [0.0, 0.0, 0.0, 0.0]]])
    scores = torch.tensor([[0.2, 0.9, 0.99]])
    sizes = torch.tensor([[64, 64]])
    rois, idx = creator()(locs, scores, anchors, sizes)
    expected = torch.tensor([[30.0, 30.0, 64.0, 64.0], [10.0, 0.0, 30.0, 20.0]])  # best first
    assert torch.allclose(rois, expected, atol=1e-4)
    assert idx.tolist() == [0, 0] and idx.dtype == torch.int64


def test_min_size_scales_with_scale_argument_per_image():
    anchors = torch.tensor([[0.0, 0.0, 20.0, 20.0]])
    locs = torch.zeros(2, 1, 4)
    scores = torch.ones(2, 1)
    sizes = torch.tensor([[100, 100], [100, 100]])
    # min size 16 * 2 = 32 > 20 for image 1 only.
    rois, idx = creator()(locs, scores, anchors, sizes, scale=torch.tensor([1.0, 2.0]))
    assert idx.tolist() == [0]
    rois, idx = creator()(locs, scores, anchors, sizes, scale=2.0)
    assert rois.shape == (0, 4)


def test_nms_and_topk_limits():
    # Five nearly identical boxes and one apart; NMS leaves two; post_nms=1 leaves the best.
    anchors = torch.tensor(
        [[0.0, 0, 32, 32], [1.0, 0, 33, 32], [0.0, 1, 32, 33], [1.0, 1, 33, 33], [2.0, 2, 34, 34], [60.0, 60, 92, 92]]
    )
    locs = torch.zeros(1, 6, 4)
    scores = torch.tensor([[0.5, 0.6, 0.7, 0.8, 0.9, 0.1]])
    sizes = torch.tensor([[100, 100]])
    rois, _ = creator()(locs, scores, anchors, sizes)
    assert torch.allclose(rois, anchors[[4, 5]])
    rois, _ = creator(test_post_nms=1)(locs, scores, anchors, sizes)
    assert torch.allclose(rois, anchors[[4]])
    # pre_nms=2 keeps only the two best before NMS: both overlap, one survives.
    rois, _ = creator(test_pre_nms=2)(locs, scores, anchors, sizes)
    assert torch.allclose(rois, anchors[[4]])


def test_train_and_test_counts_follow_module_mode():
    pc = creator(train_post_nms=2, test_post_nms=1)
    anchors = torch.tensor([[0.0, 0, 20, 20], [50.0, 50, 70, 70], [0.0, 50, 20, 70]])
    args = (torch.zeros(1, 3, 4), torch.tensor([[0.3, 0.2, 0.1]]), anchors, torch.tensor([[100, 100]]))
    assert pc.train()(*args)[0].shape[0] == 2
    assert pc.eval()(*args)[0].shape[0] == 1


@pytest.fixture
def rpn() -> RegionProposalNetwork:
    torch.manual_seed(0)
    net = registry("proposal_generator").build(
        {"type": "rpn", "mid_channels": 16, "proposal": {"test_pre_nms": 200, "test_post_nms": 30}},
        in_channels=8,
        feat_stride=16,
    )
    # Larger weights than the 0.01 init so that deltas and scores vary.
    for p in net.parameters():
        p.data.normal_(0, 0.3)
    return net.eval()


def test_rpn_output_shapes_and_invariants(rpn):
    feats = torch.randn(2, 8, 6, 8)
    sizes = torch.tensor([[96, 128], [70, 90]])
    out, locs, scores, anchors = rpn_outputs(rpn, feats, sizes, (96, 128))
    assert isinstance(out, Proposals)
    assert locs.shape == (2, 6 * 8 * 9, 4) and scores.shape == (2, 6 * 8 * 9, 2)
    assert anchors.shape == (6 * 8 * 9, 4)
    assert out.boxes.shape[0] == out.image_indices.shape[0] > 0
    for i in range(2):
        r = out.boxes[out.image_indices == i]
        h, w = sizes[i].tolist()
        assert 0 < r.shape[0] <= 30
        assert (r[:, 0] >= 0).all() and (r[:, 2] <= w).all() and (r[:, 1] >= 0).all() and (r[:, 3] <= h).all()
        assert ((r[:, 2] - r[:, 0]) >= 16).all() and ((r[:, 3] - r[:, 1]) >= 16).all()
        iou = box_iou(r, r).fill_diagonal_(0)
        assert iou.max() <= 0.7 + 1e-6
    # grouped by image in batch order
    assert (out.image_indices.diff() >= 0).all()


def test_rpn_batch_independence(rpn):
    feats = torch.randn(3, 8, 6, 8)
    sizes = torch.tensor([[96, 128], [70, 90], [96, 100]])
    batch, locs, scores, anchors = rpn_outputs(rpn, feats, sizes, (96, 128))
    for i in range(3):
        alone = rpn_outputs(rpn, feats[i : i + 1], sizes[i : i + 1], (96, 128))[0]
        # Convolutions may round differently for a batch of 1: compare closely, not bitwise.
        mine = batch.boxes[batch.image_indices == i]
        assert mine.shape == alone.boxes.shape and mine.shape[0] > 0
        assert torch.allclose(mine, alone.boxes, atol=1e-3)
    # The proposal creator itself is exactly independent of the other images.
    pc = rpn.proposal_creator
    fg = torch.softmax(scores, -1)[..., 1]
    rois, idx = pc(locs, fg, anchors, sizes)
    for i in range(3):
        alone, _ = pc(locs[i : i + 1], fg[i : i + 1], anchors, sizes[i : i + 1])
        assert torch.equal(rois[idx == i], alone)


def test_rpn_layout_matches_reference_reshape(rpn):
    # Channel k*2+j of the score conv at cell (y, x) is anchor (y*W + x)*9 + k, class j.
    feats = torch.randn(1, 8, 3, 4)
    _, _, scores, _ = rpn_outputs(rpn, feats, torch.tensor([[48, 64]]), (48, 64))
    raw = rpn.score(torch.relu(rpn.conv1(feats)))
    y, x, k = 2, 1, 5
    assert torch.allclose(scores[0, (y * 4 + x) * 9 + k], raw[0, 2 * k : 2 * k + 2, y, x])


def test_rpn_parts_take_their_validated_params():
    from detkit_builtins.anchors import AnchorGenerator, AnchorParams
    from detkit_builtins.rpn import ProposalParams, RegionProposalNetwork

    pc = ProposalCreator(ProposalParams(test_post_nms=5))
    assert pc.test_post_nms == 5 and pc.nms_iou == ProposalParams().nms_iou
    gen = AnchorGenerator(16, AnchorParams(scales=[2.0]))
    assert gen.num_per_cell == 3 and gen.offset == AnchorParams().offset
    rpn = RegionProposalNetwork(RegionProposalNetwork.Params(mid_channels=None), in_channels=8, feat_stride=16)
    assert rpn.conv1.out_channels == 8 and rpn.proposal_creator.params == ProposalParams()
    with pytest.raises(ConfigError, match="anchor.sizes"):
        RegionProposalNetwork(RegionProposalNetwork.Params(anchor={"sizes": [[32]]}), in_channels=8, feat_stride=16)
    with pytest.raises(ConfigError, match="2 levels, but the features have 3"):
        RegionProposalNetwork(RegionProposalNetwork.Params(anchor={"sizes": [[32], [64]]}), in_channels=8,
                              feat_stride=[4, 8, 16])


def test_small_boxes_removed_before_or_after_the_top_k():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 40.0, 40.0]])  # the first is under 16 px
    locs = torch.zeros(1, 2, 4)
    scores = torch.tensor([[0.9, 0.5]])
    sizes = torch.tensor([[64, 64]])
    # faster-rcnn-pytorch: the small box is dropped first, so the top 1 is the 40 px box.
    rois, _ = creator(test_pre_nms=1, min_size_before_topk=True)(locs, scores, anchors, sizes)
    assert rois.tolist() == [[0.0, 0.0, 40.0, 40.0]]
    # torchvision: the top 1 is taken first (the small box) and then removed: nothing is left.
    rois, _ = creator(test_pre_nms=1, min_size_before_topk=False)(locs, scores, anchors, sizes)
    assert rois.shape == (0, 4)


def test_levels_take_their_own_top_k_and_nms_separately():
    # Two levels with one identical box each: NMS runs per level, so both survive.
    anchors = torch.tensor([[0.0, 0.0, 40.0, 40.0], [0.0, 0.0, 40.0, 40.0], [8.0, 8.0, 48.0, 48.0]])
    locs = torch.zeros(1, 3, 4)
    scores = torch.tensor([[0.9, 0.8, 0.7]])
    sizes = torch.tensor([[64, 64]])
    rois, _ = creator(test_pre_nms=1)(locs, scores, anchors, sizes, num_per_level=[1, 2])
    # level 0 keeps its box; level 1 keeps only its best (pre_nms=1 per level).
    assert rois.tolist() == [[0.0, 0.0, 40.0, 40.0], [0.0, 0.0, 40.0, 40.0]]
    rois, _ = creator(test_pre_nms=5)(locs, scores, anchors, sizes, num_per_level=[1, 2])
    assert len(rois) == 3  # IoU of the two level-1 boxes is 1024 / 2176 < 0.7: no suppression
    rois, _ = creator(test_pre_nms=5)(locs, scores, anchors, sizes)  # one level: the duplicate goes
    assert len(rois) == 2


def test_rpn_trains_with_its_own_anchor_target_and_losses():
    """Train mode: the RPN labels its anchors with its anchor_target slot and scores them with its losses."""
    from torch.nn import functional as F

    torch.manual_seed(0)
    rpn = registry("proposal_generator").build(
        {"type": "rpn", "mid_channels": 16, "anchor_target": {"type": "anchor_target", "n_sample": 24},
         "cls_loss": {"type": "cross_entropy"}, "loc_loss": {"type": "smooth_l1", "sigma": 3.0}},
        in_channels=8, feat_stride=16,
    ).train()
    assert rpn.anchor_target.n_sample == 24 and rpn.loc_loss.sigma == 3.0
    feats = torch.randn(2, 8, 6, 8, requires_grad=True)
    sizes = torch.tensor([[96, 128], [80, 100]])
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([0])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    rpn.generator = torch.Generator().manual_seed(7)
    proposals, losses = rpn(feats, image_batch(sizes, (96, 128)), targets)
    assert set(losses) == {"rpn_loc", "rpn_cls"} and proposals.boxes.shape[0] > 0
    # The same sampling, by hand: the labels the RPN's own creator draws with the same generator.
    locs, scores = rpn._head(feats)
    anchors = rpn.anchors([(6, 8)], (96, 128))
    gt_locs, labels = rpn.anchor_target([t["boxes"] for t in targets], anchors, sizes,
                                        generator=torch.Generator().manual_seed(7))
    assert (labels == 1).any() and int((labels >= 0).sum()) <= 2 * 24
    expected_cls = F.cross_entropy(scores.reshape(-1, 2), labels.reshape(-1), ignore_index=-1)
    assert torch.allclose(losses["rpn_cls"], expected_cls, atol=1e-6)
    expected_loc = rpn.loc_loss(locs.reshape(-1, 4), gt_locs.reshape(-1, 4), labels.reshape(-1))
    assert torch.allclose(losses["rpn_loc"], expected_loc, atol=1e-6) and losses["rpn_loc"] > 0
    (losses["rpn_loc"] + losses["rpn_cls"]).backward()
    assert rpn.score.weight.grad.abs().sum() > 0 and feats.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="targets"):
        rpn(feats, image_batch(sizes, (96, 128)))


def test_score_threshold_drops_low_object_probabilities_and_is_off_by_default():
    anchors = torch.tensor([[0.0, 0.0, 20.0, 20.0], [30.0, 30.0, 60.0, 60.0], [0.0, 40.0, 20.0, 60.0]])
    locs = torch.zeros(1, 3, 4)
    # object log-odds whose probabilities are 0.9, 0.04 and 0.05: the second under 0.05, the third at it
    scores = torch.logit(torch.tensor([[0.9, 0.04, 0.05]]))
    sizes = torch.tensor([[64, 64]])
    rois, _ = creator(min_size=0.0)(locs, scores, anchors, sizes)
    assert rois.shape == (3, 4)
    for before_topk in (True, False):
        rois, idx = creator(min_size=0.0, score_thresh=0.05, min_size_before_topk=before_topk)(
            locs, scores, anchors, sizes)
        assert rois.tolist() == [anchors[0].tolist(), anchors[2].tolist()] and idx.tolist() == [0, 0]


def test_confident_anchors_keep_their_order(rpn):
    """Object logits far above the background saturate softmax to exactly 1.0 in float32.

    Ranked by that probability, anchors scored 17..25 would tie and the pre-NMS top-k would
    pick among them arbitrarily (torchvision, which ranks the raw objectness, keeps their
    order). The RPN ranks by the log-odds: every anchor of a cell gets its own score.
    """
    with torch.no_grad():
        rpn.score.weight.zero_()
        rpn.score.bias.zero_()
        rpn.score.bias[1::2] = 17.0 + torch.arange(rpn.score.bias.numel() // 2, dtype=torch.float32)
    assert torch.softmax(torch.tensor([0.0, 17.0]), 0)[1] == 1.0  # the saturation this guards against
    seen = {}

    def capture(module, args):
        seen["fg"] = args[1]

    handle = rpn.proposal_creator.register_forward_pre_hook(capture)
    try:
        rpn(torch.randn(1, 8, 3, 4), image_batch(torch.tensor([[48, 64]]), (48, 64)))
    finally:
        handle.remove()
    per_cell = seen["fg"][0, :9]
    assert torch.unique(per_cell).numel() == 9
    assert torch.equal(per_cell.argsort(descending=True), torch.arange(8, -1, -1))
