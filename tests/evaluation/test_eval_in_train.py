"""The periodic evaluation inside `detkit train`: eval.metric, eval.best and the detections file."""

from __future__ import annotations

import json

import pytest

from detkit.api import train
from detkit.engine.checkpoint import load_checkpoint

@pytest.mark.slow
def test_train_evaluates_every_metric_and_best_follows_eval_best(tmp_path, tiny_dict):
    tiny_dict["train"]["epochs"] = 3
    tiny_dict["eval"].update(metric=["voc", "coco"], best="coco/AP50")
    run_dir = train(tiny_dict, out_dir=tmp_path / "run")
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
