"""Shared fixtures for the built-in plugin tests: detectors of the one tiny test config.

The model config is ``tiny_dict["model"]`` of tests/conftest.py (the tiny training run's); these
fixtures return factories, so a test asks for ``tiny_detector_config(**overrides)`` or
``build_tiny_detector(...)`` by argument instead of copying a config or importing a conftest.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch


@pytest.fixture
def tiny_detector_config(tiny_dict):
    """``tiny_detector_config(**overrides) -> dict``: a fresh copy of the tiny model config, top-level keys replaced."""

    def make(**overrides: Any) -> dict[str, Any]:
        cfg = copy.deepcopy(tiny_dict["model"])
        cfg.update(copy.deepcopy(overrides))
        return cfg

    return make


@pytest.fixture
def build_tiny_detector(tiny_detector_config):
    """``build_tiny_detector(num_classes=3, seed=0, **overrides)``: the tiny detector through the registry, seeded."""
    from detkit.registry import registry

    def build(num_classes: int = 3, seed: int = 0, **overrides: Any):
        torch.manual_seed(seed)
        return registry("detector").build(tiny_detector_config(**overrides), num_classes=num_classes)

    return build


@pytest.fixture
def two_images():
    """``(images, targets)``: two uint8 images of different sizes, the second without boxes."""
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 96, 128), generator=g, dtype=torch.uint8),
              torch.randint(0, 256, (3, 112, 96), generator=g, dtype=torch.uint8)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 50.0], [70.0, 20.0, 120.0, 90.0]]), "labels": torch.tensor([0, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return images, targets


@pytest.fixture
def offline_hub(monkeypatch) -> list[str]:
    """torch.hub without a network: every download raises, and the URLs asked for are recorded."""
    calls: list[str] = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return calls
