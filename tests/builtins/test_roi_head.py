"""RoI head and its poolers: RoI mapping onto the feature map, pooling and output shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detkit.interfaces import ImageBatch, Proposals, RoIPredictions, RoITail, ShapeSpec
from detkit.registry import registry

SHAPES = {"features": ShapeSpec(1, 16)}


def pooler(pool="roi_pool", mapping="feature_ratio", output_size=1):
    return registry("pooler").build({"type": pool, "mapping": mapping, "output_size": output_size}, input_shapes=SHAPES)


def head(pool="roi_pool", roi_size=1, num_classes=3, tail_features=1):
    tail = RoITail(nn.Flatten(1), roi_size, tail_features)
    return registry("roi_head").build(
        {"type": "roi_head", "pooler": {"type": pool}, "box_head": {"type": "backbone_tail"}},
        num_classes=num_classes,
        input_shapes=SHAPES,
        tail=tail,
    )


FEATURES = torch.arange(16.0).view(1, 1, 4, 4)


def test_feature_ratio_mapping_hand_computed():
    # Input 120 x 64 with a 4x4 feature map: y scales by 4/120, x by 4/64.
    rois = torch.tensor([[0.0, 0.0, 16.0, 60.0]])
    pooled = pooler()(FEATURES, rois, torch.tensor([0]), (120, 64))
    # x: 0..1, y: 0..2 on the feature map -> max of rows 0-2, cols 0-1 = f[2, 1] = 9.
    assert pooled.flatten().tolist() == [9.0]


def test_stride_mapping_differs_hand_computed():
    rois = torch.tensor([[0.0, 0.0, 16.0, 60.0]])
    pooled = pooler(mapping="stride")(FEATURES, rois, torch.tensor([0]), (120, 64))
    # 60 / 16 = 3.75 rounds to row 3 -> max of rows 0-3, cols 0-1 = f[3, 1] = 13.
    assert pooled.flatten().tolist() == [13.0]


def test_roi_indices_select_the_image():
    feats = torch.cat([FEATURES, FEATURES + 100])
    rois = torch.tensor([[0.0, 0.0, 16.0, 60.0]] * 2)
    pooled = pooler()(feats, rois, torch.tensor([1, 0]), (120, 64))
    assert pooled.flatten().tolist() == [109.0, 9.0]


def test_roi_align_option_averages():
    rois = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    # RoI [0, 4] x [0, 4] on the 4x4 map, one bin, 2x2 samples at 1 and 3 (no half-pixel
    # offset): f[1,1]=5, f[1,3]=7, f[3,1]=13, f[3,3]=15 -> mean 10 (roi_pool would give 15).
    pooled = pooler(pool="roi_align")(FEATURES, rois, torch.tensor([0]), (64, 64))
    assert pooled.flatten().tolist() == pytest.approx([10.0], abs=1e-5)


def test_output_shapes_and_init():
    torch.manual_seed(0)
    h = head(roi_size=2, num_classes=5, tail_features=4)
    assert h.pooler.output_size == 2  # the tail's RoI size
    rois = torch.tensor([[0.0, 0, 32, 32], [8.0, 8, 60, 40]])
    locs, scores = h.predict_boxes(FEATURES, rois, torch.tensor([0, 0]), (64, 64))
    assert locs.shape == (2, 6 * 4) and scores.shape == (2, 6)
    h.eval()
    batch = ImageBatch(torch.zeros(1, 3, 64, 64), torch.tensor([[64, 64]]), torch.tensor([[64, 64]]), torch.ones(1))
    pred, losses = h(FEATURES, Proposals(rois, torch.tensor([0, 0])), batch)
    assert isinstance(pred, RoIPredictions) and losses == {}
    assert pred.boxes.shape == (2, 5, 4) and pred.scores.shape == (2, 5) and pred.image_indices.tolist() == [0, 0]
    assert torch.allclose(pred.scores, torch.softmax(scores, dim=-1)[:, 1:])
    assert h.cls_loc.bias.abs().sum() == 0 and h.score.bias.abs().sum() == 0
    assert 0.0003 < h.cls_loc.weight.std() < 0.003
    assert h.num_classes == 5


def test_rois_are_mapped_in_float32_under_reduced_precision():
    # bf16 stores 999 as 1000: mapped by 64/1024 that is cell 62.5 -> 63 instead of 62.4 -> 62.
    features = (-torch.arange(64.0)).expand(1, 1, 64, 64).to(torch.bfloat16)
    rois = torch.tensor([[999.0, 0.0, 1023.0, 15.0]])
    pooled = pooler()(features, rois, torch.tensor([0]), (1024, 1024))
    assert pooled.dtype == torch.bfloat16
    assert pooled.flatten().tolist() == [-62.0]
