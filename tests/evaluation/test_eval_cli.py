"""``detkit eval``: the files it writes and ``--set eval.metric=...``."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from detkit.cli import app
from detkit.engine.checkpoint import save_checkpoint
from detkit.registry import registry

runner = CliRunner()

CONFIG = {
    "model": {
        "type": "faster_rcnn",
        "backbone": {"type": "tiny", "channels": [8, 8, 16, 16], "tail_features": 16},
        "rpn": {"type": "rpn", "mid_channels": 8, "proposal": {"test_post_nms": 20}},
        "preprocess": {"min_size": 64, "max_size": 64},
    },
    "data": {
        "train": {"type": "synthetic", "num_images": 4, "image_size": [64, 64], "classes": ["circle", "square"]},
        "val": {"type": "synthetic", "num_images": 3, "image_size": [64, 64], "classes": ["circle", "square"],
                "split": "val"},
        "batch_size": 2,
    },
    "eval": {"score_thresh": 0.0},
}


@pytest.fixture
def checkpoint(tmp_path):
    from detkit.config import validate

    cfg = validate(CONFIG).to_dict()
    torch.manual_seed(0)
    model = registry("detector").build(cfg["model"], num_classes=2)
    with torch.no_grad():  # every RoI a confident "square": detections to count
        model.roi_head.score.bias.copy_(torch.tensor([0.0, 0.0, 10.0]))
    return save_checkpoint(tmp_path / "run" / "last.pt", model=model.state_dict(), config=cfg,
                           classes=["circle", "square"])


def test_eval_writes_metrics_curves_confusion_and_detections(checkpoint, tmp_path):
    out = tmp_path / "ev"
    result = runner.invoke(app, ["eval", str(checkpoint), "--set", "eval.metric=[coco, voc]",
                                 "--set", "eval.best=coco/AP50", "--set", "eval.score_thresh=0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"metrics.json", "pr_curves.png", "confusion_matrix.png",
                                               "detections.json"}
    for png in ("pr_curves.png", "confusion_matrix.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_key"] == "coco/AP50" and metrics["images"] == 3
    assert {"coco/AP", "coco/AP50", "coco/AR100", "voc/mAP"} <= set(metrics["metrics"])
    counts = torch.tensor(metrics["confusion_matrix"]["counts"])
    assert counts.shape == (3, 3) and metrics["confusion_matrix"]["labels"] == ["circle", "square", "background"]
    # Only confident "square" boxes (the whole image) above score 0.5: false alarms and misses.
    assert counts[:, 0].sum() == 0 and counts[2, 1] == 3 and counts[:2, 2].sum() > 0
    detections = json.loads((out / "detections.json").read_text())
    assert detections and set(detections[0]) == {"image_id", "category_id", "bbox", "score"}
    assert {d["category_id"] for d in detections} == {2}  # label 1 -> id 2 without data set ids
    assert "coco: AP=" in result.output and "best.pt follows coco/AP50" in result.output


def test_eval_metric_coco_alone_and_default_out_dir(checkpoint):
    result = runner.invoke(app, ["eval", str(checkpoint), "--set", "eval.metric=coco"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((checkpoint.parent / "eval" / "metrics.json").read_text())
    assert metrics["best_key"] == "coco/AP" and not any(k.startswith("voc/") for k in metrics["metrics"])


def test_eval_unknown_metric_is_one_line(checkpoint):
    result = runner.invoke(app, ["eval", str(checkpoint), "--set", "eval.metric=mAP"])
    assert result.exit_code == 2
    assert "eval.metric[0].type: unknown evaluator 'mAP'" in result.output
    assert "Traceback" not in result.output


def test_eval_set_model_changes_the_test_time_settings_of_the_stored_model(checkpoint, tmp_path):
    """``--set model.*`` is applied to the stored model around the checkpoint's weights (it was ignored)."""

    def detections(*sets):
        out = tmp_path / f"ev{len(sets)}"
        result = runner.invoke(app, ["eval", str(checkpoint), *[a for s in sets for a in ("--set", s)],
                                     "--out", str(out)])
        assert result.exit_code == 0, result.output
        return json.loads((out / "detections.json").read_text())

    stored = detections()
    again = detections("eval.iou_thresh=0.5")  # not a model setting: the same model
    larger = detections("model.preprocess.min_size=96", "model.preprocess.max_size=96")
    assert len(stored) >= 3 and again == stored
    assert larger != stored  # the 64 px model seen at 96 px: other boxes and scores
    bad = runner.invoke(app, ["eval", str(checkpoint), "--set", "model.backbone.channels=[4,4,4,4]"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output
