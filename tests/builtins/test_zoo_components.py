"""The parts torchvision's fasterrcnn_resnet50_fpn_v2 needs, as components any config can use:
fpn ``norm``, rpn ``conv_depth`` and the ``conv_fc`` box head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detkit.interfaces import ShapeSpec
from detkit.registry import registry

SHAPES = {"C2": ShapeSpec(8, 4), "C3": ShapeSpec(16, 8)}


def fpn(**params):
    return registry("neck").build({"type": "fpn", "out_channels": 16, **params}, input_shapes=SHAPES)


def test_fpn_without_norm_keeps_its_keys_and_with_norm_puts_it_after_each_conv():
    assert set(fpn().state_dict()) == {f"{b}.{i}.0.{p}" for b in ("inner_blocks", "layer_blocks")
                                      for i in (0, 1) for p in ("weight", "bias")}
    keys = set(fpn(norm="bn").state_dict())
    assert "inner_blocks.0.0.bias" not in keys  # the norm's shift replaces the conv bias
    assert {"inner_blocks.1.0.weight", "inner_blocks.1.1.running_var", "layer_blocks.0.1.weight"} <= keys
    assert isinstance(fpn(norm="gn").layer_blocks[0][1], nn.GroupNorm)


def test_fpn_norm_is_applied_in_eval_and_frozen_bn_stays_frozen_through_train():
    x = {"C2": torch.rand(2, 8, 16, 16), "C3": torch.rand(2, 16, 8, 8)}
    neck = fpn(norm="bn").eval()
    with torch.no_grad():
        for m in neck.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
        out = neck(x)["P2"]
        lateral = neck.inner_blocks[0][1]  # the conv's output through its BatchNorm, by hand
        conv = nn.functional.conv2d(x["C2"], neck.inner_blocks[0][0].weight)
        top = nn.functional.conv2d(x["C3"], neck.inner_blocks[1][0].weight)
        bn = lambda t, m: (t - m.running_mean[:, None, None]) / torch.sqrt(m.running_var[:, None, None] + m.eps) \
            * m.weight[:, None, None] + m.bias[:, None, None]  # noqa: E731
        merged = bn(conv, lateral) + nn.functional.interpolate(bn(top, neck.inner_blocks[1][1]), size=(16, 16))
        expected = bn(nn.functional.conv2d(merged, neck.layer_blocks[0][0].weight, padding=1), neck.layer_blocks[0][1])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)

    frozen = fpn(norm="frozen_bn").train()
    norms = [m for m in frozen.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 4 and not any(m.training for m in norms)
    assert not any(p.requires_grad for m in norms for p in m.parameters())
    assert all(m.training for m in fpn(norm="bn").train().modules() if isinstance(m, nn.BatchNorm2d))


def rpn(**params):
    spec = {"type": "rpn", "mid_channels": 8, "anchor": {"sizes": [[16], [32]]}, **params}
    return registry("proposal_generator").build(spec, in_channels=16, feat_stride=[4, 8])


def test_rpn_conv_depth_one_keeps_the_old_keys_and_more_convs_follow_as_conv2():
    assert {k.split(".")[0] for k in rpn().state_dict()} == {"conv1", "score", "loc"}
    deep = rpn(conv_depth=2)
    assert deep.conv2.in_channels == deep.conv2.out_channels == 8
    assert {k.split(".")[0] for k in deep.state_dict()} == {"conv1", "conv2", "score", "loc"}
    x = torch.rand(1, 16, 8, 8)
    with torch.no_grad():
        deep.loc.bias.normal_()
        locs, _ = deep._head(x)
        deep.conv2.weight.zero_()
        deep.conv2.bias.fill_(-1.0)  # conv2 + ReLU now gives zeros: only the 1x1 conv's bias is left
        flat, _ = deep._head(x)
    assert not torch.equal(locs, flat)
    torch.testing.assert_close(flat, deep.loc.bias.reshape(3, 4).repeat(64, 1)[None], rtol=0, atol=0)


def box_head(**params):
    return registry("box_head").build({"type": "conv_fc", **params}, in_channels=16, roi_size=7)


def test_conv_fc_head_is_numbered_as_torchvisions_and_gives_fc_features():
    head = box_head(conv_channels=8, fc_dims=[32, 24])
    keys = set(head.state_dict())
    assert {"0.0.weight", "0.1.running_mean", "3.1.weight", "5.weight", "7.weight", "7.bias"} <= keys
    assert "0.0.bias" not in keys and head.out_features == 24
    out = head(torch.rand(5, 16, 7, 7))
    assert out.shape == (5, 24) and (out >= 0).all()
    plain = box_head(num_convs=2, conv_channels=8, norm="none")
    assert {"0.0.bias", "1.0.bias", "3.weight"} <= set(plain.state_dict())
    assert plain(torch.rand(2, 16, 7, 7)).shape == (2, 1024)


@pytest.mark.parametrize("norm, training", [("bn", True), ("frozen_bn", False)])
def test_conv_fc_head_norm_learns_or_stays_frozen(norm, training):
    head = box_head(num_convs=1, conv_channels=8, fc_dims=[16], norm=norm).train()
    bn = head.get_submodule("0.1")
    before = bn.running_mean.clone()
    head(torch.rand(4, 16, 7, 7) + 1)
    assert bn.training is training and (not torch.equal(bn.running_mean, before)) is training
    assert bn.weight.requires_grad is training
