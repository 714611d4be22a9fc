"""The mobilenet_v3_large backbone: stage outputs, norms, freezing, ImageNet weights from a local file."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v3_large

from detkit.errors import ConfigError
from detkit.registry import ComponentValidationError, registry


def backbone(**spec):
    return registry("backbone").build({"type": "mobilenet_v3_large", **spec})


def test_stage_outputs_have_the_declared_shapes():
    b = backbone(out_features=["stage2", "stage3", "stage4", "stage5"]).eval()
    with torch.no_grad():
        out = b(torch.zeros(1, 3, 96, 160))
    assert list(out) == ["stage2", "stage3", "stage4", "stage5"]
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == {
        "stage2": (40, 12, 20), "stage3": (80, 6, 10), "stage4": (160, 3, 5), "stage5": (960, 3, 5)}
    assert b.output_shape() == {"stage2": (40, 8), "stage3": (80, 16), "stage4": (160, 32), "stage5": (960, 32)}
    # Only what feeds a requested stage is kept.
    assert len(backbone(out_features=["stage3"]).features) == 8
    single = backbone().eval()
    assert single.output_shape() is None and single(torch.zeros(1, 3, 64, 96)).shape == (1, 960, 2, 3)
    with pytest.raises(ComponentValidationError, match="finest first"):
        backbone(out_features=["stage5", "stage4"])


def test_frozen_bn_stays_frozen_and_bn_trains():
    frozen = backbone(out_features=["stage4", "stage5"]).train()
    bns = [m for m in frozen.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training and not m.weight.requires_grad for m in bns)
    trainable = backbone(norm="bn", out_features=["stage4", "stage5"]).train()
    bns = [m for m in trainable.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.training and m.weight.requires_grad and m.eps == 1e-5 for m in bns)
    before = bns[0].running_mean.clone()
    sum(v.sum() for v in trainable(torch.rand(2, 3, 64, 64)).values()).backward()
    assert not torch.equal(before, bns[0].running_mean) and bns[0].weight.grad is not None
    assert backbone(norm="bn", bn_eps=0.001).features[0][1].eps == 0.001


def test_freeze_stages_follow_torchvisions_trainable_layers():
    b = backbone(norm="bn", freeze_stages=3, out_features=["stage4", "stage5"])  # trainable_backbone_layers=3
    assert not any(p.requires_grad for p in b.features[:7].parameters())
    assert all(p.requires_grad for p in b.features[7:].parameters())
    assert not any(p.requires_grad for p in backbone(norm="bn", freeze_stages=6).parameters())


def test_pretrained_from_a_local_torchvision_file(tmp_path):
    with torch.device("meta"):
        net = mobilenet_v3_large(weights=None)
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.rand(v.shape, generator=g) + 0.5 if v.is_floating_point() else torch.zeros((), dtype=v.dtype))
             for k, v in net.state_dict().items()}
    path = tmp_path / "mobilenet_v3_large-8738ca79.pth"
    torch.save(state, path)
    b = backbone(pretrained=str(path), out_features=["stage4", "stage5"])
    ours = b.state_dict()
    assert len(ours) == len([k for k in state if k.startswith("features.")])
    for key, value in ours.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, state[key]), key
    with pytest.raises(ConfigError, match="model.backbone.pretrained: .*not found"):
        backbone(pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="gn cannot load"):
        backbone(pretrained=str(path), norm="gn")


def test_pretrained_true_offline_is_one_line(tmp_path, monkeypatch, offline_hub):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError) as err:
        backbone(pretrained=True)
    msg = str(err.value)
    assert "\n" not in msg and "mobilenet_v3_large-8738ca79.pth" in msg
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    assert offline_hub == ["https://download.pytorch.org/models/mobilenet_v3_large-8738ca79.pth"]


def test_any_config_can_use_it_for_training(build_tiny_detector, two_images):
    """mobilenet_v3_large + fpn + two_mlp from a config: a train step gives all four losses."""
    model = registry("detector").build({
        "type": "faster_rcnn",
        "backbone": {"type": "mobilenet_v3_large", "norm": "bn", "out_features": ["stage3", "stage4", "stage5"]},
        "neck": {"type": "fpn", "out_channels": 32},
        "rpn": {"type": "rpn", "mid_channels": None, "anchor": {"sizes": [[32, 64]] * 4},
                "proposal": {"score_thresh": 0.01}},
        "roi_head": {"type": "roi_head", "pooler": {"type": "multiscale_roi_align", "in_features": ["P0", "P1"]},
                     "box_head": {"type": "two_mlp", "representation_size": 64}},
        "preprocess": {"min_size": 96, "max_size": 128},
    }, num_classes=3).train()
    images, targets = two_images
    losses = model(images, targets)
    assert set(losses) == {"rpn_loc", "rpn_cls", "roi_loc", "roi_cls"}
    sum(losses.values()).backward()
    assert model.backbone.features[-1][0].weight.grad is not None
