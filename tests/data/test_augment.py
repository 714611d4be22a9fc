"""The v2-backed augmentation steps: boxes follow the pixels, seeded draws, dropped boxes counted, config errors."""

from __future__ import annotations

import pytest
import torch

from detkit.config import validate
from detkit.data.augment import IoUCrop, PhotometricDistort, RandomResizedCrop, ZoomOut, sanitize
from detkit.data.transforms import DetectionTransform, HorizontalFlip
from detkit.errors import ConfigError

# Two coloured patches on black, each framed exactly by its box: red is label 0, green label 1.
BOXES = torch.tensor([[12.0, 10.0, 40.0, 34.0], [60.0, 30.0, 90.0, 66.0]])


@pytest.fixture
def patches() -> tuple[torch.Tensor, dict]:
    image = torch.zeros(3, 80, 120)
    for colour, (x0, y0, x1, y1) in enumerate(BOXES.long().tolist()):
        image[colour, y0:y1, x0:x1] = 1.0
    return image, {"boxes": BOXES.clone(), "labels": torch.tensor([0, 1]),
                   "difficult": torch.tensor([False, True]), "image_id": "p"}


def patch_box(image: torch.Tensor, label: int) -> torch.Tensor | None:
    """The xyxy frame of the pixels of the patch of ``label``'s colour (None: none left)."""
    other = 1 - label
    mask = (image[label] > 0.5) & (image[other] < 0.5) & (image[2] < 0.5)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(xs) == 0:
        return None
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


GEOMETRIC = [
    HorizontalFlip(HorizontalFlip.Params(p=1.0)),
    ZoomOut(ZoomOut.Params(p=1.0)),
    IoUCrop(),
    RandomResizedCrop(RandomResizedCrop.Params(p=1.0)),
]


@pytest.mark.parametrize("step", GEOMETRIC, ids=lambda s: type(s).__name__)
def test_boxes_still_frame_their_patches(step, patches):
    image, target = patches
    moved = 0
    t = DetectionTransform([step], train=True)
    for seed in range(12):
        out, tgt = t(image, target, torch.Generator().manual_seed(seed))
        assert len(tgt["boxes"]) == len(tgt["labels"]) == len(tgt["difficult"])
        assert tgt["difficult"].tolist() == [bool(label) for label in tgt["labels"].tolist()]  # aligned
        for box, label in zip(tgt["boxes"], tgt["labels"].tolist()):
            seen = patch_box(out, label)
            assert seen is not None, f"seed {seed}: box {box.tolist()} kept, its patch gone"
            assert torch.allclose(box, seen, atol=1.5), f"seed {seed}: box {box.tolist()}, patch {seen.tolist()}"
        moved += int(out.shape != image.shape or not torch.equal(tgt["boxes"], target["boxes"]))
    assert moved >= 4  # the step really moved the pixels in most draws, not a pass-through


def test_photometric_distort_changes_colours_and_keeps_boxes(patches):
    image, target = patches
    t = DetectionTransform([PhotometricDistort(PhotometricDistort.Params(p=1.0))], train=True)
    out, tgt = t(image, target, torch.Generator().manual_seed(3))
    assert out.shape == image.shape and not torch.allclose(out, image, atol=0.01)
    assert torch.equal(tgt["boxes"], target["boxes"]) and tgt["augment_dropped"] == 0


ALL = [{"type": "photometric_distort"}, {"type": "zoom_out"}, {"type": "iou_crop"},
       {"type": "random_resized_crop"}, {"type": "hflip"}]


def test_the_same_sample_seed_gives_the_same_augmentation_whatever_the_global_rng(patches):
    image, target = patches
    t = DetectionTransform(ALL, train=True)
    torch.manual_seed(1)
    a = t(image, target, torch.Generator().manual_seed(42))
    torch.manual_seed(2)  # another global state: the sample's seed alone decides
    b = t(image, target, torch.Generator().manual_seed(42))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
    torch.manual_seed(1)
    before = torch.get_rng_state()
    t(image, target, torch.Generator().manual_seed(42))
    assert torch.equal(torch.get_rng_state(), before)  # v2's draws leave the caller's generator alone
    outs = {(tuple(o.shape), tuple(g["boxes"].flatten().tolist()))
            for o, g in (t(image, target, torch.Generator().manual_seed(s)) for s in range(6))}
    assert len(outs) >= 5  # other seeds, other augmentations


def test_the_loader_augments_alike_with_and_without_workers(tiny_synth):
    from detkit.data.loader import TransformedDataset, build_loader

    ds = TransformedDataset(tiny_synth, DetectionTransform(ALL, train=True), seed=3)
    runs = [list(build_loader(ds, batch_size=2, shuffle=True, num_workers=w, seed=3)) for w in (0, 1)]
    for a, b in zip(*runs):
        assert all(torch.equal(x, y) for x, y in zip(a.images, b.images))
        assert all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes))
        assert a.augment_dropped == b.augment_dropped
    assert len(runs[0]) == 3 and any(im.shape[-2:] != (64, 80) for b in runs[0] for im in b.images)


def test_sanitize_clips_and_drops_degenerate_boxes_with_their_rows():
    target = {"boxes": torch.tensor([[-5.0, 2, 20, 30], [50, 0, 50.5, 10], [70, 5, 90, 9], [10, 10, 12, 40]]),
              "labels": torch.tensor([1, 2, 3, 4]), "difficult": torch.tensor([True, False, True, False]),
              "image_id": "x"}
    out = sanitize(target, (32, 60), min_size=1.0)
    # 2: 0.5 px wide; 3: wholly right of the 60 px image (clipped to zero width); 1 clipped; 4 kept
    assert out["boxes"].tolist() == [[0.0, 2.0, 20.0, 30.0], [10.0, 10.0, 12.0, 32.0]]
    assert out["labels"].tolist() == [1, 4] and out["difficult"].tolist() == [True, False]
    assert out["image_id"] == "x"


def test_dropped_boxes_are_counted_per_sample_and_per_batch(patches):
    from detkit.data.collate import Collate

    image, target = patches
    # Crops of a tenth of the image: often one patch is cut away.
    t = DetectionTransform([RandomResizedCrop(RandomResizedCrop.Params(scale=(0.1, 0.1), p=1.0))], train=True)
    samples = [t(image, target, torch.Generator().manual_seed(s)) for s in range(10)]
    counts = [tgt["augment_dropped"] for _, tgt in samples]
    assert counts == [2 - len(tgt["boxes"]) for _, tgt in samples]
    assert sum(counts) > 0 and min(counts) < 2
    assert Collate(uint8=True)(samples).augment_dropped == sum(counts)


def test_eval_mode_runs_no_crop(patches):
    image, target = patches
    out, tgt = DetectionTransform(ALL, train=False)(image, target)
    assert out is image and torch.equal(tgt["boxes"], target["boxes"]) and "augment_dropped" not in tgt


def test_an_image_without_boxes_is_not_iou_cropped(patches):
    image, _ = patches
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    out, tgt = DetectionTransform([IoUCrop()], train=True)(image, empty, torch.Generator().manual_seed(0))
    assert out is image and len(tgt["boxes"]) == 0


BASE = {"model": {"type": "faster_rcnn"}, "data": {"train": {"type": "synthetic"}}}


@pytest.mark.parametrize("step, where", [
    ({"type": "zoom_out", "side_range": [2.0, 1.0]}, r"steps\[0\]\.side_range: .*\[2, 1\] is not a range"),
    ({"type": "zoom_out", "side_range": [0.5, 2.0]}, r"steps\[0\]\.side_range: .*must start at 1"),
    ({"type": "iou_crop", "min_scale": 0.9, "max_scale": 0.5}, r"steps\[0\]: .*min_scale, max_scale"),
    ({"type": "random_resized_crop", "scale": [0.5, 1.5]}, r"steps\[0\]\.scale: .*must lie within"),
    ({"type": "photometric_distort", "hue": [-0.7, 0.0]}, r"steps\[0\]\.hue: .*must lie within"),
    ({"type": "iou_crop", "p": 2}, r"steps\[0\]\.p: "),
    ({"type": "photometric_distort", "contrast": [1.5, 0.5]}, r"steps\[0\]\.contrast: .*\[1.5, 0.5\] is not a range"),
])
def test_bad_augmentation_settings_are_one_line_naming_the_field(step, where):
    cfg = {**BASE, "data": {**BASE["data"], "transforms": [step]}}
    with pytest.raises(ConfigError, match=r"x\.yaml.*data\.transforms\." + where) as err:
        validate(cfg, "x.yaml")
    assert "\n" not in str(err.value)


def test_the_augmentation_recipe_is_tiny_with_zoom_out_and_iou_crop():
    from pathlib import Path

    from detkit.config import load_config

    scratch = Path(__file__).resolve().parents[2] / "configs" / "scratch"
    base, aug = (load_config(scratch / name).to_dict() for name in ("tiny.yaml", "tiny_aug.yaml"))
    steps = [s["type"] for s in aug["data"].pop("transforms")]
    assert steps == ["photometric", "zoom_out", "iou_crop", "hflip"]
    base["data"].pop("transforms")
    base.pop("name"), aug.pop("name")
    assert aug == base  # the measured difference is the augmentation alone
