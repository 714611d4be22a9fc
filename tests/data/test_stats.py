"""Anchor coverage on hand-made cases, the anchor suggestion, and `detkit data stats`."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from detkit.cli import app
from detkit.data.stats import (
    Annotations,
    anchor_coverage,
    best_anchor_iou,
    coverage,
    find_anchor_section,
    grid_anchors,
    kmeans_1d,
    suggest_anchors,
    yaml_snippet,
)


def test_best_anchor_iou_by_hand():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 10.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0], [100.0, 100.0, 110.0, 110.0]])
    # box 2 vs anchor 1: 100 / 200 = 0.5; vs anchor 2: 100 / (200 + 200 - 100) = 1/3.
    assert best_anchor_iou(boxes, anchors, chunk=2).tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert best_anchor_iou(torch.zeros(0, 4), anchors).shape == (0,)


def test_coverage_shares_and_median():
    cov = coverage(torch.tensor([1.0, 0.5, 0.2, 0.75]))
    assert cov == pytest.approx({">=0.7": 0.5, ">=0.5": 0.75, ">=0.3": 0.75, "median": 0.625})
    assert math.isnan(coverage(torch.zeros(0))["median"])


def test_grid_anchors_layout():
    a = grid_anchors(32, 32, scales=[1.0], ratios=[1.0], stride=16, offset=0.5)
    assert a.tolist() == [[0, 0, 16, 16], [16, 0, 32, 16], [0, 16, 16, 32], [16, 16, 32, 32]]
    tall = grid_anchors(16, 16, scales=[1.0], ratios=[4.0])  # ratio = height / width
    assert tall.tolist() == [[-4.0, -16.0, 4.0, 16.0]]
    assert grid_anchors(40, 20, [1, 2], [0.5, 1, 2]).shape == (3 * 2 * 6, 4)


def test_anchor_coverage_groups_by_input_size():
    ann = Annotations(
        classes=["a"],
        sizes=torch.tensor([[32, 32], [16, 16], [32, 32]]),
        boxes=torch.tensor([[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 8.0, 16.0], [16.0, 16.0, 32.0, 24.0]]),
        labels=torch.zeros(3, dtype=torch.long),
        image_index=torch.tensor([0, 1, 2]),
        difficult=torch.zeros(3, dtype=torch.bool),
    )
    calls = []

    def anchors_for(size):
        calls.append(size)
        return grid_anchors(*size, scales=[1.0], ratios=[1.0], offset=0.5)

    best = anchor_coverage(ann, anchors_for)
    assert sorted(calls) == [(16, 16), (32, 32)]  # one anchor set per distinct size
    assert best.tolist() == pytest.approx([1.0, 0.5, 0.5])
    calls.clear()
    anchor_coverage(ann, anchors_for, size_divisor=32)
    assert calls == [(32, 32)]


def test_kmeans_and_suggestion():
    assert kmeans_1d(torch.tensor([0.0, 0.1, 0.0, 10.0, 10.2, 9.8]), 2).tolist() == pytest.approx([1 / 30, 10.0])
    boxes = torch.tensor([[0, 0, 32, 32]] * 5 + [[0, 0, 64, 64]] * 5 + [[0, 0, 32, 48]] * 2, dtype=torch.float32)
    scales, ratios = suggest_anchors(boxes, num_scales=2, num_ratios=2)
    # sqrt(32*48)/16 = 2.45 joins the scale-2 cluster: exp((5 log 2 + 2 log 2.45) / 7) = 2.12
    assert scales == [2.1, 4.0]
    assert ratios == [1.0, 1.5]  # height / width


def test_find_section_and_snippet():
    cfg = {"type": "faster_rcnn", "rpn": {"type": "rpn", "anchor": {"scales": [8], "ratios": [1], "offset": 0}}}
    path = find_anchor_section(cfg)
    assert path == ("rpn", "anchor")
    text = yaml_snippet(path, [1.5, 3.0], [0.5, 1.0])
    assert text == "model:\n  rpn:\n    anchor:\n      scales: [1.5, 3]\n      ratios: [0.5, 1]"
    assert yaml.safe_load(text) == {"model": {"rpn": {"anchor": {"scales": [1.5, 3], "ratios": [0.5, 1]}}}}
    assert find_anchor_section({"rpn": {"type": "x"}}) is None


def _config(tmp_path, scales):
    cfg = {
        "model": {
            "type": "faster_rcnn",
            "backbone": {"type": "tiny", "channels": [8, 8, 8, 8], "tail_features": 16},
            "rpn": {"type": "rpn", "mid_channels": 8, "anchor": {"scales": scales, "ratios": [0.5, 1.0, 2.0]}},
        },
        "data": {
            "train": {"type": "synthetic", "num_images": 12, "image_size": [128, 128]},
            "transforms": {"min_size": 128, "max_size": 128},
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_dataset_stats_uses_the_detectors_anchors(tmp_path):
    from detkit.config import load_config
    from detkit.data.stats import dataset_stats
    from detkit.data.synthetic import SyntheticShapes
    from detkit.registry import registry

    cfg = load_config(_config(tmp_path, [16.0, 32.0]), [])  # anchors of 256-512 px for 16-64 px boxes
    report = dataset_stats(cfg, max_images=10)
    synth = SyntheticShapes(num_images=12, image_size=(128, 128))
    boxes = torch.cat([synth.annotation(i)[1]["boxes"] for i in range(10)])
    labels = torch.cat([synth.annotation(i)[1]["labels"] for i in range(10)])
    assert report.num_images == 10
    assert [n for _, n, _ in report.per_class] == torch.bincount(labels, minlength=4).tolist()
    model = registry("detector").build(cfg.model.to_dict(), num_classes=4)
    expected = coverage(best_anchor_iou(boxes, model.anchors((128, 128))))
    assert report.current == pytest.approx(expected)
    assert report.current[">=0.5"] == 0.0  # hopelessly large anchors
    assert report.anchor_path == ["rpn", "anchor"]
    assert report.suggested_coverage[">=0.5"] > 0.5
    assert max(report.suggested["scales"]) <= 4.0  # 64 px / 16


def test_cli_stats_prints_tables_and_snippet(tmp_path):
    res = CliRunner().invoke(app, ["data", "stats", str(_config(tmp_path, [16.0, 32.0])), "--max-images", "6",
                                   "--set", "data.train.num_images=8"])
    assert res.exit_code == 0, res.output
    assert "boxes per class" in res.output and "IoU >=0.7" in res.output
    assert "model:\n  rpn:\n    anchor:\n      scales: [" in res.output
    assert "--set model.rpn.anchor.scales=" in res.output
