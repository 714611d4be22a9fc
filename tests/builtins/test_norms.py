"""Normalisation choices and initialisation for training from scratch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detkit.data.synthetic import SyntheticShapes
from detkit.engine.checkpoint import load_detector, save_checkpoint
from detkit.registry import registry

NORMS = ["frozen_bn", "bn", "sync_bn", "gn"]
NORM_TYPES = {"frozen_bn": nn.BatchNorm2d, "bn": nn.BatchNorm2d, "sync_bn": nn.SyncBatchNorm, "gn": nn.GroupNorm}

SMALL_HEAD = {
    "rpn": {
        "type": "rpn", "mid_channels": 16,
        "anchor": {"scales": [1, 2], "ratios": [1.0]},
        "proposal": {"train_pre_nms": 200, "train_post_nms": 32, "test_pre_nms": 200, "test_post_nms": 16,
                     "min_size": 2},
        "anchor_target": {"type": "anchor_target", "n_sample": 32},
    },
    "roi_head": {"type": "roi_head", "pooler": {"type": "roi_align", "sampling_ratio": 1},
                 "proposal_target": {"type": "proposal_target", "n_sample": 16}},
    "preprocess": {"min_size": 96, "max_size": 96},
    "score_thresh": 0.0,
}
BACKBONES = {
    "tiny": {"type": "tiny", "channels": [8, 16, 32, 32], "tail_features": 32},
    "resnet50": {"type": "resnet50"},
}


def _norm_layers(*modules: nn.Module) -> list[nn.Module]:
    return [m for mod in modules for m in mod.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))]


def _batch():
    ds = SyntheticShapes(SyntheticShapes.Params(num_images=2, image_size=(96, 96), objects=(1, 2),
                                                object_size=(20, 40), seed=3, classes=["circle", "square"]))
    images = [ds[i][0] for i in range(2)]
    return images, [{"boxes": ds[i][1]["boxes"], "labels": ds[i][1]["labels"]} for i in range(2)]


@pytest.mark.parametrize("backbone", ["tiny", "resnet50"])
@pytest.mark.parametrize("norm", NORMS)
def test_norm_builds_trains_a_step_and_round_trips_a_checkpoint(tmp_path, backbone, norm):
    torch.manual_seed(0)
    model_cfg = {"type": "faster_rcnn", "backbone": {**BACKBONES[backbone], "norm": norm}, **SMALL_HEAD}
    model = registry("detector").build(model_cfg, num_classes=2).train()
    tail = model.roi_head.box_head.tail
    norms = _norm_layers(model.backbone, tail)
    assert norms and all(isinstance(m, NORM_TYPES[norm]) for m in norms)
    if norm == "gn":  # 32 groups where the channels allow it
        assert all(m.num_groups == math.gcd(32, m.num_channels) or m.num_channels < 32 for m in norms)
    frozen = norm == "frozen_bn"
    # BatchNorm follows train() unless frozen; frozen layers keep their statistics and affine weights.
    bns = [m for m in norms if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(m.training != frozen for m in bns)
    assert all(p.requires_grad != frozen for m in norms for p in m.parameters())

    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    trainer = registry("trainer").build(
        {"type": "faster_rcnn_trainer", "seed": 0},
        model=model, optimizer=torch.optim.SGD(params, lr=0.01),
    )
    losses = trainer.train_step(*_batch())
    assert torch.isfinite(losses["total"])
    after = model.state_dict()
    first_conv = next(k for k in after if k.startswith("backbone.") and k.endswith("weight") and after[k].dim() == 4)
    assert not torch.equal(before[first_conv], after[first_conv])  # the backbone learns
    # A norm layer's affine weights move unless frozen; BatchNorm statistics move unless frozen.
    norm_keys = [k for k in after if k.startswith("backbone.") and (".bn" in k or ".1." in k) and k.endswith(".bias")]
    assert norm_keys
    assert any(not torch.equal(before[k], after[k]) for k in norm_keys) != frozen
    stat_keys = [k for k in after if k.endswith("running_mean")]
    assert (len(stat_keys) > 0) == (norm != "gn")
    if stat_keys:
        assert any(not torch.equal(before[k], after[k]) for k in stat_keys) != frozen

    path = save_checkpoint(tmp_path / "n.pt", model=model.state_dict(), config={"model": model_cfg},
                           classes=["a", "b"], step=1)
    loaded, _ = load_detector(path)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    model.eval()
    images = _batch()[0]
    with torch.no_grad(), model.detection_settings(score_thresh=0.0), loaded.detection_settings(score_thresh=0.0):
        a = model(images)
        b = loaded(images)
        # The features are compared too: a step from scratch can leave a model without detections.
        batch, _ = model.preprocess(images)
        assert torch.equal(model.features(batch.tensor), loaded.features(batch.tensor))
    for x, y in zip(a, b):
        assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["scores"], y["scores"])


@pytest.mark.parametrize("norm", NORMS)
def test_vgg16_bn_norm_options(norm):
    with torch.device("meta"):  # structure only: VGG16's 138 M parameters are not needed
        b = registry("backbone").build({"type": "vgg16_bn", "norm": norm, "freeze_stages": 1})
    norms = _norm_layers(b)
    assert len(norms) == 13 and all(isinstance(m, NORM_TYPES[norm]) for m in norms)
    assert not any(p.requires_grad for p in b.features[:7].parameters())  # stage 1 frozen
    assert all(p.requires_grad != (norm == "frozen_bn") for m in norms[2:] for p in m.parameters())
    assert b.out_channels == 512 and b.roi_tail().out_features == 4096


def test_gn_with_imagenet_weights_and_old_freeze_bn_spelling(tmp_path):
    from detkit.errors import ConfigError

    with pytest.raises(ConfigError, match="model.backbone.norm: gn cannot load"):
        registry("backbone").build({"type": "resnet50", "norm": "gn", "pretrained": str(tmp_path / "x.pth")})
    spec = registry("backbone").validate({"type": "resnet50", "freeze_bn": False})
    assert spec.params.norm == "bn"
    assert registry("backbone").validate({"type": "tiny", "freeze_bn": True}).params.norm == "frozen_bn"


def _clutter_input(size: int = 160) -> torch.Tensor:
    """A cluttered photograph-like image, normalised as the detector does (ImageNet mean/std)."""
    img, _ = SyntheticShapes(SyntheticShapes.Params(preset="clutter", num_images=1, size_range=None,
                                                    image_size=(size, size), background="photo", seed=1))[0]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return ((img - mean) / std)[None]


@pytest.mark.parametrize(
    "spec,mode",
    [
        ({"type": "tiny", "norm": "bn"}, "train"),
        ({"type": "tiny", "norm": "gn"}, "eval"),
        ({"type": "resnet50", "norm": "gn"}, "eval"),
        ({"type": "resnet50", "norm": "bn"}, "train"),
        ({"type": "vgg16"}, "eval"),
        ({"type": "vgg16_bn", "norm": "gn"}, "eval"),
    ],
)
def test_from_scratch_features_have_unit_order_scale(spec, mode):
    # He initialisation keeps the activations' scale through the depth: the old
    # default-initialised trunk gave features of ~4e-4 RMS, which no head can learn from.
    torch.manual_seed(0)
    b = registry("backbone").build(spec)
    getattr(b, mode)()
    with torch.no_grad():
        rms = float(b(_clutter_input()).pow(2).mean().sqrt())
    assert 0.1 <= rms <= 10, rms


def test_he_init_and_head_init_follow_the_references():
    torch.manual_seed(0)
    model = registry("detector").build(
        {"type": "faster_rcnn", "backbone": {"type": "tiny", "channels": [32, 64, 64, 64]},
         "rpn": {"type": "rpn", "mid_channels": 256, "cls_prior": 0.01},
         "roi_head": {"type": "roi_head", "cls_prior": 0.01}},
        num_classes=4,
    )
    conv = model.backbone.stages[1][0]  # 32 -> 64 channels, 3x3
    fan_out = conv.out_channels * 9
    assert float(conv.weight.detach().std()) == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
    assert float(model.rpn.conv1.weight.detach().std()) == pytest.approx(0.01, rel=0.1)
    assert float(model.rpn.score.weight.detach().std()) == pytest.approx(0.01, rel=0.15)
    assert float(model.roi_head.score.weight.detach().std()) == pytest.approx(0.01, rel=0.1)
    assert float(model.roi_head.cls_loc.weight.detach().std()) == pytest.approx(0.001, rel=0.1)
    # The priors: every anchor starts at 1 % object, every RoI at 1 % foreground.
    x = torch.zeros(1, model.rpn.score.in_channels, 2, 2)
    p_obj = model.rpn.score(x).detach().permute(0, 2, 3, 1).reshape(-1, 2).softmax(-1)[:, 1]
    assert torch.allclose(p_obj, torch.full_like(p_obj, 0.01), atol=1e-6)
    p = model.roi_head.score(torch.zeros(1, model.roi_head.score.in_features)).detach().softmax(-1)[0]
    assert float(p[0]) == pytest.approx(0.99) and torch.allclose(p[1:], torch.full((4,), 0.0025))


def test_tiny_init_pytorch_keeps_the_layer_defaults():
    """The quickstart's `init: pytorch`: PyTorch's default conv init (kaiming_uniform with
    a=sqrt(5): std 1/sqrt(3 fan_in)), not He's sqrt(2/fan_out)."""
    torch.manual_seed(0)
    he = registry("backbone").build({"type": "tiny", "channels": [32, 64, 64, 64]})
    torch.manual_seed(0)
    default = registry("backbone").build({"type": "tiny", "channels": [32, 64, 64, 64], "init": "pytorch"})
    fan_in = 32 * 9
    std = float(default.stages[1][0].weight.detach().std())
    assert std == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.1)
    assert float(he.stages[1][0].weight.detach().std()) == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.1)


@pytest.mark.parametrize("recipe", ["tiny", "resnet50_gn"])
def test_scratch_recipes_validate_and_build_without_weights(recipe):
    from pathlib import Path

    from detkit.config import load_config

    path = Path(__file__).resolve().parents[2] / "configs" / "scratch" / f"{recipe}.yaml"
    cfg = load_config(path, ["train.epochs=1"])
    t = cfg.data.transforms
    assert t.hflip > 0 and t.photometric  # the augmentation the recipe promises
    assert cfg.model.params.preprocess.train_min_sizes  # and multi-scale training
    scheduler = getattr(cfg.train.scheduler, "params", cfg.train.scheduler)  # a component spec or settings
    assert scheduler.warmup_iters > 0
    model = registry("detector").build(cfg.model, num_classes=6)
    norms = _norm_layers(model)
    if recipe == "resnet50_gn":
        assert cfg.train.amp
        assert norms and all(isinstance(m, nn.GroupNorm) for m in norms)
        assert any(isinstance(m, nn.GroupNorm) for m in model.roi_head.box_head.modules())
    else:
        assert norms and all(isinstance(m, nn.BatchNorm2d) and m.weight.requires_grad for m in norms)
