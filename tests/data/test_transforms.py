from __future__ import annotations

import torch

from detkit.data.config import TransformConfig
from detkit.data.transforms import DetectionTransform, hflip_boxes


def test_flip_moves_boxes_with_the_pixels(sample):
    image, target = sample
    t = DetectionTransform(TransformConfig(hflip=1.0), train=True)
    out, tgt = t(image, target, torch.Generator().manual_seed(0))
    assert out.shape == (3, 40, 60)  # augmentation keeps the image's own size
    assert torch.equal(out, image.flip(-1))
    assert torch.allclose(tgt["boxes"], torch.tensor([[50.0, 0.0, 60.0, 20.0], [0.0, 10.0, 30.0, 40.0]]))
    assert tgt["labels"].tolist() == [0, 2] and tgt["difficult"].tolist() == [False, True]
    assert torch.equal(hflip_boxes(hflip_boxes(target["boxes"], 60), 60), target["boxes"])


def test_train_randomness_follows_the_generator(sample):
    image, target = sample
    t = DetectionTransform(TransformConfig(hflip=0.5, photometric=True), train=True)
    a = t(image, target, torch.Generator().manual_seed(7))
    b = t(image, target, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    outs = [t(image, target, torch.Generator().manual_seed(s)) for s in range(8)]
    flipped = {bool(o[1]["boxes"][0, 0] > 0) for o in outs}
    assert flipped == {True, False}  # both outcomes: the draws are used
    assert len({round(float(o[0].mean()), 4) for o in outs}) > 4  # colour jitter differs per seed


def test_eval_mode_returns_the_original_image_and_boxes(sample):
    # Evaluation sees what `predict` sees: the original image; the model resizes it.
    image, target = sample
    t = DetectionTransform(TransformConfig(hflip=1.0, photometric=True), train=False)
    out, tgt = t(image, target)
    assert out is image and torch.equal(tgt["boxes"], target["boxes"]) and tgt is not target


def test_the_settings_mapping_has_no_size_fields():
    assert set(TransformConfig.model_fields) == {"hflip", "photometric"}
