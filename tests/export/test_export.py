"""Exported ONNX and TorchScript files give ``predict``'s detections on images of other sizes."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from detkit.engine.checkpoint import save_checkpoint
from detkit.export import (
    ExportError,
    ExportableDetector,
    compare_detections,
    example_image,
    export_model,
    load_exported,
)
from detkit.registry import registry

# The export traces on a 96x128 image; the checks run on other sizes and aspect ratios.
SIZES = ((150, 90), (100, 240))
NO_ORT = "onnx/onnxruntime are not installed: pip install -e \".[export]\" to run the ONNX tests"


def onnxruntime_or_skip():
    pytest.importorskip("onnx", reason=NO_ORT)
    return pytest.importorskip("onnxruntime", reason=NO_ORT)


def assert_matches_predict(model, path, images):
    run = load_exported(path)
    total = 0
    for image in images:
        expected = model.predict([image])[0]
        assert len(expected["scores"]) >= 3, "too few detections for a meaningful comparison"
        problem = compare_detections(run(image), expected)
        assert problem is None, f"{tuple(image.shape)}: {problem}"
        total += len(expected["scores"])
    return total


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_tiny_model_export_matches_predict(tiny_model, tmp_path, fmt):
    if fmt == "onnx":
        onnxruntime_or_skip()
    path = export_model(tiny_model, tmp_path / f"tiny.{fmt}", fmt)
    assert path.is_file() and not list(tmp_path.glob(".*tmp"))
    images = [example_image(h, w, seed=i + 1) for i, (h, w) in enumerate(SIZES)]
    assert assert_matches_predict(tiny_model, path, images) > 0


def test_exported_file_returns_typed_empty_outputs(tiny_model, model_config, tmp_path):
    """A uniform image gives no detections: the outputs keep their ranks and dtypes."""
    model = registry("detector").build(model_config(score_thresh=1.0), num_classes=3).eval()
    model.load_state_dict(tiny_model.state_dict())
    run = load_exported(export_model(model, tmp_path / "t.pt", "torchscript"))
    boxes, scores, labels = run(torch.full((3, 70, 50), 128, dtype=torch.uint8))
    assert boxes.shape == (0, 4) and scores.shape == (0,) and labels.dtype == torch.int64


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("backbone", ["vgg16", "resnet50"])
def test_imported_checkpoint_export_matches_predict(reference, tmp_path, fmt, backbone):
    """faster-rcnn-pytorch pipelines: PIL bicubic resize, no normalisation, RoI pooling, no cap.

    VGG16 as the issue asks; ResNet50 adds a BatchNorm RoI tail (layer4) on 14x14 pooled RoIs.
    """
    if fmt == "onnx":
        onnxruntime_or_skip()
    ref_model = reference.scaled_random_model("vgg" if backbone == "vgg16" else "resnet", seed=0)
    model = reference.detkit_model(f"faster_rcnn_pytorch_{backbone}.yaml", ref_model)
    assert model.preprocess.backend == "pil"
    path = export_model(model, tmp_path / f"{backbone}.{fmt}", fmt)
    images = []
    for seed, (w, h) in ((1, (200, 150)), (2, (120, 170))):
        pil = reference.random_image(seed, w, h)
        images.append(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).contiguous())
    assert assert_matches_predict(model, path, images) > 0


def test_wrapper_rejects_settings_it_cannot_reproduce(model_config):
    model = registry("detector").build(
        model_config(preprocess={"min_size": 128, "max_size": 128, "antialias": False}), num_classes=2
    )
    with pytest.raises(ExportError, match="antialias"):
        ExportableDetector(model)
    fpn = registry("detector").build(
        {
            "type": "faster_rcnn",
            "backbone": {"type": "resnet50", "out_features": ["C2", "C3", "C4", "C5"]},
            "neck": {"type": "fpn"},
            "rpn": {"type": "rpn", "anchor": {"sizes": [[32], [64], [128], [256], [512]]}},
            "roi_head": {"type": "multiscale_roi_head"},
        },
        num_classes=2,
    )
    with pytest.raises(ExportError, match="multi-level"):
        ExportableDetector(fpn)


def test_unknown_format_and_missing_onnx(tiny_model, tmp_path, monkeypatch):
    with pytest.raises(ExportError, match="onnx, torchscript"):
        export_model(tiny_model, tmp_path / "m.x", "tflite")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(ExportError, match=r'pip install -e "\.\[export\]"'):
        export_model(tiny_model, tmp_path / "m.onnx", "onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_compare_detections_reports_differences():
    expected = {
        "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0]]),
        "scores": torch.tensor([0.9, 0.8]),
        "labels": torch.tensor([0, 1]),
    }
    same = (expected["boxes"].flip(0) + 0.5, expected["scores"].flip(0), expected["labels"].flip(0))
    assert compare_detections(same, expected) is None  # order-free, within 1 px
    moved = (expected["boxes"] + torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.5, 0.0]]),) + same[1:]
    moved = (moved[0], expected["scores"], expected["labels"])
    assert "no exported box within 1.0 px" in compare_detections(moved, expected)
    worse = (expected["boxes"], expected["scores"] - 0.01, expected["labels"])
    assert "scores differ" in compare_detections(worse, expected)
    assert "1 detections" in compare_detections((expected["boxes"][:1], expected["scores"][:1], expected["labels"][:1]), expected)


def test_cli_export_writes_and_checks(tiny_model, model_config, tmp_path):
    from detkit.cli import app

    ckpt = save_checkpoint(
        tmp_path / "tiny.pt",
        model=tiny_model.state_dict(),
        config={"model": model_config(score_thresh=0.2)},
        classes=["a", "b", "c"],
    )
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "m.ts")])
    assert result.exit_code == 0, result.output
    assert "checked against predict" in result.output
    run = load_exported(tmp_path / "m.ts")
    assert len(run(example_image(80, 120))) == 3

    bad = runner.invoke(app, ["export", str(ckpt), "--format", "tflite", "--out", str(tmp_path / "m.x")])
    assert bad.exit_code != 0
    assert "unknown export format 'tflite'" in bad.output and "Traceback" not in bad.output
