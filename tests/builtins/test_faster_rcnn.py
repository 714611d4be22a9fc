"""FasterRCNN detector: one forward (named losses in train mode, detections in eval mode), anchors, preprocessing."""

from __future__ import annotations

import pytest
import torch

from detkit.interfaces import Proposals, RoIPredictions
from detkit.preprocess import IMAGENET_MEAN, IMAGENET_STD
from detkit.registry import registry
from detkit.resize import resize_shape
from detkit_builtins.faster_rcnn import FasterRCNN

NUM_CLASSES = 3
LOSSES = {"rpn_loc", "rpn_cls", "roi_loc", "roi_cls"}


@pytest.fixture
def build(tiny_detector_config):
    """``build(**model_keys) -> FasterRCNN`` in eval mode: the tiny config at 96..160 px, 40 test proposals."""

    def make(**params) -> FasterRCNN:
        torch.manual_seed(0)
        cfg = tiny_detector_config(preprocess={"min_size": 96, "max_size": 160})
        cfg["rpn"]["proposal"].update(test_pre_nms=300, test_post_nms=40)
        cfg.update(params)
        return registry("detector").build(cfg, num_classes=NUM_CLASSES).eval()

    return make


def confident(model: FasterRCNN, cls: int = 1) -> FasterRCNN:
    """Make every RoI a confident detection of foreground class ``cls`` with zero deltas."""
    with torch.no_grad():
        model.roi_head.score.weight.zero_()
        model.roi_head.score.bias.zero_()
        model.roi_head.score.bias[cls + 1] = 10.0
        model.roi_head.cls_loc.weight.zero_()
        model.roi_head.cls_loc.bias.zero_()
    return model


@pytest.fixture
def image() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 64, 96, generator=g)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(IMAGENET_MEAN).view(-1, 1, 1)) / torch.tensor(IMAGENET_STD).view(-1, 1, 1)


def test_registry_defaults_module_tree_and_attributes(build):
    m = build()
    assert m.num_classes == NUM_CLASSES
    assert m.roi_head.loc_normalize_std == (0.1, 0.1, 0.2, 0.2)
    assert m.roi_head.cls_loc.out_features == (NUM_CLASSES + 1) * 4
    assert {name for name, _ in m.named_children()} == {"preprocess", "backbone", "rpn", "roi_head"}
    # The RoI tail is registered once, under the RoI head's box head.
    keys = m.state_dict().keys()
    assert any(k.startswith("roi_head.box_head.tail.") for k in keys)
    assert not any(k.startswith(("extractor.", "head.")) for k in keys)
    assert not any(k.startswith("backbone.") and "tail" in k for k in keys)


def test_builds_from_python_with_the_registry_alone():
    torch.manual_seed(0)
    m = registry("detector").build({"type": "faster_rcnn", "backbone": {"type": "tiny"}}, num_classes=6).eval()
    with torch.no_grad(), m.detection_settings(score_thresh=0.0):
        (det,) = m([torch.zeros(3, 40, 60, dtype=torch.uint8)])
    assert det["boxes"].shape[1] == 4 and det["labels"].dtype == torch.int64
    assert (det["labels"] < 6).all()


def test_forward_is_the_stages_composed(build, image):
    m = build()
    images = [image, image.flip(-1)]
    batch, _ = m.preprocess(images)
    # 64 x 96 -> short side 96: 96 x 144; features at stride 16: 6 x 9.
    assert batch.tensor.shape == (2, 3, 96, 144) and batch.image_sizes.tolist() == [[96, 144]] * 2
    assert batch.orig_sizes.tolist() == [[64, 96]] * 2
    feats = m.features(batch.tensor)
    resized = torch.nn.functional.interpolate(normalise(torch.stack(images)), size=(96, 144), mode="bilinear",
                                              align_corners=False)
    assert torch.allclose(feats, m.backbone(resized), atol=1e-5)
    proposals, losses = m.rpn(feats, batch)
    assert isinstance(proposals, Proposals) and losses == {}
    assert m.anchors(batch.input_size).shape == (6 * 9 * 9, 4)
    predictions, losses = m.roi_head(feats, proposals, batch)
    r = proposals.boxes.shape[0]
    assert isinstance(predictions, RoIPredictions) and losses == {}
    assert predictions.boxes.shape == (r, NUM_CLASSES, 4) and predictions.scores.shape == (r, NUM_CLASSES)
    with m.detection_settings(score_thresh=0.0):
        full = m(images)
        composed = m.postprocess(predictions, batch)
    assert sum(len(d["scores"]) for d in full) > 0
    for a, b in zip(full, composed):
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-4) and torch.equal(a["labels"], b["labels"])


def test_train_forward_returns_the_named_losses(build, two_images):
    m = build().train()
    images, targets = two_images  # different sizes; the second has no boxes
    losses = m(images, targets)
    assert set(losses) == LOSSES
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert m.backbone.stages[0][0].weight.grad.abs().sum() > 0
    assert m.roi_head.score.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="targets"):
        m(images)


def test_train_mode_uses_train_counts(build, image):
    m = build(rpn={"type": "rpn", "mid_channels": 16,
                   "proposal": {"train_post_nms": 5, "test_post_nms": 2, "min_size": 0, "nms_iou": 1.0}})
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 40.0, 30.0]]), "labels": torch.tensor([0])}]
    batch, _ = m.preprocess([image])
    assert m.rpn(m.features(batch.tensor), batch)[0].boxes.shape[0] == 2
    m.train()
    batch, scaled = m.preprocess([image], targets)
    assert m.rpn(m.features(batch.tensor), batch, scaled)[0].boxes.shape[0] == 5


def test_targets_follow_their_image_into_network_pixels(build, image):
    m = build(preprocess={"min_size": 96, "max_size": None, "train_min_sizes": [64, 128]}).train()
    targets = [{"boxes": torch.tensor([[8.0, 4.0, 40.0, 30.0]]), "labels": torch.tensor([1])}] * 12
    torch.manual_seed(0)
    batch, scaled = m.preprocess([image] * 12, targets)
    heights = batch.image_sizes[:, 0].tolist()
    assert set(heights) == {64, 128}  # one train size drawn per image
    for h, t in zip(heights, scaled):
        assert torch.allclose(t["boxes"], targets[0]["boxes"] * h / 64)
    m.eval()
    assert m.preprocess([image])[0].image_sizes.tolist() == [[96, 144]]  # eval: min_size


def test_anchors_for_input_size(build):
    m = build()
    assert m.feature_sizes((64, 96)) == [(4, 6)]
    a = m.anchors((64, 96))
    assert a.shape == (4 * 6 * 9, 4)
    assert torch.equal(a, m.rpn.anchors([(4, 6)], (64, 96)))


def test_resize_policy_roundings_hand_computed():
    def trunc(h, w, lo, hi):
        return resize_shape(h, w, lo, hi, rounding="truncate")

    assert trunc(375, 500, 600, None) == (600, 800)
    assert trunc(500, 375, 600, None) == (800, 600)
    assert trunc(333, 500, 600, None) == (600, 900)  # 900.9 truncated
    assert trunc(300, 1000, 600, 1000) == (300, 1000)  # long side capped
    assert trunc(100, 100, 600, 1000) == (600, 600)
    assert trunc(281, 288, 600, None) == (600, 614)  # exact: the short side is min_size
    # floor: torchvision's float scale; 600/281 rounds down, so 281 * scale < 600.
    assert resize_shape(281, 288, 600, 1000, rounding="floor") == (599, 614)
    assert resize_shape(333, 500, 600, None) == (600, 901)  # round (the default)


def test_input_size_follows_preprocess_rounding(build):
    m = build(preprocess={"min_size": 600, "max_size": None, "rounding": "truncate"})
    assert m.input_size(333, 500) == (600, 900)
    m = build(preprocess={"min_size": 600, "max_size": None})
    assert m.input_size(333, 500) == (600, 901)


def test_blank_image_gives_no_detections_with_dtypes(build):
    m = build()
    with torch.no_grad():
        out = m([torch.zeros(3, 50, 70)])
    assert len(out) == 1
    d = out[0]
    assert d["boxes"].shape == (0, 4) and d["boxes"].dtype == torch.float32
    assert d["scores"].shape == (0,) and d["scores"].dtype == torch.float32
    assert d["labels"].shape == (0,) and d["labels"].dtype == torch.int64
    with pytest.raises(ValueError, match="at least one image"):
        m([])


def test_detections_are_in_the_original_pixels(build, image):
    m = confident(build())
    # 64x96 -> short side 96: 96x144, a factor 1.5 on both axes; a 96x144 image is not resized.
    with torch.no_grad():
        small = m([image])[0]
        resized = torch.nn.functional.interpolate(image[None], size=(96, 144), mode="bilinear",
                                                  align_corners=False)[0]
        big = m([resized])[0]
    assert small["boxes"].shape[0] > 0
    assert (small["labels"] == 1).all()
    assert torch.allclose(small["boxes"] * 1.5, big["boxes"], atol=1e-3)
    assert (small["boxes"][:, 2] <= 96 + 1e-4).all() and (small["boxes"][:, 3] <= 64 + 1e-4).all()
    # NMS at 0.3 within the class: no two kept boxes overlap more.
    from torchvision.ops import box_iou
    iou = box_iou(small["boxes"], small["boxes"]).fill_diagonal_(0)
    assert iou.max() <= 0.3 + 1e-6


def test_batch_matches_single_and_uint8(build, image):
    m = confident(build())
    other = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        both = m([image, other])
        alone = m([other])[0]
        assert alone["boxes"].shape[0] > 0
        assert torch.allclose(both[1]["boxes"], alone["boxes"], atol=1e-3)
        u8 = (image * 255).round().to(torch.uint8)
        a = m([u8])[0]["boxes"]
        b = m([u8.float() / 255])[0]["boxes"]
    assert a.shape[0] > 0 and torch.allclose(a, b, atol=1e-3)


def test_max_detections_and_detection_settings(build, image):
    m = confident(build(max_detections=3))
    with torch.no_grad():
        with m.detection_settings(nms_iou=0.9):
            out = m([image, image])
        assert [len(o["scores"]) for o in out] == [3, 3]
        assert (out[0]["scores"].diff() <= 0).all()  # best first
        with m.detection_settings(score_thresh=0.9999999):
            assert m([image])[0]["scores"].numel() == 0
    assert (m.score_thresh, m.nms_iou, m.max_detections) == (0.5, 0.3, 3)  # restored after the context


def test_pil_backend_resizes_like_pil(build, image):
    import numpy as np
    from PIL import Image

    m = build(preprocess={"min_size": 96, "max_size": None, "backend": "pil", "resample": "bicubic",
                          "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]})
    u8 = (image * 255).round().to(torch.uint8)
    out = m.preprocess.resize_image(u8, (96, 144))
    ref = Image.fromarray(u8.permute(1, 2, 0).numpy()).resize((144, 96), Image.BICUBIC)
    assert torch.equal(out, torch.from_numpy(np.asarray(ref, dtype=np.float32) / 255).permute(2, 0, 1))


def test_channels_last_changes_layout_not_results(build, image):
    a = confident(build(channels_last=True))
    b = confident(build(channels_last=False))
    b.load_state_dict(a.state_dict())
    assert a.backbone.stages[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert b.backbone.stages[0][0].weight.is_contiguous()
    assert a.state_dict().keys() == b.state_dict().keys()
    x = normalise(image).unsqueeze(0)
    with torch.no_grad():
        fa, fb = a.features(x), b.features(x)
        pa, pb = a([image])[0], b([image])[0]
    assert fa.is_contiguous(memory_format=torch.channels_last) and torch.allclose(fa, fb, atol=1e-5)
    assert pa["boxes"].shape[0] > 0
    assert torch.allclose(pa["boxes"], pb["boxes"], atol=1e-3) and torch.equal(pa["labels"], pb["labels"])
