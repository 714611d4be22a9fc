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
    assert SmoothL1Loss(1.0)(pred, target, labels).item() == pytest.approx(expected)


def test_smooth_l1_sigma_3(deltas):
    pred, target, labels = deltas
    # sigma^2 = 9, knee at 1/9: |0.5| and |2| and |0.5| are linear, 0.05 quadratic.
    row0 = (0.5 - 0.5 / 9) + (2.0 - 0.5 / 9)
    row1 = 0.5 * 9 * 0.05**2 + (0.5 - 0.5 / 9)
    assert SmoothL1Loss(3.0)(pred, target, labels).item() == pytest.approx((row0 + row1) / 2)


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
    loss = CrossEntropyLoss(ignore_index=1)(logits, torch.tensor([0, 1]))
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
