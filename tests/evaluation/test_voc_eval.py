"""VOC AP against hand-computed values and a plain-loop reimplementation of the devkit."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou

from detkit.evaluation.voc import VOCEvaluator, average_precision

from .records import P, T


A, B, FAR = [0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]


def voc(classes, iou_thresh=0.5, use_07_metric=False):
    """Built from its Params as the registry builds it; a config's eval section fills the thresholds."""
    return VOCEvaluator(VOCEvaluator.Params(iou_thresh=iou_thresh, use_07_metric=use_07_metric),
                        classes=list(classes))


def _ap(preds, targets, classes=("a", "b"), **kw):
    ev = voc(classes, **kw)
    ev.update(preds, targets)
    return ev.compute()


def test_two_gt_three_ranked_detections():
    # Ranked TP, FP, TP: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    preds, targets = [P([A, FAR, B], [0.9, 0.8, 0.7], [0, 0, 0])], [T([A, B], [0, 0])]
    res = _ap(preds, targets)
    assert res["per_class"]["a"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert math.isnan(res["per_class"]["b"]) and res["mAP"] == pytest.approx(5 / 6)
    # 11-point: recall >= 0..0.5 gives precision 1, recall >= 0.6..1 gives 2/3.
    assert _ap(preds, targets, use_07_metric=True)["per_class"]["a"] == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_perfect_predictions():
    targets = [T([A, B], [0, 1]), T([FAR], [1])]
    preds = [P([B, A], [0.3, 0.4], [1, 0]), P([FAR], [0.99], [1])]
    res = _ap(preds, targets)
    assert res["per_class"] == {"a": 1.0, "b": 1.0} and res["mAP"] == 1.0


def test_empty_predictions_score_zero():
    res = _ap([P([], [], []), P([], [], [])], [T([A], [0]), T([B], [1])])
    assert res["per_class"] == {"a": 0.0, "b": 0.0} and res["mAP"] == 0.0


def test_difficult_is_neither_tp_nor_fp():
    # The top detection hits a difficult box: ignored, so precision stays 1.
    res = _ap([P([B, A], [0.9, 0.8], [0, 0])], [T([A, B], [0, 0], [False, True])])
    assert res["per_class"]["a"] == 1.0
    # A class whose only boxes are difficult has no positives: NaN, left out of the mean.
    res = _ap([P([A, B], [0.9, 0.8], [0, 1])], [T([A, B], [0, 1], [False, True])])
    assert res["per_class"]["a"] == 1.0 and math.isnan(res["per_class"]["b"]) and res["mAP"] == 1.0


def test_each_gt_matched_once_and_duplicates_are_fp():
    # The second detection's best box (A, IoU 1) is taken: a false positive, even though
    # it also overlaps the free box A2 (IoU 0.83) - the devkit's rule.
    a2 = [0, 0, 10, 12]
    res = _ap([P([A, A], [0.9, 0.8], [0, 0])], [T([A, a2], [0, 0])])
    assert res["per_class"]["a"] == pytest.approx(0.5)


def test_wrong_class_and_low_iou_do_not_match():
    half = [5, 0, 15, 10]  # IoU with A = 50 / 150 = 1/3
    assert _ap([P([A], [0.9], [1])], [T([A], [0])])["per_class"]["a"] == 0.0
    assert _ap([P([half], [0.9], [0])], [T([A], [0])])["per_class"]["a"] == 0.0
    assert _ap([P([half], [0.9], [0])], [T([A], [0])], iou_thresh=0.3)["per_class"]["a"] == 1.0


def test_ranking_is_global_across_images():
    # Image 2's 0.9 detection is a FP ranked above image 1's TP at 0.5; 2 positives.
    preds = [P([A], [0.5], [0]), P([FAR], [0.9], [0])]
    targets = [T([A], [0]), T([B], [0])]
    assert _ap(preds, targets)["per_class"]["a"] == pytest.approx(0.25)
    assert _ap(preds, targets, use_07_metric=True)["per_class"]["a"] == pytest.approx(6 * 0.5 / 11)


def test_average_precision_interpolates():
    rec = torch.tensor([0.25, 0.25, 0.5, 0.75])
    prec = torch.tensor([1.0, 0.5, 2 / 3, 0.75])
    # Interpolated precision: max over later ranks -> 1, 0.75, 0.75, 0.75.
    assert average_precision(rec, prec) == pytest.approx(0.25 + 0.25 * 0.75 + 0.25 * 0.75)
    assert average_precision(torch.zeros(0), torch.zeros(0)) == 0.0


def _reference_ap(preds, targets, cls, thr=0.5):
    """The devkit's loop, written plainly: one detection at a time in global score order."""
    dets = [(float(s), i, b) for i, p in enumerate(preds) for b, s, l in zip(p["boxes"], p["scores"], p["labels"]) if l == cls]
    dets.sort(key=lambda d: -d[0])
    gts = [(t["boxes"][t["labels"] == cls], t["difficult"][t["labels"] == cls]) for t in targets]
    taken = [torch.zeros(len(g[0]), dtype=torch.bool) for g in gts]
    npos = sum(int((~d).sum()) for _, d in gts)
    tp, fp = [], []
    for _, i, b in dets:
        g, d = gts[i]
        if len(g) == 0:
            tp.append(0); fp.append(1)  # noqa: E702
            continue
        ious = box_iou(b[None].double(), g.double())[0]
        j = int(ious.argmax())
        if ious[j] >= thr:
            if d[j]:
                continue
            if not taken[i][j]:
                taken[i][j] = True
                tp.append(1); fp.append(0)  # noqa: E702
            else:
                tp.append(0); fp.append(1)  # noqa: E702
        else:
            tp.append(0); fp.append(1)  # noqa: E702
    if npos == 0:
        return math.nan
    ap, ctp, cfp, prev_r = 0.0, 0, 0, 0.0
    precs, recs = [], []
    for t_, f_ in zip(tp, fp):
        ctp += t_; cfp += f_  # noqa: E702
        recs.append(ctp / npos); precs.append(ctp / (ctp + cfp))  # noqa: E702
    for k in range(len(recs)):
        ap += (recs[k] - prev_r) * max(precs[k:])
        prev_r = recs[k]
    return ap


def test_matches_plain_devkit_loop_on_random_data():
    g = torch.Generator().manual_seed(0)
    preds, targets = [], []
    for _ in range(30):
        n_gt, n_det = int(torch.randint(0, 6, (1,), generator=g)), int(torch.randint(0, 10, (1,), generator=g))
        xy = torch.rand(n_gt, 2, generator=g) * 80
        gt = torch.cat((xy, xy + 10 + torch.rand(n_gt, 2, generator=g) * 30), 1)
        gl = torch.randint(0, 3, (n_gt,), generator=g)
        # Detections: jittered copies of gt boxes (some duplicated) plus random boxes.
        src = torch.randint(0, max(n_gt, 1), (n_det,), generator=g)
        base = gt[src] if n_gt else torch.zeros(n_det, 4) + torch.tensor([0, 0, 20, 20])
        det = base + torch.randn(n_det, 4, generator=g) * 4
        det[:, 2:] = torch.maximum(det[:, 2:], det[:, :2] + 1)
        dl = torch.where(torch.rand(n_det, generator=g) < 0.8, gl[src] if n_gt else torch.zeros(n_det, dtype=torch.long),
                         torch.randint(0, 3, (n_det,), generator=g))
        preds.append({"boxes": det, "scores": torch.rand(n_det, generator=g), "labels": dl})
        targets.append({"boxes": gt, "labels": gl, "difficult": torch.rand(n_gt, generator=g) < 0.15})
    ev = voc(["a", "b", "c"])
    for k in range(0, 30, 7):  # several update() calls
        ev.update(preds[k : k + 7], targets[k : k + 7])
    res = ev.compute()
    assert ev.num_images == 30
    for c, name in enumerate("abc"):
        ref = _reference_ap(preds, targets, c)
        assert res["per_class"][name] == pytest.approx(ref, abs=1e-9), name
    assert 0.2 < res["mAP"] < 0.95  # a non-trivial case


def test_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="label out of range"):
        voc(["a"]).update([P([A], [0.9], [3])], [T([A], [0])])


def test_unset_thresholds_are_refused_not_guessed():
    # None means "eval.iou_thresh / eval.use_07_metric": build_evaluators fills them; alone it is an error.
    with pytest.raises(ValueError, match="iou_thresh, use_07_metric not given"):
        VOCEvaluator(VOCEvaluator.Params(), classes=["a"])
