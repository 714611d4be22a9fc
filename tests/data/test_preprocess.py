"""The size rule and the resize of images and boxes, now in the detector's preprocessing
(``model.preprocess``), not in ``data.transforms``."""

from __future__ import annotations

import pytest
import torch

from detkit.preprocess import ImagePreprocessor, PreprocessParams
from detkit.resize import resize_shape


def test_resize_shape_keeps_the_aspect_and_caps_the_long_side():
    assert resize_shape(40, 60, min_size=80, max_size=1000) == (80, 120)
    assert resize_shape(60, 40, min_size=80, max_size=1000) == (120, 80)
    assert resize_shape(40, 60, min_size=80, max_size=90) == (60, 90)  # capped: scale 1.5, not 2
    assert resize_shape(40, 60, min_size=80, max_size=None) == (80, 120)
    assert resize_shape(400, 600, min_size=80, max_size=1000) == (80, 120)  # shrinks as well


def test_the_image_and_its_boxes_are_resized_together(sample):
    image, target = sample  # 40x60, bright left half
    prep = ImagePreprocessor(PreprocessParams(min_size=80, max_size=1000)).eval()
    batch, targets = prep([image], [target])
    assert batch.tensor.shape == (1, 3, 80, 120)
    assert batch.image_sizes.tolist() == [[80, 120]] and batch.orig_sizes.tolist() == [[40, 60]]
    assert batch.scales.tolist() == pytest.approx([2.0])
    assert torch.allclose(targets[0]["boxes"], torch.tensor([[0.0, 0.0, 20.0, 40.0], [60.0, 20.0, 120.0, 80.0]]))
    assert targets[0]["labels"].tolist() == [0, 2] and targets[0]["difficult"].tolist() == [False, True]
    # Normalised: white is (1 - mean) / std, black -mean / std; the bright half stays on the left.
    white, black = (1 - prep.pixel_mean) / prep.pixel_std, -prep.pixel_mean / prep.pixel_std
    x = batch.tensor[0]
    assert torch.allclose(x[:, :, :55], white.expand(3, 80, 55), atol=1e-5)
    assert torch.allclose(x[:, :, 65:], black.expand(3, 80, 55), atol=1e-5)


def test_multi_scale_training_draws_a_size_per_image_and_eval_uses_min_size(sample):
    image, target = sample
    prep = ImagePreprocessor(PreprocessParams(min_size=40, max_size=200, train_min_sizes=[20, 40, 60]))
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        batch, targets = prep([image, image], [target, target])
        for i, (h, w) in enumerate(batch.image_sizes.tolist()):
            assert h in (20, 40, 60) and w == h * 3 // 2
            seen.add(h)
            # Each image's boxes follow its own scale.
            assert torch.allclose(targets[i]["boxes"], target["boxes"] * h / 40)
    assert seen == {20, 40, 60}
    prep.eval()
    assert {tuple(prep([image])[0].image_sizes[0].tolist()) for _ in range(5)} == {(40, 60)}


def test_a_batch_is_padded_at_the_bottom_right_to_the_multiple(sample):
    image, _ = sample  # 40x60 and its 60x40 transpose: sizes that need no resize
    prep = ImagePreprocessor(PreprocessParams(min_size=40, max_size=60, size_divisible=16)).eval()
    batch, _ = prep([image, image.transpose(1, 2)])
    assert batch.tensor.shape == (2, 3, 64, 64) and batch.image_sizes.tolist() == [[40, 60], [60, 40]]
    black = (-prep.pixel_mean / prep.pixel_std).view(3, 1, 1)
    assert torch.allclose(batch.tensor[0, :, 40:], black.expand(3, 24, 64))
    assert torch.allclose(batch.tensor[1, :, :, 40:], black.expand(3, 64, 24))
    assert torch.allclose(batch.tensor[0, :, :40, :60], (image - prep.pixel_mean) / prep.pixel_std)
