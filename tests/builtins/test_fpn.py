"""Multi-level features: FPN neck, per-level anchors and proposals, multi-scale RoI pooling."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from detkit.errors import ConfigError
from detkit.interfaces import ImageBatch, ShapeSpec
from detkit.registry import build_detector, registry
from detkit_builtins.anchors import AnchorParams, MultiLevelAnchorGenerator
from detkit_builtins.necks.fpn import FPN
from detkit_builtins.rpn import RegionProposalNetwork

REPO = Path(__file__).resolve().parents[2]
C_SHAPES = {"C2": ShapeSpec(8, 4), "C3": ShapeSpec(16, 8), "C4": ShapeSpec(24, 16), "C5": ShapeSpec(32, 32)}
P_SHAPES = {f"P{k}": ShapeSpec(16, 2 ** k) for k in range(2, 7)}
SIZES = [[32], [64], [128], [256], [512]]


def c_features(n: int, h: int, w: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, s.channels, -(-h // s.stride), -(-w // s.stride), generator=g) for k, s in C_SHAPES.items()}


def test_fpn_equals_torchvision_feature_pyramid_with_the_same_weights():
    torch.manual_seed(0)
    ours = FPN(FPN.Params(out_channels=16), input_shapes=C_SHAPES)
    theirs = FeaturePyramidNetwork([8, 16, 24, 32], 16, extra_blocks=LastLevelMaxPool())
    theirs.load_state_dict(ours.state_dict())  # the same keys: inner_blocks.i.0, layer_blocks.i.0
    feats = c_features(2, 100, 72)  # odd sizes: the top-down path upsamples to each lateral's size
    out = ours(feats)
    ref = theirs(OrderedDict((str(i), v) for i, v in enumerate(feats.values())))
    assert list(out) == ["P2", "P3", "P4", "P5", "P6"]
    assert ours.output_shape() == {"P2": (16, 4), "P3": (16, 8), "P4": (16, 16), "P5": (16, 32), "P6": (16, 64)}
    for o, r in zip(out.values(), ref.values()):
        torch.testing.assert_close(o, r)
    assert out["P6"].shape[-2:] == (2, 2)  # ceil(4 / 2), ceil(3 / 2)


def test_fpn_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="model.neck.in_features: C6 not produced"):
        FPN(FPN.Params(in_features=["C5", "C6"]), input_shapes=C_SHAPES)
    with pytest.raises(ConfigError, match="finest first"):
        FPN(FPN.Params(in_features=["C4", "C3"]), input_shapes=C_SHAPES)
    with pytest.raises(ConfigError, match="multi-level backbone"):
        FPN(input_shapes={})


@pytest.mark.parametrize("level_stride", ["input_ratio", "nominal"])
def test_multi_level_anchors_match_torchvision(level_stride):
    gen = MultiLevelAnchorGenerator(
        [4, 8, 16, 32, 64], AnchorParams(sizes=SIZES, ratios=[0.5, 1.0, 2.0], level_stride=level_stride)
    )
    tv = TVAnchorGenerator(tuple((s[0],) for s in SIZES), ((0.5, 1.0, 2.0),) * 5)
    h, w = 160, 96  # P6 of 160 px is 3 cells: torchvision shifts them by 160 // 3 = 53 px, not 64
    maps = [torch.zeros(1, 1, -(-h // s), -(-w // s)) for s in (4, 8, 16, 32, 64)]
    ours = torch.cat(gen([m.shape[-2:] for m in maps], (h, w)))
    theirs = tv(ImageList(torch.zeros(1, 3, h, w), [(h, w)]), maps)[0]
    if level_stride == "input_ratio":
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    else:
        last = maps[-1].shape[-2] * maps[-1].shape[-1] * 3
        torch.testing.assert_close(ours[:-last], theirs[:-last], rtol=0, atol=0)
        assert not torch.equal(ours[-last:], theirs[-last:])


def build_rpn(**proposal) -> RegionProposalNetwork:
    torch.manual_seed(0)
    params = RegionProposalNetwork.Params(
        mid_channels=None, anchor={"sizes": SIZES}, proposal={"min_size": 0.001, "nms_iou": 0.7, **proposal}
    )
    rpn = RegionProposalNetwork(params, in_channels=16, feat_stride=[4, 8, 16, 32, 64])
    with torch.no_grad():
        rpn.loc.weight.normal_(0, 0.05)
        rpn.score.weight.normal_(0, 0.5)
    return rpn.eval()


def image_batch(sizes: torch.Tensor, input_size: tuple[int, int]) -> ImageBatch:
    n = sizes.shape[0]
    return ImageBatch(torch.zeros(n, 3, *input_size), sizes, sizes, torch.ones(n))


def p_features(n: int, h: int, w: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, 16, -(-h // s.stride), -(-w // s.stride), generator=g) for k, s in P_SHAPES.items()}


def test_rpn_scores_every_level_and_takes_top_k_per_level():
    rpn = build_rpn(test_pre_nms=5, test_post_nms=1000)
    feats = p_features(2, 128, 96)
    sizes = torch.tensor([[128, 96], [100, 80]])
    out, losses = rpn(feats, image_batch(sizes, (128, 96)))
    assert losses == {}
    counts = [m.shape[-2] * m.shape[-1] * 3 for m in feats.values()]
    assert rpn.anchors([m.shape[-2:] for m in feats.values()], (128, 96)).shape == (sum(counts), 4)
    # At most 5 per level per image survive, whatever the NMS does.
    for i in range(2):
        n_i = int((out.image_indices == i).sum())
        assert 0 < n_i <= 5 * len(counts)
    rois = out.boxes[out.image_indices == 1]
    assert (rois[:, 2] <= 80).all() and (rois[:, 3] <= 100).all()  # clipped to image 1's true size


def test_rpn_nms_runs_per_level_and_post_nms_caps_each_image():
    rpn = build_rpn(test_pre_nms=50, test_post_nms=7)
    out, _ = rpn(p_features(3, 96, 96), image_batch(torch.tensor([[96, 96]] * 3), (96, 96)))
    assert torch.equal(torch.bincount(out.image_indices, minlength=3), torch.tensor([7, 7, 7]))
    # One image alone gives the same proposals as in the batch.
    one = {k: v[1:2] for k, v in p_features(3, 96, 96).items()}
    alone, _ = rpn(one, image_batch(torch.tensor([[96, 96]]), (96, 96)))
    torch.testing.assert_close(alone.boxes, out.boxes[out.image_indices == 1])


def test_multiscale_pooler_pools_like_torchvision_multiscale_roialign():
    torch.manual_seed(0)
    head = registry("roi_head").build(
        {"type": "roi_head", "pooler": {"type": "multiscale_roi_align"},
         "box_head": {"type": "two_mlp", "representation_size": 32}},
        num_classes=3, input_shapes=P_SHAPES,
    )
    feats = p_features(2, 256, 224)
    rois = torch.tensor([[0, 0, 20, 20], [10, 10, 200, 240], [5, 5, 100, 60], [0, 0, 220, 250], [3, 4, 40, 90.0]])
    idx = torch.tensor([0, 0, 1, 1, 1])
    ours = head.pooler(feats, rois, idx, (256, 224))
    pooler = MultiScaleRoIAlign(["P2", "P3", "P4", "P5"], 7, 2)
    theirs = pooler(feats, [rois[idx == 0], rois[idx == 1]], [(256, 224)] * 2)
    torch.testing.assert_close(ours, theirs)
    # floor(4 + log2(sqrt(area) / 224)): sqrt(area) 20 -> 0.5 -> P2; 209 -> 3.9 -> P3;
    # 72 -> 2.4 -> P2; 235 -> 4.07 -> P4; 56 -> 2.0 -> P2 (indices into P2..P5).
    assert head.pooler.levels(rois).tolist() == [0, 1, 0, 2, 0]
    assert head.box_head.fc6.in_features == 16 * 7 * 7
    locs, scores = head.predict_boxes(feats, rois, idx, (256, 224))
    assert locs.shape == (5, 16) and scores.shape == (5, 4)


def fpn_model_cfg(**extra) -> dict:
    return {
        "type": "faster_rcnn",
        "backbone": {"type": "resnet50", "out_features": ["C2", "C3", "C4", "C5"], "norm": "frozen_bn"},
        "neck": {"type": "fpn", "out_channels": 32},
        "rpn": {
            "type": "rpn", "mid_channels": None, "anchor": {"sizes": SIZES},
            "proposal": {"train_pre_nms": 200, "train_post_nms": 64, "test_pre_nms": 100, "test_post_nms": 32,
                         "min_size": 0.001, "min_size_before_topk": False},
        },
        "roi_head": {"type": "roi_head", "pooler": {"type": "multiscale_roi_align"},
                     "box_head": {"type": "two_mlp", "representation_size": 64},
                     "proposal_target": {"type": "proposal_target", "n_sample": 32}},
        "preprocess": {"min_size": 96, "max_size": 128, "size_divisible": 32, "pad": "mean"},
        **extra,
    }


def test_fpn_detector_trains_one_step_and_predicts():
    torch.manual_seed(0)
    model = build_detector(fpn_model_cfg(), 3)
    model.train()
    images = [torch.rand(3, 96, 128), torch.rand(3, 90, 120)]  # padded to 96 x 128 (multiple of 32)
    targets = [
        {"boxes": torch.tensor([[10.0, 12, 60, 80]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[30.0, 20, 110, 85], [0, 0, 40, 40]]), "labels": torch.tensor([0, 2])},
    ]
    losses = model(images, targets)
    assert set(losses) == {"rpn_loc", "rpn_cls", "roi_loc", "roi_cls"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name in ("neck.layer_blocks.0.0.weight", "rpn.conv1.weight", "roi_head.box_head.fc6.weight",
                 "backbone.layer4.0.conv1.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # Frozen stages stay frozen; anchors come from the RPN, all levels concatenated.
    assert model.anchors((96, 128)).shape[0] == 3 * sum((96 // s) * (128 // s) for s in (4, 8, 16, 32)) + 3 * 2 * 2
    with torch.no_grad(), model.eval().detection_settings(score_thresh=0.0):
        out = model([torch.rand(3, 70, 90), torch.rand(3, 90, 60)])
    assert len(out) == 2 and all(o["boxes"].shape[1] == 4 for o in out)
    assert all(len(o["scores"]) > 0 for o in out)
    assert (out[1]["boxes"][:, 2] <= 60 + 1e-3).all() and (out[1]["boxes"][:, 3] <= 90 + 1e-3).all()  # its own pixels


def test_c4_backbone_with_multiscale_head_or_fpn_without_levels_fail_at_build():
    cfg = fpn_model_cfg()
    cfg["backbone"] = {"type": "resnet50"}
    with pytest.raises(ConfigError, match="multi-level backbone"):
        build_detector(cfg, 3)
    cfg = fpn_model_cfg(neck=None)
    with pytest.raises(ConfigError, match="channels"):
        build_detector(cfg, 3)
    cfg = fpn_model_cfg(roi_head={"type": "roi_head"})  # roi_pool on one map
    with pytest.raises(ConfigError, match="use type multiscale_roi_align"):
        build_detector(cfg, 3)
    cfg = fpn_model_cfg(roi_head={"type": "roi_head", "pooler": {"type": "multiscale_roi_align"}})
    with pytest.raises(ConfigError, match="backbone_tail .* use type two_mlp"):
        build_detector(cfg, 3)
    cfg = fpn_model_cfg(neck=None, backbone={"type": "resnet50"}, rpn={"type": "rpn"})
    cfg["roi_head"]["pooler"] = {"type": "multiscale_roi_align"}
    with pytest.raises(ConfigError, match="multiscale_roi_align needs multi-level features"):
        build_detector(cfg, 3)


@pytest.mark.parametrize(
    "name", ["frcnn_resnet50_fpn.yaml", "coco/frcnn_resnet50_fpn.yaml", "import/torchvision_fasterrcnn_resnet50_fpn.yaml",
             "import/torchvision_fasterrcnn_resnet50_fpn_v2.yaml", "finetune/fasterrcnn_resnet50_fpn.yaml",
             "finetune/fasterrcnn_resnet50_fpn_v2.yaml"]
)
def test_shipped_fpn_configs_validate_and_build(name):
    from detkit.config import load_config

    cfg = load_config(REPO / "configs" / name).to_dict()
    assert cfg["model"]["neck"]["type"] == "fpn"
    with torch.device("meta"):
        model = build_detector(cfg["model"], 20)
    assert model.multi_level and list(model.neck.output_shape()) == ["P2", "P3", "P4", "P5", "P6"]


def test_tiny_backbone_multi_level_feeds_fpn_and_trains():
    """tiny with out_features returns named stage maps (strides 4..16) for the FPN and has no RoI tail."""
    from detkit_builtins.backbones.tiny import TinyBackbone

    b = TinyBackbone(TinyBackbone.Params(channels=[8, 16, 24, 32], out_features=["C2", "C3", "C4"]))
    assert b.output_shape() == {"C2": (16, 4), "C3": (24, 8), "C4": (32, 16)}
    out = b(torch.rand(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "C2": (1, 16, 16, 24), "C3": (1, 24, 8, 12), "C4": (1, 32, 4, 6)
    }
    with pytest.raises(ValueError, match="multiscale_roi_align"):
        b.roi_tail()
    assert torch.is_tensor(TinyBackbone(TinyBackbone.Params(channels=[8, 16, 24, 32]))(torch.rand(1, 3, 64, 64)))

    torch.manual_seed(0)
    cfg = fpn_model_cfg()
    cfg["backbone"] = {"type": "tiny", "channels": [8, 16, 24, 32], "out_features": ["C2", "C3", "C4"]}
    cfg["rpn"]["anchor"] = {"sizes": [[16], [32], [64], [128]]}
    model = build_detector(cfg, 3).train()
    trainer = registry("trainer").build(
        {"type": "faster_rcnn_trainer", "seed": 0}, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0)
    )
    losses = trainer.train_step([torch.rand(3, 96, 128)],
                                [{"boxes": torch.tensor([[10.0, 12, 60, 80]]), "labels": torch.tensor([1])}])
    assert torch.isfinite(losses["total"])
    for name in ("backbone.stages.0.0.weight", "backbone.stages.2.0.weight", "neck.inner_blocks.0.0.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # P2..P5 at strides 4, 8, 16, 32 (the FPN's extra level), three ratios per cell.
    assert model.anchors((96, 128)).shape[0] == 3 * sum((96 // s) * (128 // s) for s in (4, 8, 16, 32))


def test_several_anchor_sizes_per_level_match_torchvision():
    """The MobileNetV3 models: five sizes on each of three levels (strides 32, 32, 64), 15 anchors per cell."""
    sizes = [[32, 64, 128, 256, 512]] * 3
    gen = MultiLevelAnchorGenerator([32, 32, 64], AnchorParams(sizes=sizes, ratios=[0.5, 1.0, 2.0],
                                                                level_stride="input_ratio"))
    assert gen.num_per_cell == 15
    tv = TVAnchorGenerator(tuple(tuple(s) for s in sizes), ((0.5, 1.0, 2.0),) * 3)
    h, w = 320, 416
    maps = [torch.zeros(1, 1, h // 32, w // 32)] * 2 + [torch.zeros(1, 1, -(-h // 64), -(-w // 64))]
    ours = torch.cat(gen([m.shape[-2:] for m in maps], (h, w)))
    theirs = tv(ImageList(torch.zeros(1, 3, h, w), [(h, w)]), maps)[0]
    assert ours.shape == (15 * (2 * 10 * 13 + 5 * 7), 4)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_fpn_over_two_levels_of_one_stride_equals_torchvision():
    """torchvision's MobileNetV3 FPN merges two stride-32 stages (160 and 960 channels)."""
    shapes = {"stage4": ShapeSpec(16, 32), "stage5": ShapeSpec(24, 32)}
    ours = FPN(FPN.Params(out_channels=8), input_shapes=shapes)
    assert ours.output_shape() == {"P0": (8, 32), "P1": (8, 32), "P2": (8, 64)}
    theirs = FeaturePyramidNetwork([16, 24], 8, extra_blocks=LastLevelMaxPool())
    theirs.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(0)
    feats = {k: torch.randn(2, s.channels, 5, 7, generator=g) for k, s in shapes.items()}
    ref = theirs(OrderedDict((str(i), v) for i, v in enumerate(feats.values())))
    for o, r in zip(ours(feats).values(), ref.values()):
        torch.testing.assert_close(o, r)
    with pytest.raises(ConfigError, match="finest first"):
        FPN(input_shapes={"a": ShapeSpec(16, 32), "b": ShapeSpec(16, 16)})
