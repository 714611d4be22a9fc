"""Checkpoints written before the one-forward detector (format 1) still load and detect the same.

The files in data/old_checkpoints were written by detkit at commit 8b3ebb5 (see
make_old_checkpoints.py there): a C4 model with roi_pool, one with roi_align
(the quickstart's head) and an FPN model (the old ``multiscale_roi_head``).
Their images are 128 x 128, the models' input size, so neither the old uint8
resize nor today's float resize runs: the pixels are the same by construction.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from detkit.engine.checkpoint import load_checkpoint, load_detector

DATA = Path(__file__).parent / "data" / "old_checkpoints"
NAMES = ["c4_roi_pool", "c4_roi_align", "fpn"]


def _images() -> list[torch.Tensor]:
    spec = importlib.util.spec_from_file_location("make_old_checkpoints", DATA / "make_old_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [module.image(0), module.image(1)]


def assert_same_detections(got: dict, want: dict) -> None:
    """Every detection of ``want`` matched one to one in ``got``: same label, box within 1e-3 px, score within 1e-5."""
    boxes, scores, labels = got["boxes"], got["scores"], got["labels"]
    assert len(want["scores"]) > 0
    assert boxes.shape[0] == len(want["scores"])
    free = torch.ones(len(scores), dtype=torch.bool)
    for box, score, label in zip(want["boxes"], want["scores"], want["labels"]):
        close = ((boxes - torch.tensor(box)).abs().amax(1) < 1e-3) & ((scores - score).abs() < 1e-5)
        close &= (labels == label) & free
        assert close.any(), f"no match for {label} {score:.6f} {box}"
        free[torch.nonzero(close)[0, 0]] = False


@pytest.mark.parametrize("name", NAMES)
def test_format_1_checkpoint_detects_as_the_old_code_did(name):
    expected = json.loads((DATA / "detections.json").read_text())[name]
    raw = torch.load(DATA / f"{name}.pt", map_location="cpu", weights_only=True)
    assert raw["format_version"] == 1 and any(k.startswith("extractor.") for k in raw["model"])
    model, ckpt = load_detector(DATA / f"{name}.pt")
    assert not any(k.startswith(("extractor.", "head.")) for k in model.state_dict())
    with torch.no_grad(), model.detection_settings(score_thresh=0.0, nms_iou=0.3):
        dets = model(_images())
    for got, want in zip(dets, expected):
        assert_same_detections(got, want)


def test_upgraded_config_names_todays_parts():
    ckpt = load_checkpoint(DATA / "fpn.pt")
    head = ckpt["config"]["model"]["roi_head"]
    assert head["type"] == "roi_head"
    assert head["pooler"]["type"] == "multiscale_roi_align" and head["pooler"]["in_features"] == ["P3", "P4", "P5"]
    assert head["box_head"]["type"] == "two_mlp" and head["box_head"]["representation_size"] == 16
    c4 = load_checkpoint(DATA / "c4_roi_align.pt")["config"]["model"]
    assert c4["roi_head"]["pooler"]["type"] == "roi_align" and c4["roi_head"]["box_head"]["type"] == "backbone_tail"
    assert "anchor_target" in c4["rpn"] and "anchor_target" not in c4.get("train", {}).get("trainer", {})


def test_detkit_eval_runs_on_a_format_1_checkpoint(tmp_path):
    from typer.testing import CliRunner

    from detkit.cli import app

    result = CliRunner().invoke(app, ["eval", str(DATA / "c4_roi_align.pt"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "voc/mAP" in metrics["metrics"]
    assert (tmp_path / "pr_curves.png").is_file() and (tmp_path / "detections.json").is_file()


def test_training_resumes_from_a_format_1_checkpoint(tmp_path):
    import detkit

    src = DATA / "c4_roi_align.pt"
    config = load_checkpoint(src)["config"]  # the stored config, upgraded
    run = detkit.train(config, ["train.epochs=2", "data.num_workers=0", "data.train.num_images=8"],
                       resume=src, out_dir=tmp_path / "run")
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    # Resumed after the old run's 8 steps (epoch 1): epoch 2 adds 2 steps of 4 images.
    assert (last["format_version"], last["epoch"], last["step"]) == (2, 2, 10)
    assert any(k.startswith("roi_head.box_head.tail.") for k in last["model"])
