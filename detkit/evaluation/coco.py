"""COCO box AP and AR through faster-coco-eval (its COCOeval, never a rewrite).

Ground truth and detections are handed to faster-coco-eval in memory: image
ids ``1..N`` in update order, category ids the data set's own
(``category_ids[label]``, or ``label + 1`` without them).  ``difficult`` boxes
become ``iscrowd`` regions (matched but neither TP nor FP, as COCO ignores
crowds).  The small/medium/large split uses the box area ``w * h`` (targets
carry no segmentation areas), so APs/APm/APl can differ slightly from an
evaluation against an official instances file on objects near 32² or 96² px.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from detkit.evaluation.base import Evaluator


def stat_names(max_dets: int = 100) -> tuple[str, ...]:
    """The names of COCOeval's twelve box statistics, in its ``stats`` order."""
    return ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", f"AR{max_dets}", "ARs", "ARm", "ARl")


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """``[K, 4]`` corners to COCO's ``[x, y, width, height]`` (negative sizes clamped to 0)."""
    return torch.cat((boxes[:, :2], (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)), dim=1)


def coco_results(
    predictions: Sequence[Mapping[str, Tensor]],
    image_ids: Sequence[int | str],
    category_ids: Sequence[int] | None = None,
    decimals: int | None = None,
) -> list[dict[str, Any]]:
    """Detections in the COCO results format: ``[{"image_id", "category_id", "bbox", "score"}]``.

    ``bbox`` is ``[x, y, w, h]`` in the pixels the predictions are in;
    ``category_id`` is ``category_ids[label]`` (``label + 1`` without them).
    Boxes and scores keep full precision unless ``decimals`` is given: re-scored
    by pycocotools, the file then gives exactly the AP detkit reported (rounding
    breaks score ties differently and moves IoUs across the thresholds).
    """
    out: list[dict[str, Any]] = []
    for pred, image_id in zip(predictions, image_ids):
        boxes = xyxy_to_xywh(pred["boxes"].detach().double().cpu().reshape(-1, 4)).tolist()
        scores = pred["scores"].detach().double().cpu().reshape(-1).tolist()
        labels = pred["labels"].detach().long().cpu().reshape(-1).tolist()
        for box, score, label in zip(boxes, scores, labels):
            out.append({
                "image_id": image_id,
                "category_id": category_ids[label] if category_ids is not None else label + 1,
                "bbox": box if decimals is None else [round(v, decimals) for v in box],
                "score": score if decimals is None else round(score, decimals),
            })  # fmt: skip
    return out


class COCOEvaluator(Evaluator):
    """``update(predictions, targets)`` per batch, then ``compute()``.

    ``compute()`` returns ``{"AP": AP@[.5:.95], "AP50", "AP75", "APs", "APm",
    "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl", "per_class": {class:
    AP@[.5:.95]}}``; NaN where undefined (no ground truth in that range).
    """

    headline = "AP"
    per_class_metric = "AP@[.5:.95]"  # per class, the mean over the ten IoUs as the headline

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        max_dets: int = Field(100, gt=10, description="detections per image for AP and the last AR")

    def __init__(
        self, params: "COCOEvaluator.Params | None" = None, *, classes: Sequence[str],
        category_ids: Sequence[int] | None = None,
    ):
        self.classes = list(classes)
        self.max_dets = (params if params is not None else self.Params()).max_dets
        self.category_ids = list(category_ids) if category_ids is not None else [k + 1 for k in range(len(classes))]
        if len(self.category_ids) != len(self.classes):
            raise ValueError(f"{len(self.category_ids)} category ids for {len(self.classes)} classes")
        self.reset()

    def reset(self) -> None:
        self._gt: list[dict[str, Any]] = []
        self._dt: list[np.ndarray] = []
        self._images: list[dict[str, Any]] = []

    def update(self, predictions: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Any]]) -> None:
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
        cat = torch.tensor(self.category_ids, dtype=torch.float64)
        for pred, tgt in zip(predictions, targets):
            image_id = len(self._images) + 1
            self._images.append({"id": image_id})
            gt = xyxy_to_xywh(tgt["boxes"].detach().double().cpu().reshape(-1, 4))
            gl = tgt["labels"].detach().long().cpu().reshape(-1)
            diff = tgt.get("difficult")
            gd = diff.detach().bool().cpu().reshape(-1) if diff is not None else torch.zeros(len(gl), dtype=torch.bool)
            for box, label, crowd in zip(gt.tolist(), gl.tolist(), gd.tolist()):
                self._gt.append({
                    "id": len(self._gt) + 1, "image_id": image_id, "category_id": self.category_ids[label],
                    "bbox": box, "area": box[2] * box[3], "iscrowd": int(crowd),
                })  # fmt: skip
            boxes = pred["boxes"].detach().double().cpu().reshape(-1, 4)
            if boxes.shape[0]:
                rows = torch.cat(
                    (
                        torch.full((boxes.shape[0], 1), float(image_id), dtype=torch.float64),
                        xyxy_to_xywh(boxes),
                        pred["scores"].detach().double().cpu().reshape(-1, 1),
                        cat[pred["labels"].detach().long().cpu().reshape(-1)][:, None],
                    ),
                    dim=1,
                )  # [K, 7]: image_id, x, y, w, h, score, category_id
                self._dt.append(rows.numpy())

    def compute(self) -> dict[str, Any]:
        from faster_coco_eval import COCO, COCOeval_faster

        names = stat_names(self.max_dets)
        if not self._gt:
            return {**{k: math.nan for k in names}, "per_class": {c: math.nan for c in self.classes}}
        cats = [{"id": i, "name": c} for i, c in zip(self.category_ids, self.classes)]
        quiet = logging.getLogger("detkit.evaluation.coco").debug
        coco_gt = COCO({"images": self._images, "annotations": self._gt, "categories": cats}, print_function=quiet)
        if not self._dt:
            return self._nothing_detected(names)
        coco_dt = coco_gt.loadRes(np.concatenate(self._dt))
        ev = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=quiet)
        ev.params.maxDets = [1, 10, self.max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        stats = [float(s) for s in ev.stats[: len(names)]]
        out: dict[str, Any] = {k: (v if v >= 0 else math.nan) for k, v in zip(names, stats)}
        # precision: [iou thresholds, recall points, categories (params.catIds order), areas, max dets]; -1 = undefined.
        prec = np.asarray(ev.eval["precision"])[:, :, :, 0, -1]
        column = {cid: j for j, cid in enumerate(ev.params.catIds)}
        per_class = {}
        for cid, c in zip(self.category_ids, self.classes):
            p = prec[:, :, column[cid]]
            per_class[c] = float(p[p > -1].mean()) if (p > -1).any() else math.nan
        out["per_class"] = per_class
        return out

    def _nothing_detected(self, names: Sequence[str]) -> dict[str, Any]:
        # faster-coco-eval needs at least one detection to run; with none, every
        # statistic that has ground truth is 0.
        real = [a for a in self._gt if not a["iscrowd"]]
        areas = [a["area"] for a in real]
        ranges = {"s": (0, 32**2), "m": (32**2, 96**2), "l": (96**2, math.inf)}
        out: dict[str, Any] = {}
        for k in names:
            size = k[-1] if k[-1] in ranges and k[:2] in ("AP", "AR") and len(k) == 3 else None
            if size is None:
                out[k] = 0.0 if real else math.nan
            else:
                lo, hi = ranges[size]
                out[k] = 0.0 if any(lo <= a < hi for a in areas) else math.nan
        have = {a["category_id"] for a in real}
        out["per_class"] = {c: (0.0 if i in have else math.nan) for i, c in zip(self.category_ids, self.classes)}
        return out
