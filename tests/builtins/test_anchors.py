"""Anchor layout: the reference order, counts and offsets."""

from __future__ import annotations

import math

import pytest
import torch

from detkit_builtins.anchors import AnchorGenerator, AnchorParams, base_anchors


def test_base_anchors_reference_order_hand_computed():
    base = base_anchors([0.5, 1.0, 2.0], [8, 16, 32], 16)
    assert base.shape == (9, 4)
    # ratio 0.5 (outer loop), scale 8 (inner): h = 128*sqrt(.5), w = 128*sqrt(2);
    # written [-h/2, -w/2, h/2, w/2], so h lies along x.
    h, w = 128 * math.sqrt(0.5), 128 * math.sqrt(2.0)
    assert base[0].tolist() == pytest.approx([-h / 2, -w / 2, h / 2, w / 2], abs=1e-4)
    assert base[0].tolist() == pytest.approx([-45.2548, -90.5097, 45.2548, 90.5097], abs=1e-3)
    # ratio 0.5, scale 16 is second: scales are the inner loop.
    assert base[1].tolist() == pytest.approx([-90.5097, -181.0193, 90.5097, 181.0193], abs=1e-3)
    # ratio 1 is square: 128, 256, 512 wide.
    assert base[3].tolist() == pytest.approx([-64, -64, 64, 64])
    assert base[5].tolist() == pytest.approx([-256, -256, 256, 256])
    # ratio 2: taller along x (h on the x axis).
    assert base[6].tolist() == pytest.approx([-90.5097, -45.2548, 90.5097, 45.2548], abs=1e-3)


def test_shifted_grid_row_major_cells_contiguous():
    gen = AnchorGenerator(stride=16)
    anchors = gen(2, 3)
    assert anchors.shape == (2 * 3 * 9, 4)
    base = base_anchors([0.5, 1.0, 2.0], [8, 16, 32], 16)
    # Cell (y=0, x=1) is the second block of 9, shifted by (16, 0).
    assert torch.allclose(anchors[9:18], base + torch.tensor([16.0, 0, 16, 0]))
    # Cell (y=1, x=0) comes after the 3 cells of row 0: index 3.
    assert torch.allclose(anchors[27:36], base + torch.tensor([0.0, 16, 0, 16]))
    # Last cell (y=1, x=2).
    assert torch.allclose(anchors[-9:], base + torch.tensor([32.0, 16, 32, 16]))


def test_offset_half_centres_anchors():
    gen = AnchorGenerator(16, AnchorParams(offset=0.5))
    a = gen(1, 1)
    centres = (a[:, :2] + a[:, 2:]) / 2
    assert torch.allclose(centres, torch.full((9, 2), 8.0))


@pytest.mark.parametrize("feat,count", [((37, 37), 12321), ((38, 38), 12996)])
def test_reference_counts(feat, count):
    assert AnchorGenerator(16)(*feat).shape == (count, 4)


def test_cache_per_size_and_device():
    gen = AnchorGenerator(16, AnchorParams(ratios=[1.0], scales=[2.0]))
    a = gen(4, 5)
    assert gen(4, 5) is a
    assert gen(5, 4) is not a and gen(5, 4).shape == (20, 4)
