"""The validation mAP a training run reports is what ``detkit predict`` and the evaluator give.

On a VOC set of JPEG files of several sizes, none of them the network's input
size: training's evaluation and ``predict`` must run the same preprocessing
(the detector's own) on the same original images.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from detkit.cli import app
from detkit.config import load_config
from detkit.data.export import export_synthetic
from detkit.data.synthetic import SyntheticShapes
from detkit.engine.train import train
from detkit.evaluation.voc import VOCEvaluator
from detkit.registry import registry


@pytest.mark.slow
def test_the_reported_validation_map_equals_predict_plus_the_evaluator(tmp_path, tiny_dict, write_tiny):
    root = tmp_path / "voc"
    for split, n in (("train", 8), ("val", 4)):
        # Heights and widths of 90-150 px each: every image is resized (to a 64 px short side), by its own factors.
        synth = SyntheticShapes(SyntheticShapes.Params(num_images=n, size_range=(90, 150), object_size=(24, 48),
                                                       split=split, seed=2))
        export_synthetic(root, "voc", synth, image_format="jpg")
    classes = ["circle", "square", "triangle", "cross"]
    voc = {"type": "voc", "root": str(root), "classes": classes}
    tiny_dict["data"].update(train={**voc, "split": "train"}, val={**voc, "split": "val", "use_difficult": True})
    tiny_dict["model"]["preprocess"] = {"min_size": 64, "max_size": 100}
    tiny_dict["model"]["rpn"]["proposal"]["test_post_nms"] = 100  # enough boxes that some hit, untrained
    tiny_dict["train"].update(epochs=1, optimizer={"type": "sgd", "lr": 0.02, "momentum": 0.9})
    tiny_dict["eval"] = {"interval": 1, "score_thresh": 0.01, "nms_iou": 0.3, "metric": ["voc"]}
    config = write_tiny(tiny_dict)
    run_dir = train(load_config(config), out_dir=tmp_path / "run")
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"]
    assert len(evals) == 1
    reported = evals[0]["voc/mAP"]

    val = registry("dataset").build({**voc, "split": "val", "use_difficult": True})
    files = sorted((root / "JPEGImages").glob("val_*.jpg"))
    assert len(files) == len(val) == 4
    sizes = {val.annotation(i)[0] for i in range(len(val))}
    assert len(sizes) == 4 and all(min(s) != 64 for s in sizes)  # four sizes, each resized
    out = tmp_path / "predictions"
    result = CliRunner().invoke(app, ["predict", str(run_dir / "last.pt"), *map(str, files), "--out", str(out),
                                      "--score-thresh", "0.01", "--nms-iou", "0.3"])
    assert result.exit_code == 0, result.output

    evaluator = VOCEvaluator(VOCEvaluator.Params(iou_thresh=0.5, use_07_metric=False), classes=classes)
    detections = 0
    for i in range(len(val)):
        (h, w), target = val.annotation(i)
        record = json.loads((out / f"{target['image_id']}.json").read_text())
        assert (record["height"], record["width"]) == (h, w)
        dets = record["detections"]
        detections += len(dets)
        prediction = {"boxes": torch.tensor([d["box"] for d in dets], dtype=torch.float32).reshape(-1, 4),
                      "scores": torch.tensor([d["score"] for d in dets], dtype=torch.float32),
                      "labels": torch.tensor([d["label"] for d in dets], dtype=torch.int64)}
        evaluator.update([prediction], [{k: target[k] for k in ("boxes", "labels", "difficult")}])
    predicted = evaluator.compute()["mAP"]
    assert detections > 0 and predicted > 0  # a comparison of something
    assert predicted == pytest.approx(reported, abs=1e-9)
