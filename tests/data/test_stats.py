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
    kmeans_1d,
    suggest_anchors,
    suggest_level_sizes,
    yaml_snippet,
)
from detkit_builtins.anchors import AnchorGenerator, AnchorParams


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

    def anchors_for(size):  # 16 px squares centred on a 16 px grid: the RPN's own generator
        calls.append(size)
        return AnchorGenerator(16, AnchorParams(scales=[1.0], ratios=[1.0], offset=0.5))(-(-size[0] // 16), -(-size[1] // 16))

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
            "preprocess": {"min_size": 128, "max_size": 128},
        },
        "data": {"train": {"type": "synthetic", "num_images": 12, "image_size": [128, 128]}},
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
    synth = SyntheticShapes(SyntheticShapes.Params(num_images=12, image_size=(128, 128)))
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


def test_level_sizes_suggestion_and_snippet_are_valid_yaml():
    boxes = torch.tensor([[0, 0, 30, 30]] * 4 + [[0, 0, 60, 60]] * 4 + [[0, 0, 250, 250]] * 4, dtype=torch.float32)
    assert suggest_level_sizes(boxes, num_levels=3, per_level=1) == [[30.0], [60.0], [250.0]]
    cfg = {"rpn": {"type": "rpn", "anchor": {"scales": [8.0], "ratios": [1.0], "sizes": [[32], [64]]}}}
    assert find_anchor_section(cfg) == ("rpn", "anchor")
    text = yaml_snippet(("rpn", "anchor"), [[30.0], [60.0, 90.0]], [0.5, 1.0], key="sizes")
    assert text.endswith("sizes: [[30], [60, 90]]\n      ratios: [0.5, 1]")
    assert yaml.safe_load(text) == {"model": {"rpn": {"anchor": {"sizes": [[30], [60, 90]], "ratios": [0.5, 1]}}}}


def test_dataset_stats_on_a_pyramid_asks_the_rpn_and_suggests_sizes(tmp_path):
    from detkit.config import load_config
    from detkit.data.stats import dataset_stats, print_report
    from detkit.registry import registry

    path = _config(tmp_path, [8.0])
    cfg = yaml.safe_load(path.read_text())
    cfg["model"] = {
        "type": "faster_rcnn",
        "backbone": {"type": "resnet50", "out_features": ["C2", "C3", "C4", "C5"]},
        "neck": {"type": "fpn", "out_channels": 16},
        # Huge anchors for 16-64 px boxes: the suggestion must do better.
        "rpn": {"type": "rpn", "mid_channels": None, "anchor": {"sizes": [[256], [300], [400], [512], [600]]}},
        "roi_head": {"type": "roi_head",
                     "pooler": {"type": "multiscale_roi_align", "in_features": ["P2", "P3", "P4", "P5"], "output_size": 7},
                     "box_head": {"type": "two_mlp", "representation_size": 16}},
        "preprocess": {"min_size": 128, "max_size": 128, "size_divisible": 32},
    }
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_config(path, [])
    report = dataset_stats(loaded, max_images=6)
    model = registry("detector").build(loaded.model.to_dict(), num_classes=4)
    assert model.anchors((128, 128)).shape[0] == 3 * (32 * 32 + 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2)
    assert report.current[">=0.5"] == 0.0
    sizes = report.suggested["sizes"]
    assert len(sizes) == 5 and all(len(level) == 1 for level in sizes) and max(max(sizes)) <= 64
    assert report.suggested_coverage[">=0.5"] > 0.5
    res = CliRunner().invoke(app, ["data", "stats", str(path), "--max-images", "4", "--set", "data.train.num_images=4"])
    assert res.exit_code == 0, res.output
    snippet = res.output[res.output.index("model:\n  rpn:"):].split("\nor:")[0]
    parsed = yaml.safe_load(snippet)["model"]["rpn"]["anchor"]
    assert len(parsed["sizes"]) == 5 and all(isinstance(v, list) for v in parsed["sizes"])
    # The printed snippet validates as the RPN's anchor section.
    registry("proposal_generator").validate({"type": "rpn", "anchor": parsed})
    assert "--set model.rpn.anchor.sizes=[[" in res.output


def test_fit_warnings_name_the_field_to_change(tmp_path):
    """Anchors of 256-512 px for 16-64 px boxes: both warnings, each naming its config field; anchors
    that fit: none."""
    from detkit.config import load_config
    from detkit.data.stats import dataset_stats

    report = dataset_stats(load_config(_config(tmp_path, [16.0, 32.0]), []), max_images=10)
    cover, median = report.warnings
    assert cover.startswith("only 0% of the boxes have an anchor at IoU >= 0.5") and "model.rpn.anchor.scales" in cover
    # 256 px is the smallest anchor (16 * 16 px, ratio 1); 128 * 256 / median is the size that fits it.
    assert "smaller than the smallest anchor (256.0 px): raise model.preprocess.min_size (now 128; about" in median
    assert "or lower the smallest of model.rpn.anchor.scales" in median
    # 32-64 px boxes, 32-64 px anchors: 95 % at IoU 0.5, no warning.
    fitting = dataset_stats(load_config(_config(tmp_path, [2.0, 3.0, 4.0]), ["data.train.object_size=[32,64]"]),
                            max_images=10)
    assert fitting.current[">=0.5"] >= 0.9 and fitting.warnings == []
    # 16-64 px anchors on a stride-16 grid for the same boxes: the median box is above the
    # smallest anchor, but 14 % of the boxes have no anchor at IoU 0.5; only that warning.
    loose = dataset_stats(load_config(_config(tmp_path, [1.0, 2.0, 4.0]), ["data.train.object_size=[32,64]"]),
                          max_images=10)
    assert loose.current[">=0.5"] < 0.9 and len(loose.warnings) == 1 and loose.warnings[0].startswith("only ")

    res = CliRunner().invoke(app, ["data", "stats", str(_config(tmp_path, [16.0, 32.0])), "--max-images", "6"])
    assert res.exit_code == 0, res.output
    assert "warning: only 0% of the boxes" in res.output
    assert "warning: the median box is" in res.output
