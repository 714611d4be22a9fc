"""Fixtures for the export tests: a quickstart-like tiny detector and the faster-rcnn-pytorch reference helpers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from detkit.registry import registry

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def reference():
    """tests/builtins/test_import_reference.py as a module: its random faster-rcnn-pytorch models and helpers.

    Loaded by path (tests/ is not a package), so the export tests build the
    imported VGG16 exactly as the import tests do, without a copy of that code.
    """
    path = REPO / "tests" / "builtins" / "test_import_reference.py"
    spec = importlib.util.spec_from_file_location("detkit_tests_import_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quickstart_model_config(**changes) -> dict:
    """The model section of configs/quickstart.yaml with ``changes``."""
    model = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())["model"]
    model.update(changes)
    return model


@pytest.fixture(scope="session")
def model_config():
    """:func:`quickstart_model_config`, for tests that build variants of the tiny detector."""
    return quickstart_model_config


def _distinct_scores(model):
    """Scale a random detector's score layers so that its detections are many, varied and untied.

    With the pytorch init the RPN logits are ~1e-5, so the objectness (a float32 sigmoid near 0.5)
    ties exactly between many anchors, and which of two tied boxes takes the last post-NMS place is
    up to the runtime's sort: scaled, the scores are distinct, as a trained model's are.  The RoI
    head's layers are scaled so that different RoIs prefer different classes with varied boxes.
    """
    with torch.no_grad():
        model.rpn.score.weight.mul_(1000.0)
        model.roi_head.score.weight.mul_(30.0)
        model.roi_head.cls_loc.weight.mul_(100.0)
    return model


@pytest.fixture(scope="session")
def tiny_model():
    """The quickstart detector with the quickstart's own random init (pytorch), scores made distinct.

    The weights on which ONNX once gave 83 detections and the eval forward 86 (a 150x90 image).
    """
    torch.manual_seed(0)
    config = quickstart_model_config(score_thresh=0.2)
    return _distinct_scores(registry("detector").build(config, num_classes=3).eval())


@pytest.fixture(scope="session")
def distinct_scores():
    """The function that scales a random detector's score layers (see ``_distinct_scores``)."""
    return _distinct_scores
