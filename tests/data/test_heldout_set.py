"""The held-out set of the from-scratch recipes (benchmarks/photo_voc.py): shapes on photographs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detkit.data.synthetic import SyntheticShapes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def photo_voc():
    spec = importlib.util.spec_from_file_location("photo_voc", ROOT / "benchmarks" / "photo_voc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def photos(tmp_path):
    """Two 'photographs': a red-to-green ramp and a checkerboard, 240 x 360."""
    ys, xs = np.mgrid[0:240, 0:360]
    ramp = np.stack([255 * xs / 359, 255 * ys / 239, np.full_like(xs, 40)], -1).astype(np.uint8)
    checks = (((ys // 20 + xs // 20) % 2) * 200 + 30).astype(np.uint8)
    paths = [tmp_path / "ramp.png", tmp_path / "checks.jpg"]
    Image.fromarray(ramp).save(paths[0])
    Image.fromarray(checks).convert("RGB").save(paths[1], quality=95)
    return paths


def test_shapes_are_drawn_on_crops_of_the_photographs(photo_voc, photos):
    params = SyntheticShapes.Params(**photo_voc.HELDOUT, num_images=6, split="train")
    ds = photo_voc.PhotoShapes(params, photos)
    assert ds.classes == ["circle", "square", "triangle", "cross", "star", "ring"]
    kinds = set()
    for i in range(len(ds)):
        img, t = ds[i]
        h, w = img.shape[-2:]
        assert 320 <= h <= 480 and 320 <= w <= 480
        assert 2 <= len(t["boxes"]) <= 12
        outside = torch.ones(h, w, dtype=torch.bool)
        for x1, y1, x2, y2 in t["boxes"].long().tolist():
            outside[y1:y2, x1:x2] = False
        # Outside the boxes lies the photograph: the checkerboard is grey (equal channels), the ramp is not.
        bg = img[:, outside]
        grey = float((bg[0] - bg[1]).abs().mean()) < 0.05
        kinds.add("checks" if grey else "ramp")
        assert float(bg.std()) > 0.05  # a crop of a picture, not a flat fill
    assert kinds == {"checks", "ramp"}  # both photographs are used
    again, _ = photo_voc.PhotoShapes(params, photos)[3]
    assert torch.equal(again, ds[3][0])  # image i depends on (seed, split, i) and the photos only


def test_make_heldout_writes_a_voc_set_the_reader_loads(photo_voc, photos, tmp_path, monkeypatch):
    from detkit.registry import registry

    monkeypatch.setattr(photo_voc, "HELDOUT_SPLITS", {"train": 3, "val": 2})
    root = photo_voc.make_heldout(tmp_path / "heldout", photos)
    classes = list(photo_voc.HELDOUT["classes"])
    for split, n in (("train", 3), ("val", 2)):
        ds = registry("dataset").build({"type": "voc", "root": str(root), "split": split, "classes": classes})
        assert len(ds) == n
        img, t = ds[0]
        assert img.shape[0] == 3 and len(t["boxes"]) >= 2
    assert len(list((root / "JPEGImages").glob("*.jpg"))) == 5
