"""Exported ONNX and TorchScript files give the eval forward's detections, for every built-in architecture.

Each check runs on images of two sizes and aspect ratios that the exported graph never saw (it is
traced on 96x128): 150x90 shrinks to the 128 px cap, 60x84 grows to it.  Same count, boxes within
0.01 px, scores within 1e-4, labels equal (compare_detections pairs each detection with one of its
class), and never on zero detections.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from detkit.config import load_config
from detkit.engine.checkpoint import save_checkpoint
from detkit.export import ExportError, compare_detections, example_image, export_model, load_exported, verify_export
from detkit.registry import registry

REPO = Path(__file__).resolve().parents[2]
FORMATS = ["torchscript", "onnx"]
SIZES = ((150, 90), (60, 84))
NO_ORT = 'onnx/onnxruntime are not installed: pip install -e ".[export]" to run the ONNX tests'
MIN_DETECTIONS = 5  # per image: a comparison of a handful of detections or none proves nothing


def onnxruntime_or_skip():
    pytest.importorskip("onnx", reason=NO_ORT)
    return pytest.importorskip("onnxruntime", reason=NO_ORT)


def export_images():
    return [example_image(h, w, seed=i + 1) for i, (h, w) in enumerate(SIZES)]


def assert_matches_eval_forward(model, path, images) -> int:
    """Every image: the file's detections are the eval forward's; returns how many were compared."""
    run = load_exported(path)
    model.eval()
    total = 0
    for image in images:
        with torch.inference_mode():
            expected = model([image])[0]
        assert len(expected["scores"]) >= MIN_DETECTIONS, f"{tuple(image.shape)}: too few detections to compare"
        problem = compare_detections(run(image), expected)
        assert problem is None, f"{tuple(image.shape)}: {problem}"
        total += len(expected["scores"])
    return total


def _quickstart_variant(model_config, **sections) -> dict:
    """The quickstart model with some of its sections' keys changed."""
    model = model_config(score_thresh=0.2)
    for name, changes in sections.items():
        model[name] = {**model.get(name, {}), **changes}
    return model


TINY_FPN = {
    "type": "faster_rcnn",
    "backbone": {"type": "tiny", "channels": [16, 32, 64, 128], "blocks_per_stage": 1,
                 "out_features": ["C3", "C4"], "init": "pytorch"},
    "neck": {"type": "fpn", "out_channels": 32, "top_block": "maxpool"},
    "rpn": {"type": "rpn", "anchor": {"sizes": [[16], [32], [64]], "ratios": [0.5, 1.0, 2.0]},
            "proposal": {"test_pre_nms": 300, "test_post_nms": 48, "min_size": 2}},
    "roi_head": {"type": "roi_head",
                 "pooler": {"type": "multiscale_roi_align", "in_features": ["P3", "P4", "P5"],
                            "sampling_ratio": 1, "aligned": True},
                 "box_head": {"type": "two_mlp", "representation_size": 64}},
    "preprocess": {"min_size": 128, "max_size": 128, "size_divisible": 32},
    "score_thresh": 0.2,
}

ARCHITECTURES = {
    # The quickstart itself (roi_align, bilinear, no antialias): the weights of the tiny_model fixture.
    "c4_roi_align": lambda q: _quickstart_variant(q),
    "c4_roi_pool": lambda q: _quickstart_variant(q, roi_head={"pooler": {"type": "roi_pool"}}),
    "c4_pil_bicubic": lambda q: _quickstart_variant(q, preprocess={"backend": "pil", "resample": "bicubic"}),
    "c4_antialias_bicubic": lambda q: _quickstart_variant(q, preprocess={"antialias": True, "resample": "bicubic"}),
    "fpn_two_mlp": lambda q: copy.deepcopy(TINY_FPN),
    "fpn_antialias": lambda q: {**copy.deepcopy(TINY_FPN),
                                "preprocess": {**TINY_FPN["preprocess"], "antialias": True}},
    # torchvision v2's parts: BatchNorm FPN, two RPN convs, conv + fc box head with BatchNorm.
    "fpn_v2_parts": lambda q: {**copy.deepcopy(TINY_FPN), "neck": {**TINY_FPN["neck"], "norm": "bn"},
                               "rpn": {**copy.deepcopy(TINY_FPN["rpn"]), "conv_depth": 2},
                               "roi_head": {**copy.deepcopy(TINY_FPN["roi_head"]), "box_head": {
                                   "type": "conv_fc", "num_convs": 2, "conv_channels": 16, "fc_dims": [64]}}},
}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def architecture(request, model_config, distinct_scores):
    torch.manual_seed(0)
    model = registry("detector").build(ARCHITECTURES[request.param](model_config), num_classes=3).eval()
    return request.param, distinct_scores(model)


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_gives_the_eval_forward(architecture, tmp_path, fmt):
    name, model = architecture
    if fmt == "onnx":
        onnxruntime_or_skip()
    path = export_model(model, tmp_path / f"{name}.{fmt}", fmt)
    assert path.is_file() and not list(tmp_path.glob(".*tmp"))
    assert assert_matches_eval_forward(model, path, export_images()) >= 2 * MIN_DETECTIONS


def test_quickstart_weights_onnx_sizes_as_eager(tiny_model, model_config, tmp_path):
    """The weights on which ONNX once gave 83 detections and the eval forward 86 (150x90).

    Two causes, both fixed: float32 arithmetic of 0-d float64 tensors in the ONNX exporter
    (detkit.resize.as_f64), and exact ties of RPN scores at the post-NMS cut (distinct_scores).
    The quickstart's own 128/128 px rule is checked in test_export_gives_the_eval_forward
    (c4_roi_align); under a 128/160 px rule the first cause sizes a 153x576 image 43x160 instead
    of 42x160, so the detections differ without as_f64.
    """
    onnxruntime_or_skip()
    config = model_config(score_thresh=0.2, preprocess={"min_size": 128, "max_size": 160})
    model = registry("detector").build(config, num_classes=3).eval()
    model.load_state_dict(tiny_model.state_dict())
    path = export_model(model, tmp_path / "capped.onnx", "onnx")
    images = [example_image(150, 90, seed=1), example_image(153, 576, seed=1)]
    assert assert_matches_eval_forward(model, path, images) > 0


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_imported_resnet50_c4_export(reference, tmp_path, fmt):
    """The faster-rcnn-pytorch ResNet50 layout: PIL bicubic resize, no normalisation, RoI pooling,
    a BatchNorm RoI tail (layer4) on 14x14 pooled RoIs."""
    if fmt == "onnx":
        onnxruntime_or_skip()
    model = reference.detkit_model("faster_rcnn_pytorch_resnet50.yaml", reference.scaled_random_model("resnet", 0))
    assert model.preprocess.params.backend == "pil"
    path = export_model(model, tmp_path / f"resnet50.{fmt}", fmt)
    images = []
    for seed, (w, h) in ((1, (260, 180)), (2, (120, 170))):  # short side 160: one shrinks, one grows
        pil = reference.random_image(seed, w, h)
        images.append(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).contiguous())
    assert assert_matches_eval_forward(model, path, images) > 0


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_resnet50_fpn_export(tmp_path, fmt):
    """The torchvision fasterrcnn_resnet50_fpn layout (frozen BN, P2-P6, min_detection_size), at a small input."""
    if fmt == "onnx":
        onnxruntime_or_skip()
    overrides = ["model.preprocess.min_size=128", "model.preprocess.max_size=128",
                 "model.rpn.proposal.test_pre_nms=150", "model.rpn.proposal.test_post_nms=32"]
    config = load_config(REPO / "configs" / "import" / "torchvision_fasterrcnn_resnet50_fpn.yaml", overrides)
    torch.manual_seed(0)
    model = registry("detector").build(config.to_dict()["model"], num_classes=3).eval()
    path = export_model(model, tmp_path / f"r50fpn.{fmt}", fmt)
    assert assert_matches_eval_forward(model, path, export_images()) > 0


def test_exported_file_returns_typed_empty_outputs(tiny_model, model_config, tmp_path):
    """A uniform image gives no detections: the outputs keep their ranks and dtypes."""
    model = registry("detector").build(model_config(score_thresh=1.0), num_classes=3).eval()
    model.load_state_dict(tiny_model.state_dict())
    run = load_exported(export_model(model, tmp_path / "t.pt", "torchscript"))
    boxes, scores, labels = run(torch.full((3, 70, 50), 128, dtype=torch.uint8))
    assert boxes.shape == (0, 4) and scores.shape == (0,) and labels.dtype == torch.int64


def test_unknown_format_and_missing_onnx(tiny_model, tmp_path, monkeypatch):
    with pytest.raises(ExportError, match="onnx, torchscript"):
        export_model(tiny_model, tmp_path / "m.x", "tflite")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(ExportError, match=r'pip install -e "\.\[export\]"'):
        export_model(tiny_model, tmp_path / "m.onnx", "onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_compare_detections_reports_differences():
    expected = {
        "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0], [1.0, 1.0, 8.0, 8.0]]),
        "scores": torch.tensor([0.9, 0.8, 0.7]),
        "labels": torch.tensor([0, 1, 1]),
    }
    b, s, l = expected["boxes"], expected["scores"], expected["labels"]
    assert compare_detections((b.flip(0) + 0.005, s.flip(0) - 5e-5, l.flip(0)), expected) is None  # order-free
    moved = b + torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.02, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert "no exported box within 0.01 px" in compare_detections((moved, s, l), expected)
    assert "no exported detection with score" in compare_detections((b, s - 2e-4, l), expected)
    assert "no exported detection" in compare_detections((b, s, torch.tensor([0, 1, 0])), expected)
    # Class-1 scores swapped between its two boxes: each box keeps its own score, so this differs.
    assert compare_detections((b, torch.tensor([0.9, 0.7, 0.8]), l), expected) is not None
    assert "2 detections" in compare_detections((b[:2], s[:2], l[:2]), expected)


def test_verify_export_fails_when_the_file_differs(tiny_model, tmp_path):
    path = export_model(tiny_model, tmp_path / "m.ts", "torchscript")
    assert verify_export(tiny_model, path) >= MIN_DETECTIONS
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        other.roi_head.cls_loc.bias.add_(0.05)  # boxes move by a fraction of a pixel
    with pytest.raises(ExportError, match="disagrees"):
        verify_export(other, path)


def _checkpoint(tmp_path, model, config):
    return save_checkpoint(tmp_path / "tiny.pt", model=model.state_dict(), config={"model": config},
                           classes=["a", "b", "c"])


def test_cli_export_writes_and_checks(tiny_model, model_config, tmp_path):
    from detkit.cli import app

    ckpt = _checkpoint(tmp_path, tiny_model, model_config(score_thresh=0.2))
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "m.ts")])
    assert result.exit_code == 0, result.output
    compared = int(result.output.split("checked against predict: ")[1].split(" ")[0])
    assert compared >= MIN_DETECTIONS and "warning" not in result.output
    assert "random test images (no data.val in the checkpoint's config)" in result.output
    assert "at score_thresh" not in result.output  # the model's own threshold found detections
    run = load_exported(tmp_path / "m.ts")
    assert len(run(example_image(80, 120))) == 3

    bad = runner.invoke(app, ["export", str(ckpt), "--format", "tflite", "--out", str(tmp_path / "m.x")])
    assert bad.exit_code != 0
    assert "unknown export format 'tflite'" in bad.output and "Traceback" not in bad.output
