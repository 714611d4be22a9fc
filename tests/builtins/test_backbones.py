"""Backbones: shapes, locally supplied ImageNet weights, freezing, reference layout options."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet50, vgg16

from detkit.errors import CheckpointError, ConfigError
from detkit.registry import registry


def torchvision_format_file(path, net: nn.Module):
    """A state-dict file with torchvision's keys where every tensor holds one distinct value.

    Each tensor is a stride-0 view of a single number, so the file is a few KB
    even for VGG16 (the real one is 528 MB), yet a load that puts any tensor
    in the wrong place is detected.
    """
    state = {}
    for i, (k, v) in enumerate(net.state_dict().items()):
        value = torch.tensor([float(i + 1) / 1000], dtype=v.dtype) if v.is_floating_point() else torch.tensor([i])
        state[k] = value.to(v.dtype).expand(v.shape) if v.dim() else value.to(v.dtype).reshape(())
    torch.save(state, path)
    return {k: v.flatten()[0].item() for k, v in state.items()}


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "vgg16-397923af.pth"
    with torch.device("meta"):
        net = vgg16(weights=None)  # only the keys and shapes are needed
    return path, torchvision_format_file(path, net)


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "resnet50-0676ba61.pth"
    with torch.device("meta"):
        net = resnet50(weights=None)
    return path, torchvision_format_file(path, net)


def backbone(spec):
    return registry("backbone").build(spec)


def test_vgg16_pretrained_from_local_file(vgg_file):
    path, values = vgg_file
    b = backbone({"type": "vgg16", "pretrained": str(path)})
    assert b.features[0].weight.unique().tolist() == pytest.approx([values["features.0.weight"]])
    assert b.features[28].bias.unique().tolist() == pytest.approx([values["features.28.bias"]])
    tail = b.roi_tail()
    assert tail.roi_size == 7 and tail.out_features == 4096
    assert tail.module[0].weight[0, :3].tolist() == pytest.approx([values["classifier.0.weight"]] * 3)
    assert tail.module[2].bias[:2].tolist() == pytest.approx([values["classifier.3.bias"]] * 2)
    assert len(b.features) == 30 and not isinstance(b.features[-1], nn.MaxPool2d)


def test_resnet50_pretrained_from_local_file_both_layouts(resnet_file):
    path, values = resnet_file
    for layout in ({}, {"stride_in_1x1": True, "maxpool_ceil_mode": True, "maxpool_padding": 0}):
        b = backbone({"type": "resnet50", "pretrained": str(path), **layout})
        assert b.features[0].weight.unique().tolist() == pytest.approx([values["conv1.weight"]])
        assert b.features[6][5].bn3.running_var.unique().tolist() == pytest.approx([values["layer3.5.bn3.running_var"]])
        layer4 = b.roi_tail().module[0]
        assert layer4[2].conv3.weight.unique().tolist() == pytest.approx([values["layer4.2.conv3.weight"]])


def test_pretrained_true_uses_torch_hub_cache(tmp_path, monkeypatch, resnet_file, offline_hub):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # offline_hub: a missing file is fetched through torch.hub, stubbed, never downloaded
    with pytest.raises(ConfigError) as err:
        backbone({"type": "resnet50", "pretrained": True})
    msg = str(err.value)
    assert "\n" not in msg and "model.backbone.pretrained" in msg and "resnet50-0676ba61.pth" in msg
    assert "download" in msg
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "resnet50-0676ba61.pth").write_bytes(resnet_file[0].read_bytes())
    b = backbone({"type": "resnet50", "pretrained": True})
    assert b.features[0].weight.unique().tolist() == pytest.approx([resnet_file[1]["conv1.weight"]])


def test_missing_pretrained_file_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        backbone({"type": "vgg16", "pretrained": str(tmp_path / "nope.pth")})
    msg = str(err.value)
    assert "\n" not in msg and "nope.pth" in msg and "vgg16-397923af.pth" in msg


def test_wrong_weights_file_lists_keys(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "extra.weight": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError) as err:
        backbone({"type": "resnet50", "pretrained": str(bad)})
    assert "missing keys" in str(err.value) and "extra.weight" in str(err.value)


def test_vgg16_freeze_stages_first_two_blocks():
    with torch.device("meta"):  # no weights needed to check requires_grad
        b = backbone({"type": "vgg16", "freeze_stages": 2})
    assert not any(p.requires_grad for p in b.features[:10].parameters())
    assert all(p.requires_grad for p in b.features[10:].parameters())
    assert all(p.requires_grad for p in b.roi_tail().module.parameters())


def test_resnet50_freeze_stages_and_persistent_freeze_bn():
    with torch.device("meta"):
        b = backbone({"type": "resnet50", "freeze_stages": 2, "freeze_bn": True})
    tail = b.roi_tail().module
    frozen = [b.features[0], b.features[1], b.features[4]]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert b.features[5][0].conv1.weight.requires_grad  # layer2 trains
    assert tail[0][0].conv1.weight.requires_grad  # layer4 convs train
    # The tail belongs to the RoI head in a detector: train() it separately, as a model would.
    b.train()
    tail.train()
    bns = [m for m in list(b.modules()) + list(tail.modules()) if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 53
    assert not any(m.training for m in bns)
    assert not any(p.requires_grad for m in bns for p in m.parameters())
    # Without freeze_bn the BN layers follow train().
    with torch.device("meta"):
        b2 = backbone({"type": "resnet50", "freeze_bn": False}).train()
    assert b2.features[1].training and b2.features[1].weight.requires_grad


def test_freeze_bn_survives_detector_train():
    m = registry("detector").build({"type": "faster_rcnn", "backbone": {"type": "tiny", "freeze_bn": True}},
                                   num_classes=2)
    m.train()
    assert not any(x.training for x in m.modules() if isinstance(x, nn.BatchNorm2d))
    m2 = registry("detector").build({"type": "faster_rcnn", "backbone": "resnet50"}, num_classes=2).train()
    assert not any(x.training for x in m2.modules() if isinstance(x, nn.BatchNorm2d))


def test_resnet_reference_layout_options():
    ref = backbone({"type": "resnet50", "stride_in_1x1": True, "maxpool_ceil_mode": True, "maxpool_padding": 0})
    tv = backbone({"type": "resnet50"})
    assert ref.features[5][0].conv1.stride == (2, 2) and ref.features[5][0].conv2.stride == (1, 1)
    assert tv.features[5][0].conv1.stride == (1, 1) and tv.features[5][0].conv2.stride == (2, 2)
    layer4 = ref.roi_tail().module[0]
    assert layer4[0].conv1.stride == (2, 2)
    # 110 px: conv1 -> 55; max-pool 3x3 s2 p0 ceil -> 27, torchvision's p1 floor -> 28.
    x = torch.zeros(1, 3, 110, 110)
    with torch.no_grad():
        assert ref.features[:4](x).shape[-1] == 27
        assert tv.features[:4](x).shape[-1] == 28


@pytest.mark.parametrize("spec,channels,size", [("vgg16", 512, (5, 7)), ("resnet50", 1024, (5, 7))])
def test_output_shapes_and_tail(spec, channels, size):
    b = backbone(spec).eval()
    with torch.no_grad():
        y = b(torch.rand(1, 3, 80, 112))
        assert y.shape == (1, channels, *size)
        t = b.roi_tail()
        out = t.module(torch.rand(2, channels, t.roi_size, t.roi_size))
    assert out.shape == (2, t.out_features)


@pytest.mark.parametrize("norm", ["frozen_bn", "sync_bn"])
def test_vgg16_bn_pretrained_from_local_file(tmp_path, norm):
    from torchvision.models import vgg16_bn

    path = tmp_path / "vgg16_bn-6c64b313.pth"
    with torch.device("meta"):
        net = vgg16_bn(weights=None)
    values = torchvision_format_file(path, net)
    b = backbone({"type": "vgg16_bn", "pretrained": str(path), "norm": norm})
    assert len(b.features) == 43 and not isinstance(b.features[-1], nn.MaxPool2d)
    assert b.features[0].weight.unique().tolist() == pytest.approx([values["features.0.weight"]])
    # The ImageNet BatchNorm statistics survive, in SyncBatchNorm layers too.
    assert b.features[41].running_var.unique().tolist() == pytest.approx([values["features.41.running_var"]])
    assert isinstance(b.features[41], nn.SyncBatchNorm if norm == "sync_bn" else nn.BatchNorm2d)
    assert b.roi_tail().module[2].bias[:2].tolist() == pytest.approx([values["classifier.3.bias"]] * 2)
    with pytest.raises(ConfigError, match="vgg16_bn"):
        backbone({"type": "vgg16_bn", "pretrained": True, "norm": "gn"})
