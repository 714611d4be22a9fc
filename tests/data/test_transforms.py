from __future__ import annotations

import pytest
import torch

from detkit.data.config import TransformConfig
from detkit.data.transforms import DetectionTransform, hflip_boxes, resize_shape


def test_resize_shape_keeps_aspect_and_caps_long_side():
    assert resize_shape(40, 60, min_size=80, max_size=1000) == (80, 120)
    assert resize_shape(40, 60, min_size=80, max_size=90) == (60, 90)  # capped: scale 1.5
    assert resize_shape(40, 60, 80, 90, fixed_size=(32, 32)) == (32, 32)


def test_eval_resize_scales_boxes_and_reports_scale(sample):
    image, target = sample
    t = DetectionTransform(TransformConfig(min_size=80, max_size=1000), train=False)
    out, tgt = t(image, target)
    assert out.shape == (3, 80, 120)
    assert torch.allclose(tgt["boxes"], torch.tensor([[0.0, 0.0, 20.0, 40.0], [60.0, 20.0, 120.0, 80.0]]))
    assert tgt["scale"] == pytest.approx(2.0)
    assert tgt["orig_size"].tolist() == [40, 60]
    assert tgt["labels"].tolist() == [0, 2] and tgt["difficult"].tolist() == [False, True]
    # The bright left half stays on the left.
    assert out[:, :, :55].mean() > 0.99 and out[:, :, 65:].mean() < 0.01


def test_fixed_size_scales_axes_separately(sample):
    image, target = sample
    t = DetectionTransform(TransformConfig(fixed_size=(20, 120)), train=False)
    out, tgt = t(image, target)
    assert out.shape == (3, 20, 120)
    assert torch.allclose(tgt["boxes"][1], torch.tensor([60.0, 5.0, 120.0, 20.0]))
    assert tgt["scale"] == pytest.approx((2.0 * 0.5) ** 0.5)


def test_flip_moves_boxes_with_the_pixels(sample):
    image, target = sample
    t = DetectionTransform(TransformConfig(min_size=40, max_size=1000, hflip=1.0), train=True)
    out, tgt = t(image, target, torch.Generator().manual_seed(0))
    assert out.shape == (3, 40, 60)
    assert torch.equal(out, image.flip(-1))
    assert torch.allclose(tgt["boxes"], torch.tensor([[50.0, 0.0, 60.0, 20.0], [0.0, 10.0, 30.0, 40.0]]))
    assert torch.equal(hflip_boxes(hflip_boxes(target["boxes"], 60), 60), target["boxes"])


def test_train_randomness_follows_the_generator(sample):
    image, target = sample
    cfg = TransformConfig(min_size=40, max_size=200, hflip=0.5, photometric=True, scale_jitter=(0.5, 1.5))
    t = DetectionTransform(cfg, train=True)
    a = t(image, target, torch.Generator().manual_seed(7))
    b = t(image, target, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    sizes = {t(image, target, torch.Generator().manual_seed(s))[0].shape[-2] for s in range(12)}
    assert len(sizes) > 3 and min(sizes) >= 20 and max(sizes) <= 60
    # Boxes always follow the (jittered) scale of their own sample.
    img, tgt = t(image, target, torch.Generator().manual_seed(3))
    assert img.shape[-2] / 40 == pytest.approx(tgt["scale"], rel=0.02)


def test_eval_mode_is_deterministic_and_unaugmented(sample):
    image, target = sample
    cfg = TransformConfig(min_size=40, max_size=200, hflip=1.0, photometric=True, scale_jitter=(0.5, 1.5))
    out, tgt = DetectionTransform(cfg, train=False)(image, target)
    assert torch.equal(out, image)  # same size: no resampling, no flip, no colour change
    assert torch.equal(tgt["boxes"], target["boxes"])


def test_boxes_only_matches_full_transform(sample):
    image, target = sample
    t = DetectionTransform(TransformConfig(min_size=50, max_size=1000), train=False)
    out, tgt = t(image, target)
    size, tgt2 = t.boxes_only((40, 60), target)
    assert size == tuple(out.shape[-2:]) and torch.equal(tgt["boxes"], tgt2["boxes"])


def test_config_rejects_bad_jitter():
    with pytest.raises(ValueError, match="scale_jitter"):
        TransformConfig(scale_jitter=(1.2, 0.8))
