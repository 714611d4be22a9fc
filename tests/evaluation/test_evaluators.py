"""Evaluator plugins: COCO numbers against faster-coco-eval itself, ids that are not contiguous,
VOC's two interpolations, the confusion matrix, and how eval.metric / eval.best pick them."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from detkit.sections import EvalConfig
from detkit.engine.evaluate import build_evaluators, compute_metrics, evaluate, best_key, ImageResult
from detkit.errors import ConfigError
from detkit.evaluation.coco import COCOEvaluator, coco_results, stat_names
from detkit.evaluation.confusion import confusion_matrix
from detkit.evaluation.voc import VOCEvaluator

from .records import P, T


def _reference_stats(gt: dict, detections: list[dict], cat_ids: list[int] | None = None) -> list[float]:
    """faster-coco-eval's own COCOeval on a ground-truth dict and a results list."""
    from faster_coco_eval import COCO, COCOeval_faster

    quiet = lambda *a, **k: None  # noqa: E731
    coco_gt = COCO(gt, print_function=quiet)
    ev = COCOeval_faster(coco_gt, coco_gt.loadRes(detections), "bbox", print_function=quiet)
    if cat_ids is not None:
        ev.params.catIds = cat_ids
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [float(s) for s in ev.stats[:12]]


def _random_case(seed: int, image_ids: list[int], num_classes: int):
    """Ground truth of many sizes (some difficult), detections near it, duplicates, misses and noise."""
    g = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for k, _ in enumerate(image_ids):
        n = 0 if k == 1 else 6  # one image has no ground truth: its detections are all false
        xy = torch.rand(n, 2, generator=g) * 300
        wh = 6 + torch.rand(n, 2, generator=g) ** 2 * 180  # small, medium and large boxes
        boxes = torch.cat((xy, xy + wh), 1)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        difficult = torch.rand(n, generator=g) < 0.15
        targets.append({"boxes": boxes, "labels": labels, "difficult": difficult})
        keep = torch.rand(n, generator=g) < 0.8  # some boxes are missed
        jitter = (torch.rand(n, 4, generator=g) - 0.5) * wh.repeat(1, 2) * 0.4
        found = (boxes + jitter)[keep]
        found_labels = torch.where(torch.rand(n, generator=g) < 0.85, labels,
                                   torch.randint(0, num_classes, (n,), generator=g))[keep]
        noise_xy = torch.rand(4, 2, generator=g) * 300
        noise = torch.cat((noise_xy, noise_xy + 10 + torch.rand(4, 2, generator=g) * 80), 1)
        pb = torch.cat((found, found[:2] + 3, noise))  # two near-duplicates, four false alarms
        pl = torch.cat((found_labels, found_labels[:2], torch.randint(0, num_classes, (4,), generator=g)))
        preds.append({"boxes": pb, "scores": torch.rand(len(pb), generator=g), "labels": pl})
    return preds, targets


def _gt_dict(targets, image_ids, cat_ids, classes):
    anns = []
    for t, image_id in zip(targets, image_ids):
        for box, label, diff in zip(t["boxes"].tolist(), t["labels"].tolist(), t["difficult"].tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat_ids[label],
                         "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": int(diff)})
    return {"images": [{"id": i, "width": 500, "height": 500} for i in image_ids], "annotations": anns,
            "categories": [{"id": c, "name": n} for c, n in zip(cat_ids, classes)]}


def test_coco_equals_faster_coco_eval_with_non_contiguous_ids():
    classes, cat_ids, image_ids = ["cat", "dog", "owl"], [3, 7, 12], [10, 4, 25, 8, 31]
    preds, targets = _random_case(0, image_ids, len(classes))
    ours = COCOEvaluator(classes=classes, category_ids=cat_ids)
    ours.update(preds, targets)
    res = ours.compute()

    gt = _gt_dict(targets, image_ids, cat_ids, classes)
    dets = coco_results(preds, image_ids, cat_ids)
    assert {d["category_id"] for d in dets} <= set(cat_ids) and {d["image_id"] for d in dets} == set(image_ids)
    ref = _reference_stats(gt, dets)
    for name, value in zip(stat_names(), ref):
        expected = math.nan if value < 0 else value
        assert res[name] == pytest.approx(expected, abs=1e-9, nan_ok=True), name
    assert 0.1 < res["AP"] < 0.9 and res["AR100"] > res["AR1"]  # a case with something to get wrong
    for cid, name in zip(cat_ids, classes):
        assert res["per_class"][name] == pytest.approx(_reference_stats(gt, dets, [cid])[0], abs=1e-9), name


def test_coco_results_format():
    rows = coco_results([P([[10.125, 20, 40, 30]], [0.87654321], [1])], [42], [5, 9])
    score = float(torch.tensor(0.87654321, dtype=torch.float32))  # the float32 score, not rounded
    assert rows == [{"image_id": 42, "category_id": 9, "bbox": [10.125, 20.0, 29.875, 10.0], "score": score}]
    assert coco_results([P([[0, 0, 1, 1]], [0.5], [0])], ["a"])[0]["category_id"] == 1  # no ids: label + 1


def _write_coco_set(root, images, cat_ids_names, annotations):
    """An instances file and PNGs: images = [(id, width, height)], annotations = [(image_id, cat_id, xywh)]."""
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id, w, h in images:
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "img" / f"{image_id}.png")
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "width": w, "height": h} for i, w, h in images],
        "categories": [{"id": c, "name": n} for c, n in cat_ids_names],
        "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                        for k, (i, c, b) in enumerate(annotations)],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return path


class ReplayDetector(torch.nn.Module):
    """Stands in for a detector: its eval forward returns given detections (original pixels).

    It checks that it is handed the original images, as ``predict`` is, and the eval settings.
    """

    def __init__(self, detections, orig_sizes):
        super().__init__()
        self.detections, self.orig_sizes, self.calls, self.settings = detections, orig_sizes, 0, []

    @contextmanager
    def detection_settings(self, score_thresh=None, nms_iou=None, max_detections=None):
        self.settings.append((score_thresh, nms_iou))
        yield

    def forward(self, images):
        assert not self.training
        out = []
        for image in images:
            assert tuple(image.shape[-2:]) == tuple(self.orig_sizes[self.calls])  # not resized by the data
            out.append(self.detections[self.calls])
            self.calls += 1
        return out


def test_evaluate_on_a_coco_file_matches_faster_coco_eval_on_that_file(tmp_path):
    from detkit.data.config import DataConfig
    from detkit.data.loader import build_dataset, build_loader

    # Category ids 9, 2, 5 (not contiguous, not sorted); image ids 30, 7, 12.
    images = [(30, 120, 90), (7, 100, 140), (12, 160, 160)]
    gt = [(30, 9, [10, 10, 40, 30]), (30, 2, [60, 40, 50, 45]), (7, 5, [5, 20, 30, 90]),
          (7, 9, [40, 100, 20, 20]), (12, 2, [0, 0, 150, 150]), (12, 5, [100, 10, 30, 30])]
    ann = _write_coco_set(tmp_path, images, [(9, "nine"), (2, "two"), (5, "five")], gt)
    data = DataConfig.model_validate({
        "train": {"type": "coco", "root": str(tmp_path / "img"), "annotations": str(ann)},
        "val": {"type": "coco", "root": str(tmp_path / "img"), "annotations": str(ann)},
    })
    dataset = build_dataset(data, "val")
    assert dataset.classes == ["two", "five", "nine"]  # labels follow sorted ids 2, 5, 9
    label = {2: 0, 5: 1, 9: 2}
    # Per image in id order (7, 12, 30): shifted true boxes, a wrong class, a false alarm.
    by_image = {7: [], 12: [], 30: []}
    for image_id, cid, (x, y, w, h) in gt:
        by_image[image_id].append(([x + 2, y - 1, x + w + 3, y + h], label[cid]))
    dets = []
    for k, image_id in enumerate(sorted(by_image)):
        boxes = [b for b, _ in by_image[image_id]] + [[1, 1, 15, 15]]
        labels = [l for _, l in by_image[image_id]] + [k % 3]
        labels[0] = (labels[0] + 1) % 3 if image_id == 12 else labels[0]
        dets.append(P(boxes, [0.9 - 0.1 * i for i in range(len(boxes))], labels))
    sizes = {i: (h, w) for i, w, h in images}
    model = ReplayDetector(dets, [sizes[i] for i in sorted(sizes)])
    loader = build_loader(dataset, batch_size=2, shuffle=False, num_workers=0)
    seen = []
    result = evaluate(model, loader, dataset.classes, EvalConfig(metric=["coco", "voc"]), torch.device("cpu"),
                      detections_path=tmp_path / "out" / "detections.json", progress=lambda d, t: seen.append((d, t)))
    assert seen == [(0, 3), (2, 3), (3, 3)]
    assert model.calls == 3 and model.settings == [(EvalConfig().score_thresh, EvalConfig().nms_iou)]
    written = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert {d["image_id"] for d in written} == {7, 12, 30} and {d["category_id"] for d in written} == {2, 5, 9}
    # Back in the original image's pixels, as [x, y, w, h].
    first = [d["bbox"] for d in written if d["image_id"] == 7][0]
    x, y, w, h = gt[2][2]
    assert first == pytest.approx([x + 2, y - 1, w + 1, h + 1], abs=0.02)
    ref = _reference_stats(json.loads(ann.read_text()), written)
    for name, value in zip(stat_names(), ref):
        expected = math.nan if value < 0 else value
        assert result["metrics"][f"coco/{name}"] == pytest.approx(expected, abs=1e-6, nan_ok=True), name
    assert 0.2 < result["metrics"]["coco/AP"] < 0.95
    assert result["best_key"] == "coco/AP" and result["best"] == result["metrics"]["coco/AP"]
    assert set(result["per_class"]) == {"coco", "voc"} and set(result["per_class"]["coco"]) == {"two", "five", "nine"}


def test_voc_reports_both_interpolations():
    # Ranked TP, FP, TP over two boxes: all-point 5/6, 11-point (6 + 5 * 2/3) / 11.
    A, B, FAR = [0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]
    preds, targets = [P([A, FAR, B], [0.9, 0.8, 0.7], [0, 0, 0])], [T([A, B], [0, 0])]
    for use_07, headline in ((False, 5 / 6), (True, (6 + 5 * 2 / 3) / 11)):
        ev = VOCEvaluator(VOCEvaluator.Params(iou_thresh=0.5, use_07_metric=use_07), classes=["a"])
        ev.update(preds, targets)
        res = ev.compute()
        assert res["mAP_allpt"] == pytest.approx(5 / 6) and res["mAP_11pt"] == pytest.approx((6 + 5 * 2 / 3) / 11)
        assert res["mAP"] == pytest.approx(headline) and res["per_class"]["a"] == pytest.approx(headline)


def test_confusion_matrix_counts_matches_confusions_misses_and_false_alarms():
    A, B, FAR, C = [0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60], [70, 70, 80, 80]
    preds = [
        P([A, B, FAR, C], [0.9, 0.8, 0.7, 0.01], [0, 0, 1, 1]),  # hit, b taken for a, false b, below score
        P([B], [0.9], [1]),  # on a difficult box: not counted
    ]
    targets = [T([A, B], [0, 1]), T([A, B], [0, 1], [False, True])]
    m = confusion_matrix(preds, targets, num_classes=2, iou_thresh=0.5, score_thresh=0.05)
    # rows: true a, b, background; columns: predicted a, b, background
    assert m.tolist() == [[1, 0, 1], [1, 0, 0], [0, 1, 0]]


def test_eval_metric_and_best_pick_the_evaluators():
    evs = build_evaluators(EvalConfig(iou_thresh=0.3, use_07_metric=True), ["a"])
    assert list(evs) == ["voc"] and evs["voc"].iou_thresh == 0.3 and evs["voc"].use_07_metric
    cfg = EvalConfig(iou_thresh=0.3, metric=[{"type": "voc", "iou_thresh": 0.7}, "coco"])
    evs = build_evaluators(cfg, ["a"])
    assert evs["voc"].iou_thresh == 0.7 and isinstance(evs["coco"], COCOEvaluator)
    assert best_key(cfg, evs) == "voc/mAP"
    assert best_key(EvalConfig(metric="coco"), build_evaluators(EvalConfig(metric="coco"), ["a"])) == "coco/AP"
    record = ImageResult("1", P([[0, 0, 10, 10]], [0.9], [0]), T([[0, 0, 10, 10]], [0]))
    out = compute_metrics([record], ["a"], EvalConfig(metric=["voc", "coco"], best="coco/AP75"))
    assert out["best_key"] == "coco/AP75" and out["best"] == out["mAP"] == pytest.approx(1.0)
    assert {"voc/mAP", "voc/mAP_11pt", "voc/mAP_allpt", "coco/AP", "coco/AR1", "coco/APl"} <= set(out["metrics"])
    with pytest.raises(ConfigError, match="eval.best: 'coco/AP99' is not a metric"):
        compute_metrics([record], ["a"], EvalConfig(metric="coco", best="coco/AP99"))
    with pytest.raises(ValueError, match="best: 'voc/mAP' should be"):
        EvalConfig(metric="coco", best="voc/mAP")
