"""The periodic evaluation inside `detkit train`: eval.metric, eval.best and the detections file."""

from __future__ import annotations

import json

import pytest

from detkit.api import train
from detkit.engine.checkpoint import load_checkpoint

CONFIG = {
    "model": {
        "type": "faster_rcnn",
        "backbone": {"type": "tiny", "channels": [8, 16, 16, 32], "tail_features": 32},
        "rpn": {"type": "rpn", "mid_channels": 16, "anchor": {"scales": [1, 2, 4], "offset": 0.5},
                "proposal": {"train_pre_nms": 200, "train_post_nms": 32, "test_pre_nms": 200,
                             "test_post_nms": 16, "min_size": 2},
                "anchor_target": {"type": "anchor_target", "n_sample": 32}},
        "roi_head": {"type": "roi_head", "pooler": {"type": "roi_pool"},
                     "proposal_target": {"type": "proposal_target", "n_sample": 16}},
        "preprocess": {"min_size": 64, "max_size": 64},
    },
    "data": {
        "train": {"type": "synthetic", "num_images": 8, "image_size": [64, 64], "object_size": [16, 32]},
        "val": {"type": "synthetic", "num_images": 4, "image_size": [64, 64], "object_size": [16, 32],
                "split": "val"},
        "batch_size": 4,
    },
    "train": {
        "epochs": 3,
        "optimizer": {"type": "sgd", "lr": 0.01},
        "log_interval": 1,
    },
    "eval": {"interval": 1, "score_thresh": 0.0, "metric": ["voc", "coco"], "best": "coco/AP50"},
}


@pytest.mark.slow
def test_train_evaluates_every_metric_and_best_follows_eval_best(tmp_path):
    run_dir = train(CONFIG, out_dir=tmp_path / "run")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    evals = [r for r in map(json.loads, lines) if r["type"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1, 2]
    for r in evals:
        assert r["best_key"] == "coco/AP50" and r["mAP"] == r["coco/AP50"]
        assert {"voc/mAP", "voc/mAP_11pt", "coco/AP", "coco/AR100"} <= set(r)
    best = load_checkpoint(run_dir / "best.pt")
    assert best["metrics"]["best_key"] == "coco/AP50"
    scores = [r["coco/AP50"] for r in evals]
    assert best["epoch"] == scores.index(max(scores)) + 1  # the first epoch with the highest coco/AP50
    detections = json.loads((run_dir / "val_detections.json").read_text())
    assert detections and set(detections[0]) == {"image_id", "category_id", "bbox", "score"}
    assert {d["category_id"] for d in detections} <= {1, 2, 3, 4}
