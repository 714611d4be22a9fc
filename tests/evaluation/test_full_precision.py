"""Written detections keep full precision: re-scoring them with a pycocotools-compatible COCOeval
(faster-coco-eval's) against the instances file gives exactly the COCO AP detkit reported."""

from __future__ import annotations

import json

import pytest
import torch

CLASSES = ["circle", "square"]


def _coco_split(root, num_images: int = 6, split: str = "val"):
    from detkit.data.export import export_synthetic
    from detkit.data.synthetic import SyntheticShapes

    data = SyntheticShapes(SyntheticShapes.Params(num_images=num_images, image_size=(64, 64), object_size=(16, 32),
                                                  classes=CLASSES, split=split))
    return export_synthetic(root, "coco", data)


def _rescore(instances, detections) -> list[float]:
    # faster-coco-eval's pycocotools-compatible API (its plain COCOeval only says to use this one),
    # reading the two files as a user would.
    from faster_coco_eval import COCO, COCOeval_faster

    gt = COCO(str(instances))
    ev = COCOeval_faster(gt, gt.loadRes(str(detections)), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [float(s) for s in ev.stats[:3]]


def _close_scores(path):
    """The classifier's weights scaled down: its scores differ in the sixth decimal, as a trained
    model's many similar detections do, so that a written score rounded to five decimals would tie."""
    from detkit.engine.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(path)
    ckpt["model"]["roi_head.score.weight"] *= 1e-4
    return save_checkpoint(path, **ckpt)


@pytest.mark.slow
def test_detections_json_rescored_gives_exactly_the_reported_coco_ap(tmp_path, tiny_dict, write_tiny, tiny_checkpoint):
    from detkit.engine.eval_checkpoint import evaluate_checkpoint

    instances = _coco_split(tmp_path / "coco")
    tiny_dict["data"]["val"] = {"type": "coco", "root": str(tmp_path / "coco" / "images"),
                                "annotations": str(instances)}
    tiny_dict["eval"] = {"metric": ["coco"], "score_thresh": 0.0}
    config = write_tiny(tiny_dict, "coco.yaml")
    ckpt = _close_scores(tiny_checkpoint(tmp_path / "run" / "last.pt", CLASSES, confident=False))
    result = evaluate_checkpoint(ckpt, config, out=tmp_path / "ev")
    reported = [result["metrics"][f"coco/{k}"] for k in ("AP", "AP50", "AP75")]
    rows = json.loads((tmp_path / "ev" / "detections.json").read_text())
    assert len(rows) > 20 and reported[1] > 0  # detections that score: the comparison is not of zeros
    assert _rescore(instances, tmp_path / "ev" / "detections.json") == reported  # exactly, not approximately


def test_predict_records_keep_full_precision():
    from detkit.api import Detections

    det = Detections(torch.tensor([[1.123456, 2.0, 30.987654, 40.5]]), torch.tensor([0.123456789]),
                     torch.tensor([0]), ["circle"], (64, 64))
    row = det.to_dict()["detections"][0]
    assert row["box"] == torch.tensor([[1.123456, 2.0, 30.987654, 40.5]]).tolist()[0]
    assert row["score"] == torch.tensor([0.123456789]).item()


@pytest.mark.slow
def test_trainings_val_detections_json_rescored_gives_exactly_the_logged_coco_ap(tmp_path, tiny_dict, write_tiny):
    from detkit.config import load_config
    from detkit.engine.train import train

    train_json = _coco_split(tmp_path / "coco", 8, "train")
    val_json = _coco_split(tmp_path / "coco", 12)
    # root: the folder synth wrote (its images/ is found), as a user would first write it.
    tiny_dict["data"].update(train={"type": "coco", "root": str(tmp_path / "coco"), "annotations": str(train_json)},
                             val={"type": "coco", "root": str(tmp_path / "coco"), "annotations": str(val_json)})
    tiny_dict["train"]["epochs"] = 1
    tiny_dict["model"]["rpn"]["proposal"]["test_post_nms"] = 100  # many detections of close scores
    tiny_dict["eval"] = {"interval": 1, "metric": ["coco"], "score_thresh": 0.0}
    run_dir = train(load_config(write_tiny(tiny_dict, "coco.yaml")), out_dir=tmp_path / "run")
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"]
    logged = [evals[-1][f"coco/{k}"] for k in ("AP", "AP50", "AP75")]
    assert logged[1] > 0 and len(json.loads((run_dir / "val_detections.json").read_text())) > 20
    assert _rescore(val_json, run_dir / "val_detections.json") == logged
