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


@pytest.fixture(scope="session")
def tiny_model():
    """The quickstart detector with random weights, scaled so the head prefers different classes for different RoIs."""
    torch.manual_seed(0)
    # The quickstart's own init (pytorch). Its RPN logits are ~1e-5, so the objectness (a float32
    # sigmoid near 0.5) ties exactly between many anchors, and which of two tied boxes takes the last
    # post-NMS place is up to the runtime's sort: the RPN's score layer is scaled so scores are distinct,
    # as a trained model's are.
    config = quickstart_model_config(score_thresh=0.2)
    model = registry("detector").build(config, num_classes=3).eval()
    with torch.no_grad():
        model.rpn.score.weight.mul_(1000.0)
        model.head.score.weight.mul_(30.0)
        model.head.cls_loc.weight.mul_(100.0)
    return model
