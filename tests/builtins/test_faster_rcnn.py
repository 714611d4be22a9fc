"""FasterRCNN detector: forward modes, anchors, predict (on the tiny backbone)."""

from __future__ import annotations

import pytest
import torch

from detkit.interfaces import RPNOutput
from detkit.registry import registry
from detkit.data.transforms import resize_shape
from detkit_builtins.faster_rcnn import FasterRCNN

NUM_CLASSES = 3


def build(**params) -> FasterRCNN:
    torch.manual_seed(0)
    cfg = {
        "type": "faster_rcnn",
        "backbone": {"type": "tiny", "channels": [8, 8, 16, 16], "tail_features": 32},
        "rpn": {"type": "rpn", "mid_channels": 16, "proposal": {"test_pre_nms": 300, "test_post_nms": 40}},
        "preprocess": {"min_size": 96, "max_size": 160},
        **params,
    }
    return registry("detector").build(cfg, num_classes=NUM_CLASSES).eval()


def confident(model: FasterRCNN, cls: int = 1) -> FasterRCNN:
    """Make every RoI a confident detection of foreground class ``cls`` with zero deltas."""
    with torch.no_grad():
        model.head.score.weight.zero_()
        model.head.score.bias.zero_()
        model.head.score.bias[cls + 1] = 10.0
        model.head.cls_loc.weight.zero_()
        model.head.cls_loc.bias.zero_()
    return model


@pytest.fixture
def image() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 64, 96, generator=g)


def test_registry_defaults_and_attributes():
    m = build()
    assert m.num_classes == NUM_CLASSES
    assert m.loc_normalize_std == (0.1, 0.1, 0.2, 0.2)
    assert m.head.cls_loc.out_features == (NUM_CLASSES + 1) * 4
    # The RoI tail is registered once, under the head (the reference layout).
    keys = m.state_dict().keys()
    assert any(k.startswith("head.classifier.") for k in keys)
    assert not any(".tail." in k or "_tail" in k for k in keys)


def test_forward_modes_agree(image):
    m = build()
    x = torch.stack([image, image.flip(-1)])
    feats = m(x, mode="extractor")
    expected = m.extractor((x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
                           / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    assert torch.allclose(feats, expected)
    sizes = torch.tensor([[64, 96], [64, 96]])
    rpn_out = m(feats, mode="rpn", image_sizes=sizes, scale=1.0, input_size=(64, 96))
    assert isinstance(rpn_out, RPNOutput)
    assert rpn_out.anchors.shape == (4 * 6 * 9, 4)
    locs, scores = m(feats, mode="head", rois=rpn_out.rois, roi_indices=rpn_out.roi_indices, input_size=(64, 96))
    r = rpn_out.rois.shape[0]
    assert locs.shape == (r, (NUM_CLASSES + 1) * 4) and scores.shape == (r, NUM_CLASSES + 1)
    full = m(x)
    assert torch.allclose(full[0], locs, atol=1e-5) and torch.equal(full[2], rpn_out.rois)
    assert full[3].dtype == torch.int64


def test_train_mode_uses_train_counts(image):
    m = build(rpn={"type": "rpn", "mid_channels": 16,
                   "proposal": {"train_post_nms": 5, "test_post_nms": 2, "min_size": 0, "nms_iou": 1.0}})
    x = image.unsqueeze(0)
    assert m.eval()(x)[2].shape[0] == 2
    assert m.train()(x)[2].shape[0] == 5


def test_anchors_for_input_size():
    m = build()
    assert m.feature_size((64, 96)) == (4, 6)
    a = m.anchors((64, 96))
    assert a.shape == (4 * 6 * 9, 4)
    assert torch.equal(a, m.rpn.anchors([(4, 6)]))


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
    assert resize_shape(333, 500, 600, None) == (600, 901)  # round (training's default)


def test_predict_input_size_follows_preprocess_rounding():
    m = build(preprocess={"min_size": 600, "max_size": None, "rounding": "truncate"})
    assert m.predict_input_size(333, 500) == (600, 900)
    m = build(preprocess={"min_size": 600, "max_size": None})
    assert m.predict_input_size(333, 500) == (600, 901)


def test_predict_blank_image_is_empty_with_dtypes():
    m = build()
    out = m.predict([torch.zeros(3, 50, 70)])
    assert len(out) == 1
    d = out[0]
    assert d["boxes"].shape == (0, 4) and d["boxes"].dtype == torch.float32
    assert d["scores"].shape == (0,) and d["scores"].dtype == torch.float32
    assert d["labels"].shape == (0,) and d["labels"].dtype == torch.int64
    assert m.predict([]) == []


def test_predict_maps_boxes_back_to_original_pixels(image):
    m = confident(build())
    # 64x96 -> short side 96: 96x144, a factor 1.5 on both axes.
    small = m.predict([image])[0]
    resized = torch.nn.functional.interpolate(image[None], size=(96, 144), mode="bicubic",
                                              align_corners=False, antialias=True)[0].clamp(0, 1)
    big = m.predict([resized], resize=False)[0]
    assert small["boxes"].shape[0] > 0
    assert (small["labels"] == 1).all()
    assert torch.allclose(small["boxes"] * 1.5, big["boxes"], atol=0.5)
    assert (small["boxes"][:, 2] <= 96 + 1e-4).all() and (small["boxes"][:, 3] <= 64 + 1e-4).all()
    # NMS at 0.3 within the class: no two kept boxes overlap more.
    from torchvision.ops import box_iou
    iou = box_iou(small["boxes"], small["boxes"]).fill_diagonal_(0)
    assert iou.max() <= 0.3 + 1e-6


def test_predict_batch_matches_single_and_uint8(image):
    m = confident(build())
    other = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(5))
    both = m.predict([image, other])
    alone = m.predict([other])[0]
    assert torch.allclose(both[1]["boxes"], alone["boxes"], atol=1e-3)
    u8 = (image * 255).round().to(torch.uint8)
    a = m.predict([u8])[0]["boxes"]
    b = m.predict([u8.float() / 255])[0]["boxes"]
    assert torch.allclose(a, b, atol=1e-3)


def test_max_detections_and_thresholds(image):
    m = confident(build(max_detections=3))
    out = m.predict([image, image], nms_iou=0.9)
    assert [len(o["scores"]) for o in out] == [3, 3]
    assert (out[0]["scores"].diff() <= 0).all()  # best first
    assert m.predict([image], score_thresh=0.9999999)[0]["scores"].numel() == 0
    assert m.training is False
    m.train()
    m.predict([image])
    assert m.training is True  # predict restores the mode


def test_pil_backend_resizes_like_pil(image):
    from PIL import Image
    import numpy as np

    m = build(preprocess={"min_size": 96, "max_size": None, "backend": "pil"})
    u8 = (image * 255).round().to(torch.uint8)
    out = m._resize(u8, (96, 144))
    ref = Image.fromarray(u8.permute(1, 2, 0).numpy()).resize((144, 96), Image.BICUBIC)
    assert torch.equal(out, torch.from_numpy(np.asarray(ref, dtype=np.float32) / 255).permute(2, 0, 1))


def test_channels_last_changes_layout_not_results(image):
    a = confident(build(channels_last=True))
    b = confident(build(channels_last=False))
    b.load_state_dict(a.state_dict())
    assert a.extractor.stages[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert b.extractor.stages[0][0].weight.is_contiguous()
    assert a.state_dict().keys() == b.state_dict().keys()
    x = image.unsqueeze(0)
    fa, fb = a(x, mode="extractor"), b(x, mode="extractor")
    assert fa.is_contiguous(memory_format=torch.channels_last) and torch.allclose(fa, fb, atol=1e-5)
    pa, pb = a.predict([image])[0], b.predict([image])[0]
    assert pa["boxes"].shape[0] > 0
    assert torch.allclose(pa["boxes"], pb["boxes"], atol=1e-3) and torch.equal(pa["labels"], pb["labels"])
