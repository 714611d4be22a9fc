from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from detkit.data.synthetic import SyntheticShapes
from detkit.registry import registry


def test_same_seed_same_image(tiny_synth):
    again = SyntheticShapes(num_images=6, image_size=(64, 80), objects=(1, 3), object_size=(12, 28), seed=5)
    # Access order must not matter: read backwards from a fresh instance.
    for i in reversed(range(6)):
        a, ta = tiny_synth[i]
        b, tb = again[i]
        assert torch.equal(a, b)
        assert torch.equal(ta["boxes"], tb["boxes"])
        assert torch.equal(ta["labels"], tb["labels"])


def test_different_index_seed_and_split_differ(tiny_synth):
    a, _ = tiny_synth[0]
    b, _ = tiny_synth[1]
    assert (a - b).abs().mean() > 0.05
    other_seed = SyntheticShapes(num_images=6, image_size=(64, 80), objects=(1, 3), object_size=(12, 28), seed=6)
    val = SyntheticShapes(num_images=6, image_size=(64, 80), objects=(1, 3), object_size=(12, 28), seed=5, split="val")
    assert (other_seed[0][0] - a).abs().mean() > 0.05
    assert (val[0][0] - a).abs().mean() > 0.05


def test_sample_contract(tiny_synth):
    for i in range(len(tiny_synth)):
        img, t = tiny_synth[i]
        assert img.shape == (3, 64, 80) and img.dtype == torch.float32
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
        g = t["boxes"].shape[0]
        assert 1 <= g <= 3
        assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
        assert t["difficult"].dtype == torch.bool and not t["difficult"].any()
        b = t["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 80).all() and (b[:, 3] <= 64).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert torch.equal(b, b.round())  # whole pixels: exact in integer formats
        assert ((t["labels"] >= 0) & (t["labels"] < 4)).all()
        assert t["image_id"] == f"train_{i:06d}"


def test_objects_are_painted_inside_their_boxes():
    ds = SyntheticShapes(num_images=4, image_size=(64, 64), objects=(1, 1), object_size=(24, 30), noise=0.0,
                         clutter=0.0, classes=["square"])
    for i in range(4):
        img, t = ds[i]
        x1, y1, x2, y2 = (int(v) for v in t["boxes"][0])
        inside = img[:, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1]
        # A square fills its box with one (shaded) colour distinct from the gradient around.
        assert inside.std(dim=(1, 2)).max() < 0.1
        ring = torch.cat((img[:, y1 - 2 if y1 >= 2 else y2 + 1, x1:x2], img[:, y1:y2, x1 - 2 if x1 >= 2 else x2 + 1]), dim=1)
        assert (inside.mean(dim=(1, 2)) - ring.mean(dim=1)).norm() > 0.2


def test_annotation_matches_rendered_targets(tiny_synth):
    for i in range(3):
        size, t = tiny_synth.annotation(i)
        _, t2 = tiny_synth[i]
        assert size == (64, 80)
        assert torch.equal(t["boxes"], t2["boxes"]) and torch.equal(t["labels"], t2["labels"])


def test_overlap_limit():
    ds = SyntheticShapes(num_images=20, image_size=(64, 64), objects=(4, 4), object_size=(16, 24), max_overlap=0.1)
    for i in range(20):
        b = ds.annotation(i)[1]["boxes"]
        lt = torch.maximum(b[:, None, :2], b[None, :, :2])
        rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)
        area = (b[:, 2:] - b[:, :2]).prod(-1)
        share = inter / torch.minimum(area[:, None], area[None, :])
        share.fill_diagonal_(0)
        assert float(share.max()) <= 0.1 + 1e-6


def test_registry_builds_it_and_params_are_checked():
    ds = registry("dataset").build({"type": "synthetic", "num_images": 3, "image_size": [48, 48], "object_size": [8, 16]})
    assert len(ds) == 3 and ds[2][0].shape == (3, 48, 48)
    with pytest.raises(ValidationError, match="unknown shape"):
        SyntheticShapes(classes=["circle", "blob"])
    with pytest.raises(ValidationError, match="larger than image_size"):
        SyntheticShapes(image_size=(40, 40), object_size=(16, 48))
    with pytest.raises(IndexError):
        ds[3]
