"""Prediction and target records for the evaluator tests."""

import torch


def P(boxes, scores, labels):
    """A prediction: ``{"boxes", "scores", "labels"}`` from plain lists."""
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.long)}


def T(boxes, labels, difficult=None):
    """A target: ``{"boxes", "labels"[, "difficult"]}`` from plain lists."""
    t = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels, dtype=torch.long)}
    if difficult is not None:
        t["difficult"] = torch.tensor(difficult)
    return t
