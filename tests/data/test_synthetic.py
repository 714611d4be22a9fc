from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from detkit.data.synthetic import SyntheticShapes
from detkit.registry import registry


def synth(**params) -> SyntheticShapes:
    """Built as the registry builds it: from its validated Params."""
    return SyntheticShapes(SyntheticShapes.Params(**params))


def test_same_seed_same_image(tiny_synth):
    again = synth(num_images=6, image_size=(64, 80), objects=(1, 3), object_size=(12, 28), seed=5)
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
    other_seed = synth(num_images=6, image_size=(64, 80), objects=(1, 3), object_size=(12, 28), seed=6)
    val = synth(num_images=6, image_size=(64, 80), objects=(1, 3), object_size=(12, 28), seed=5, split="val")
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
    ds = synth(num_images=4, image_size=(64, 64), objects=(1, 1), object_size=(24, 30), noise=0.0,
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
    ds = synth(num_images=20, image_size=(64, 64), objects=(4, 4), object_size=(16, 24), max_overlap=0.1)
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
    # One constructor path: the data set keeps the Params the config validated, not a re-validated copy.
    spec = registry("dataset").validate({"type": "synthetic", "num_images": 2})
    assert spec.build().params is spec.params
    with pytest.raises(ValidationError, match="unknown shape"):
        synth(classes=["circle", "blob"])
    with pytest.raises(ValidationError, match="larger than image_size"):
        synth(image_size=(40, 40), object_size=(16, 48))
    with pytest.raises(IndexError):
        ds[3]


# ------------------------------------------------------------------ clutter preset
def _clutter(**kw):
    return synth(preset="clutter", **kw)


def test_clutter_preset_is_deterministic_given_its_seed():
    a, b = _clutter(num_images=4, seed=7), _clutter(num_images=4, seed=7)
    for i in (3, 0):  # any access order
        ia, ta = a[i]
        ib, tb = b[i]
        assert torch.equal(ia, ib)
        assert torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])
        size, tc = a.annotation(i)  # the layout alone gives the same size and boxes
        assert size == tuple(ia.shape[-2:]) and torch.equal(tc["boxes"], ta["boxes"])
    other = _clutter(num_images=4, seed=8)[0][0]
    img0 = a[0][0]
    assert other.shape != img0.shape or (other - img0).abs().mean() > 0.05


def test_clutter_preset_sizes_objects_and_classes():
    ds = _clutter(num_images=40)
    assert ds.classes == ["circle", "square", "triangle", "cross", "diamond", "ring"]
    sizes, counts, labels = set(), [], []
    for i in range(len(ds)):
        (h, w), t = ds.annotation(i)
        assert 320 <= h <= 480 and 320 <= w <= 480
        sizes.add((h, w))
        b = t["boxes"]
        counts.append(len(b))
        side = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).sqrt()
        # 14 px to 40 % of the short side (whole-pixel rounding and aspect change it by a few px)
        assert bool((side >= 12).all()) and bool((side <= 0.4 * min(h, w) + 3).all())
        labels += t["labels"].tolist()
    assert len(sizes) > 20 and min(counts) >= 1 and max(counts) <= 8 and max(counts) >= 6
    assert set(labels) == set(range(6))


def test_clutter_images_are_cluttered_and_params_override_the_preset():
    ds = _clutter(num_images=3, size_range=None, image_size=(160, 200), objects=(2, 2), seed=2)
    assert ds.params.background == "mixed" and ds.params.distractors == 6  # the rest of the preset stays
    img, t = ds[0]
    assert img.shape == (3, 160, 200) and len(t["boxes"]) == 2
    # Textured backgrounds: far more local variation than the plain gradient default.
    plain, _ = synth(num_images=1, image_size=(160, 200), clutter=0, noise=0, objects=(0, 0))[0]
    grad = lambda x: (x[:, 1:, :] - x[:, :-1, :]).abs().mean()  # noqa: E731
    assert grad(img) > 3 * grad(plain)
    with pytest.raises(ValidationError, match="preset"):
        synth(preset="nope")


def test_synth_cli_writes_the_clutter_splits_deterministically(tmp_path):
    from typer.testing import CliRunner

    from detkit.cli import app

    runner = CliRunner()
    for name in ("a", "b"):
        res = runner.invoke(app, ["data", "synth", str(tmp_path / name), "--preset", "clutter", "-n", "4",
                                  "--image-size", "96", "--seed", "3"])
        assert res.exit_code == 0, res.output
    sets = tmp_path / "a" / "ImageSets" / "Main"
    assert len((sets / "train.txt").read_text().split()) == 4 and len((sets / "val.txt").read_text().split()) == 1
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 * 5 + 2
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    xml = (tmp_path / "a" / "Annotations" / "val_000000.xml").read_text()
    assert "<width>96</width>" in xml and "<name>" in xml


class _Grey(SyntheticShapes):
    """Shapes on a plain grey scene: every changed pixel belongs to a shape."""

    def scene(self, g, h, w):
        return torch.full((3, h, w), 0.5)


def test_star_touches_its_box_on_all_four_sides_and_covers_less_than_a_circle():
    cover = {}
    for shape in ("star", "circle", "square"):
        ds = _Grey(SyntheticShapes.Params(num_images=1, image_size=(96, 96), objects=(1, 1), object_size=(60, 60),
                                          aspect_range=(1, 1), noise=0.0, classes=[shape], min_contrast=0.3))
        img, t = ds[0]
        x1, y1, x2, y2 = (int(v) for v in t["boxes"][0])
        changed = (img - 0.5).abs().amax(dim=0) > 0.05
        box = changed[y1:y2, x1:x2]
        assert int(changed.sum()) == int(box.sum()), shape  # nothing drawn outside the box
        for edge in (box[0], box[-1], box[:, 0], box[:, -1]):  # the shape reaches every side of its box
            assert bool(edge.any()), shape
        cover[shape] = float(box.float().mean())
    assert cover["square"] > 0.95 and 0.7 < cover["circle"] < 0.85
    assert 0.3 < cover["star"] < 0.6  # five points: far less of the box than a circle


def test_a_subclass_draws_on_its_own_scene():
    ds = _Grey(SyntheticShapes.Params(num_images=2, image_size=(64, 64), objects=(1, 1), noise=0.0))
    img, t = ds[0]
    x1, y1, x2, y2 = (int(v) for v in t["boxes"][0])
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[y1:y2, x1:x2] = False
    assert torch.equal(img[:, outside], torch.full_like(img[:, outside], 0.5))
    assert (img[:, y1:y2, x1:x2] - 0.5).abs().amax() > 0.2  # the shape is drawn on it
