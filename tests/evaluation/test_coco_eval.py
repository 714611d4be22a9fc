"""COCO AP through faster-coco-eval, on cases computed by hand (101 recall points)."""

from __future__ import annotations

import math

import pytest
import torch

from detkit.evaluation.coco import COCOEvaluator

from .records import P, T


SMALL, MEDIUM, LARGE = [0, 0, 20, 20], [0, 0, 50, 50], [0, 0, 100, 100]
FAR = [200, 200, 220, 220]


def _run(preds, targets, classes=("a", "b")):
    ev = COCOEvaluator(classes=list(classes))
    ev.update(preds, targets)
    return ev.compute()


def test_perfect_predictions():
    res = _run([P([SMALL, LARGE], [0.9, 0.8], [0, 1]), P([MEDIUM], [0.7], [0])],
               [T([SMALL, LARGE], [0, 1]), T([MEDIUM], [0])])
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert res[key] == pytest.approx(1.0), key
    assert res["per_class"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}


def test_ranked_tp_fp_tp():
    # Recall 1/2 at precision 1, recall 1 at precision 2/3, at every IoU threshold:
    # 101-point interpolation gives (51 * 1 + 50 * 2/3) / 101.
    res = _run([P([SMALL, FAR, MEDIUM], [0.9, 0.8, 0.7], [0, 0, 0])], [T([SMALL, MEDIUM], [0, 0])])
    expected = (51 + 50 * 2 / 3) / 101
    assert res["AP"] == pytest.approx(expected) and res["AP50"] == pytest.approx(expected)
    assert res["per_class"]["a"] == pytest.approx(expected) and math.isnan(res["per_class"]["b"])
    assert math.isnan(res["APl"])  # no large boxes


def test_iou_thresholds():
    # IoU 0.62 is a hit at 0.50, 0.55 and 0.60 out of 0.50:0.05:0.95.
    res = _run([P([[0, 0, 100, 62]], [0.9], [0])], [T([LARGE], [0])])
    assert res["AP50"] == pytest.approx(1.0) and res["AP75"] == pytest.approx(0.0)
    assert res["AP"] == pytest.approx(0.3)


def test_difficult_boxes_are_ignored_regions():
    # The top detection lies on a difficult (crowd) box: neither TP nor FP.
    res = _run([P([LARGE, SMALL], [0.9, 0.8], [0, 0])], [T([SMALL, LARGE], [0, 0], [False, True])])
    assert res["per_class"]["a"] == pytest.approx(1.0)


def test_empty_predictions():
    res = _run([P([], [], [])], [T([SMALL], [0])])
    assert res["AP"] == 0.0 and res["APs"] == 0.0 and math.isnan(res["APl"])
    assert res["per_class"]["a"] == 0.0 and math.isnan(res["per_class"]["b"])
    assert math.isnan(_run([P([], [], [])], [T([], [])])["AP"])
