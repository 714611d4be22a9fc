"""Smooth L1 and cross entropy against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from detkit.registry import ComponentValidationError, registry
from detkit_builtins.losses import CrossEntropyLoss, SmoothL1Loss


@pytest.fixture
def deltas():
    pred = torch.tensor(
        [
            [0.5, 2.0, 0.0, 0.0],  # positive
            [0.05, -0.5, 0.0, 0.0],  # positive (label 2 counts too)
            [9.0, 9.0, 9.0, 9.0],  # background: ignored
            [float("nan"), 0.0, 0.0, 0.0],  # padding: ignored, must not leak NaN
        ]
    )
    target = torch.zeros(4, 4)
    labels = torch.tensor([1, 2, 0, -1])
    return pred, target, labels


def test_smooth_l1_sigma_1(deltas):
    pred, target, labels = deltas
    # row 0: 0.5*0.5^2 + (2 - 0.5) = 1.625; row 1: 0.5*0.05^2 + 0.5*0.5^2 = 0.12625
    expected = (1.625 + 0.12625) / 2
    assert SmoothL1Loss(SmoothL1Loss.Params(sigma=1.0))(pred, target, labels).item() == pytest.approx(expected)


def test_smooth_l1_sigma_3(deltas):
    pred, target, labels = deltas
    # sigma^2 = 9, knee at 1/9: |0.5| and |2| and |0.5| are linear, 0.05 quadratic.
    row0 = (0.5 - 0.5 / 9) + (2.0 - 0.5 / 9)
    row1 = 0.5 * 9 * 0.05**2 + (0.5 - 0.5 / 9)
    assert SmoothL1Loss(SmoothL1Loss.Params(sigma=3.0))(pred, target, labels).item() == pytest.approx((row0 + row1) / 2)


def test_smooth_l1_uses_target_offset():
    pred = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    target = torch.tensor([[1.0, 0.0, 3.0, 1.5]])
    # diffs 0, 1, 2, 0.5 -> 0 + 0.5 + 1.5 + 0.125
    assert SmoothL1Loss()(pred, target, torch.tensor([1])).item() == pytest.approx(2.125)


def test_smooth_l1_no_positive_is_zero_with_gradient():
    pred = torch.ones(3, 4, requires_grad=True)
    loss = SmoothL1Loss()(pred, torch.zeros(3, 4), torch.tensor([0, -1, 0]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros(3, 4))


def test_smooth_l1_gradient_only_on_positives(deltas):
    pred, target, labels = deltas
    pred = pred.clone().requires_grad_(True)
    SmoothL1Loss()(pred, target, labels).backward()
    # d/dx: x inside the knee, sign(x) outside; divided by 2 positives.
    assert torch.allclose(pred.grad[0], torch.tensor([0.25, 0.5, 0.0, 0.0]))
    assert torch.allclose(pred.grad[1], torch.tensor([0.025, -0.25, 0.0, 0.0]))
    assert torch.equal(pred.grad[2:], torch.zeros(2, 4))


def test_cross_entropy_mean_over_non_ignored():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0], [1.0, 3.0]])
    labels = torch.tensor([0, 1, -1, 0])
    lse = lambda a, b: math.log(math.exp(a) + math.exp(b))  # noqa: E731
    expected = ((lse(2, 0) - 2) + (lse(0, 1) - 1) + (lse(1, 3) - 1)) / 3
    assert CrossEntropyLoss()(logits, labels).item() == pytest.approx(expected)


def test_cross_entropy_all_ignored_is_zero():
    loss = CrossEntropyLoss()(torch.randn(4, 3), torch.full((4,), -1))
    assert loss.item() == 0.0


def test_cross_entropy_custom_ignore_index():
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    loss = CrossEntropyLoss(CrossEntropyLoss.Params(ignore_index=1))(logits, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(math.log(2))


def test_losses_accept_low_precision_inputs():
    pred = torch.tensor([[0.5, 0.0, 0.0, 0.0]], dtype=torch.bfloat16)
    loss = SmoothL1Loss()(pred, torch.zeros(1, 4), torch.tensor([1]))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(0.125)


def test_built_through_registry():
    loss = registry("loss").build({"type": "smooth_l1", "sigma": 3.0})
    assert isinstance(loss, SmoothL1Loss) and loss.sigma == 3.0
    assert registry("loss").build("cross_entropy").ignore_index == -1
    with pytest.raises(ComponentValidationError, match="sigma"):
        registry("loss").validate({"type": "smooth_l1", "sigma": -1})
    with pytest.raises(ComponentValidationError, match="sigmaa"):
        registry("loss").validate({"type": "smooth_l1", "sigmaa": 1})


# --------------------------------------------------------------------------- giou
def giou(a, b):
    """Generalized IoU of two (x1, y1, x2, y2) boxes, by hand."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    union = area(a) + area(b) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def test_giou_against_hand_computed_value():
    from detkit import boxes as box_ops
    from detkit.interfaces import MatchedBoxes
    from detkit_builtins.losses import GIoULoss

    ref = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 30.0, 20.0], [0.0, 0.0, 4.0, 4.0]])
    gt = torch.tensor([[2.0, 1.0, 12.0, 9.0], [15.0, 5.0, 40.0, 25.0], [0.0, 0.0, 1.0, 1.0]])
    std = (0.1, 0.1, 0.2, 0.2)
    target = box_ops.encode(ref, gt, std)
    pred = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, -0.5, 0.5, 0.25], [float("nan"), 0.0, 0.0, 0.0]])
    labels = torch.tensor([1, 3, -1])  # the third row is ignored (and its NaN must not leak)
    boxes = MatchedBoxes(ref, target, std)
    assert torch.allclose(boxes.gt, gt, atol=1e-4)  # the matched boxes are recovered from the targets
    predicted = box_ops.decode(ref[:2], pred[:2], std).tolist()
    expected = sum(1 - giou(p, g) for p, g in zip(predicted, gt[:2].tolist())) / 2
    pred.requires_grad_(True)
    loss = GIoULoss(GIoULoss.Params(weight=2.0))(pred, target, labels, boxes=boxes)
    assert loss.item() == pytest.approx(2.0 * expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(pred.grad).all() and torch.equal(pred.grad[2], torch.zeros(4))
    # A prediction equal to the target decodes onto the ground truth: no loss.
    assert GIoULoss()(target, target, labels, boxes=boxes).item() == pytest.approx(0.0, abs=1e-5)


def test_giou_without_positives_is_zero_and_needs_boxes():
    from detkit.interfaces import MatchedBoxes
    from detkit_builtins.losses import GIoULoss

    ref = torch.tensor([[0.0, 0.0, 8.0, 8.0]])
    pred = torch.ones(1, 4, requires_grad=True)
    loss = GIoULoss()(pred, torch.zeros(1, 4), torch.tensor([0]), boxes=MatchedBoxes(ref, torch.zeros(1, 4)))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="matched boxes"):
        GIoULoss()(pred, torch.zeros(1, 4), torch.tensor([1]))


def test_giou_is_a_registered_box_loss():
    from detkit_builtins.losses import GIoULoss

    loss = registry("loss").build({"type": "giou", "weight": 2.0})
    assert isinstance(loss, GIoULoss) and loss.weight == 2.0
    assert registry("loss").get("giou").provider.target == "detkit_builtins.losses:GIoULoss"  # an entry point
    registry("loss").validate({"type": "giou"}, role="box")
    with pytest.raises(ComponentValidationError):
        registry("loss").validate({"type": "giou"}, role="classification")


def test_stages_give_box_losses_the_matched_boxes(clean_registry, tiny_detector_config, two_images):
    """A spy box loss in the RPN's slot sees, for every positive row, the anchor and a real ground-truth box."""
    from pydantic import BaseModel, ConfigDict

    from detkit.interfaces import Loss

    seen = []

    class Spy(Loss):
        role = "box"

        class Params(BaseModel):
            model_config = ConfigDict(extra="forbid")

        def __init__(self, params=None):
            super().__init__()

        def forward(self, pred, target, labels, boxes=None):
            seen.append((labels, boxes.ref, boxes.gt, boxes.decode(target)))
            return pred.sum() * 0.0

    registry("loss").add("spy", Spy)
    cfg = tiny_detector_config()
    cfg["rpn"]["loc_loss"] = {"type": "spy"}
    cfg["roi_head"] = {"type": "roi_head", "loc_loss": {"type": "giou"}}
    cfg["preprocess"] = {"min_size": 112, "max_size": 112}  # square 112 px images: no resize
    torch.manual_seed(0)
    model = registry("detector").build(cfg, num_classes=3)
    gt = [torch.tensor([[10.0, 12.0, 50.0, 40.0], [60.0, 60.0, 90.0, 100.0]]), torch.tensor([[5.0, 5.0, 40.0, 60.0]])]
    targets = [{"boxes": gt[0], "labels": torch.tensor([0, 1])}, {"boxes": gt[1], "labels": torch.tensor([1])}]
    model.train()
    losses = model([torch.rand(3, 112, 112), torch.rand(3, 112, 112)], targets)
    roi_loc = losses["roi_loc"]
    assert torch.isfinite(roi_loc) and roi_loc > 0  # giou in the RoI slot
    (labels, ref, matched, decoded), = seen
    pos = labels > 0
    assert pos.any() and ref.shape == matched.shape == (labels.shape[0], 4)
    all_gt = torch.cat(gt)
    # Each positive anchor's matched box is one of the batch's ground-truth boxes.
    assert (torch.cdist(matched[pos], all_gt).min(dim=1).values < 1e-3).all()
    assert torch.allclose(decoded, matched)
