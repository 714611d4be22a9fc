"""COCO box AP through faster-coco-eval, with the VOC evaluator's interface.

Ground truth and detections are built in memory: image ids ``1..N`` in
update order, category ids ``label + 1``.  ``difficult`` boxes become
``iscrowd`` regions (matched but neither TP nor FP, as COCO ignores crowds).
The small/medium/large split uses the box area (data sets here carry no
segmentation areas).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

_STAT_NAMES = ("mAP", "AP50", "AP75", "APs", "APm", "APl")


class COCOEvaluator:
    """``update(predictions, targets)`` per batch, then ``compute()``.

    ``compute()`` returns ``{"mAP": AP@[.5:.95], "AP50", "AP75", "APs",
    "APm", "APl", "AP": {class: AP@[.5:.95]}}``; NaN where undefined (no gt).
    """

    def __init__(self, classes: Sequence[str], max_dets: int = 100):
        self.classes = list(classes)
        self.max_dets = max_dets
        self.reset()

    def reset(self) -> None:
        self._gt: list[dict[str, Any]] = []
        self._dt: list[np.ndarray] = []
        self._images: list[dict[str, Any]] = []

    def update(self, predictions: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Any]]) -> None:
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
        for pred, tgt in zip(predictions, targets):
            image_id = len(self._images) + 1
            self._images.append({"id": image_id})
            gt = tgt["boxes"].detach().double().cpu().reshape(-1, 4)
            gl = tgt["labels"].detach().long().cpu().reshape(-1)
            diff = tgt.get("difficult")
            gd = diff.detach().bool().cpu().reshape(-1) if diff is not None else torch.zeros(len(gl), dtype=torch.bool)
            wh = (gt[:, 2:] - gt[:, :2]).clamp(min=0)
            for box, size, label, crowd in zip(gt[:, :2].tolist(), wh.tolist(), gl.tolist(), gd.tolist()):
                self._gt.append({
                    "id": len(self._gt) + 1, "image_id": image_id, "category_id": label + 1,
                    "bbox": [box[0], box[1], size[0], size[1]], "area": size[0] * size[1],
                    "iscrowd": int(crowd),
                })  # fmt: skip
            boxes = pred["boxes"].detach().double().cpu().reshape(-1, 4)
            if boxes.shape[0]:
                rows = torch.cat(
                    (
                        torch.full((boxes.shape[0], 1), float(image_id), dtype=torch.float64),
                        boxes[:, :2],
                        (boxes[:, 2:] - boxes[:, :2]).clamp(min=0),
                        pred["scores"].detach().double().cpu().reshape(-1, 1),
                        pred["labels"].detach().double().cpu().reshape(-1, 1) + 1,
                    ),
                    dim=1,
                )  # [K, 7]: image_id, x, y, w, h, score, category_id
                self._dt.append(rows.numpy())

    def compute(self) -> dict[str, Any]:
        from faster_coco_eval import COCO, COCOeval_faster

        nan_result = {**{k: math.nan for k in _STAT_NAMES}, "AP": {c: math.nan for c in self.classes}}
        if not self._gt:
            return nan_result
        cats = [{"id": k + 1, "name": c} for k, c in enumerate(self.classes)]
        quiet = logging.getLogger("detkit.evaluation.coco").debug
        coco_gt = COCO({"images": self._images, "annotations": self._gt, "categories": cats}, print_function=quiet)
        if not self._dt:
            # Nothing detected: every defined AP is 0 (faster-coco-eval needs a detection to run).
            real = [a for a in self._gt if not a["iscrowd"]]
            areas = [a["area"] for a in real]
            ranges = {"APs": (0, 32**2), "APm": (32**2, 96**2), "APl": (96**2, math.inf)}
            out = {k: (0.0 if real else math.nan) for k in ("mAP", "AP50", "AP75")}
            for k, (lo, hi) in ranges.items():
                out[k] = 0.0 if any(lo <= a < hi for a in areas) else math.nan
            have = {a["category_id"] - 1 for a in real}
            out["AP"] = {c: (0.0 if k in have else math.nan) for k, c in enumerate(self.classes)}
            return out
        coco_dt = coco_gt.loadRes(np.concatenate(self._dt))
        ev = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=quiet)
        ev.params.maxDets = [1, 10, self.max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        stats = [float(s) for s in ev.stats[: len(_STAT_NAMES)]]
        out: dict[str, Any] = {k: (v if v >= 0 else math.nan) for k, v in zip(_STAT_NAMES, stats)}
        # precision: [iou thresholds, recall points, classes, area ranges, max dets]; -1 = undefined.
        prec = np.asarray(ev.eval["precision"])[:, :, :, 0, -1]
        per_class = {}
        for k, c in enumerate(self.classes):
            p = prec[:, :, k]
            per_class[c] = float(p[p > -1].mean()) if (p > -1).any() else math.nan
        out["AP"] = per_class
        return out
