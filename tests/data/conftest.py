"""Fixtures: tiny synthetic data sets and samples."""

from __future__ import annotations

import pytest
import torch

from detkit.data.synthetic import SyntheticShapes


@pytest.fixture
def tiny_synth() -> SyntheticShapes:
    """Six 64x80 images with 1-3 objects of 12-28 px."""
    return SyntheticShapes(SyntheticShapes.Params(num_images=6, image_size=(64, 80), objects=(1, 3), object_size=(12, 28), seed=5))


@pytest.fixture
def sample() -> tuple[torch.Tensor, dict]:
    """A 40x60 image with a bright left half and two boxes."""
    image = torch.zeros(3, 40, 60)
    image[:, :, :30] = 1.0
    target = {
        "boxes": torch.tensor([[0.0, 0.0, 10.0, 20.0], [30.0, 10.0, 60.0, 40.0]]),
        "labels": torch.tensor([0, 2]),
        "difficult": torch.tensor([False, True]),
        "image_id": "x",
    }
    return image, target
