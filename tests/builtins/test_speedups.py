"""Speed-ups that must not change results: BatchNorm folded into convolutions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from detkit.registry import registry
from detkit_builtins.backbones.common import _BNFoldedConv2d, _FoldedBatchNorm2d, fold_batchnorm


def unfold(module: nn.Module) -> nn.Module:
    """A copy computing BatchNorm separately again (the reference)."""
    ref = copy.deepcopy(module)
    for m in ref.modules():
        if type(m) is _BNFoldedConv2d:
            m.__class__ = nn.Conv2d
            del m.__dict__["_folded_bn"]
        elif type(m) is _FoldedBatchNorm2d:
            m.__class__ = nn.BatchNorm2d
    return ref


def randomise_bn(module: nn.Module, generator: torch.Generator) -> None:
    """Statistics and affine weights far from the identity, so a skipped BN would show."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=generator))
            m.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def test_fold_links_every_resnet_bn_and_keeps_keys():
    model = registry("detector").build({"type": "faster_rcnn", "backbone": {"type": "resnet50"}}, num_classes=3)
    folded = [m for m in model.modules() if type(m) is _FoldedBatchNorm2d]
    assert len(folded) == 53  # stem + 16 bottlenecks x 3 + 4 downsamples
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert model.state_dict().keys() == unfold(model).state_dict().keys()


@pytest.mark.parametrize("freeze_affine", [True, False])
def test_folded_frozen_bn_gives_the_same_outputs_and_gradients(freeze_affine):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4))
    randomise_bn(net, g)
    assert fold_batchnorm(net) == 2
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
            m.weight.requires_grad_(not freeze_affine)
            m.bias.requires_grad_(not freeze_affine)
    ref = unfold(net)
    x = torch.rand(2, 3, 12, 10, generator=g)
    y, y_ref = net(x), ref(x)
    assert rel(y, y_ref) < 1e-5
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (name, p), p_ref in zip(net.named_parameters(), ref.parameters()):
        if p.requires_grad:
            assert rel(p.grad, p_ref.grad) < 1e-4, name
    # Training-mode BatchNorm (batch statistics) is not folded: it still normalises the batch.
    net.train()
    out = net[:2](x)
    assert out.mean(dim=(0, 2, 3)).sub(net[1].bias).abs().max() < 1e-4


def test_resnet_detector_detections_unchanged_by_folding():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = registry("detector").build(
        {"type": "faster_rcnn", "backbone": {"type": "resnet50"},
         "rpn": {"type": "rpn", "proposal": {"test_post_nms": 16, "train_post_nms": 32}},
         "preprocess": {"min_size": 96, "max_size": 112}},
        num_classes=3,
    )
    randomise_bn(model, g)
    ref = unfold(model)
    image = torch.rand(3, 96, 112, generator=g)
    model.eval(), ref.eval()
    with torch.no_grad(), model.detection_settings(score_thresh=0.0), ref.detection_settings(score_thresh=0.0):
        out, out_ref = model([image]), ref([image])
    assert out[0]["boxes"].shape[0] > 0
    assert torch.equal(out[0]["labels"], out_ref[0]["labels"])
    # float32 rounding through 50 layers with far-from-identity BatchNorms: ~1e-4
    assert rel(out[0]["boxes"], out_ref[0]["boxes"]) < 1e-3
    assert rel(out[0]["scores"], out_ref[0]["scores"]) < 1e-3


def test_nms_per_image_keeps_what_one_batched_call_keeps():
    from torchvision.ops import batched_nms

    from detkit_builtins.ops import group_and_cap, nms_per_image

    g = torch.Generator().manual_seed(0)
    n, k, levels = 3, 200, 2
    xy = torch.rand(n, k, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + 8 + torch.rand(n, k, 2, generator=g) * 30], dim=-1)
    scores = torch.rand(n, k, generator=g)
    groups = torch.arange(n).unsqueeze(1) * levels + torch.randint(0, levels, (n, k), generator=g)
    groups[:, ::7] = n * levels  # one shared group for every image's too-small boxes, as in the RPN
    one = batched_nms(boxes.reshape(-1, 4), scores.reshape(-1), groups.reshape(-1), 0.5)
    per = nms_per_image(boxes, scores, groups, 0.5)
    assert 0 < per.numel() < n * k
    # The RPN keeps each image's own boxes, in image then score order, at most post_nms each.
    images = torch.div(groups.reshape(-1), levels, rounding_mode="floor")
    kept_one, img_one, _ = group_and_cap(one, images, n + 1, 50)
    kept_per, img_per, _ = group_and_cap(per, images, n + 1, 50)
    assert torch.equal(kept_one[img_one < n], kept_per[img_per < n])
    assert (img_per < n).sum() > 50


# (area the boxes' corners spread over, spread of their sides): little overlap stops after the
# first pass; more overlap needs a second, larger pass; heavy overlap runs on to all boxes.
@pytest.mark.parametrize("spread, sides, passes", [(400.0, 20.0, [400]), (30.0, 3.0, [400, 1600]),
                                                   (20.0, 4.0, [400, 1600, 3000])])
def test_nms_first_keeps_the_full_runs_best(spread, sides, passes, monkeypatch):
    import torchvision

    from detkit_builtins import ops

    g = torch.Generator().manual_seed(1)
    k, need = 3000, 200
    xy = torch.rand(k, 2, generator=g) * spread
    boxes = torch.cat([xy, xy + 10 + torch.rand(k, 2, generator=g) * sides], dim=1)
    scores = torch.rand(k, generator=g).sort(descending=True).values  # best first, as the RPN's top k
    full = torchvision.ops.nms(boxes, scores, 0.7)
    sizes = []
    monkeypatch.setattr(ops, "nms", lambda b, s, t: sizes.append(b.shape[0]) or torchvision.ops.nms(b, s, t))
    keep = ops.nms_first(boxes, scores, 0.7, need)
    assert sizes == passes
    assert keep.shape[0] >= min(need, full.shape[0])
    assert torch.equal(keep[:need], full[:need])


def test_proposals_of_one_map_equal_the_plain_nms_path(monkeypatch):
    """The RPN's early-stopping NMS (one map) gives the proposals of one full NMS per image."""
    from detkit_builtins.rpn import ProposalCreator, ProposalParams

    g = torch.Generator().manual_seed(2)
    n, a = 2, 2000
    centres = torch.rand(a, 2, generator=g) * 300
    anchors = torch.cat([centres - 16, centres + 16], dim=1)
    locs = torch.randn(n, a, 4, generator=g) * 0.2
    scores = torch.rand(n, a, generator=g)
    sizes = torch.tensor([[320, 320], [300, 260]])
    for before_topk in (True, False):
        creator = ProposalCreator(ProposalParams(train_pre_nms=1500, train_post_nms=100, min_size=20.0,
                                                 min_size_before_topk=before_topk)).train()
        fast = creator(locs, scores, anchors, sizes)
        monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)  # export's plain path
        plain = creator(locs, scores, anchors, sizes)
        monkeypatch.undo()
        assert fast[0].shape[0] == 2 * 100
        assert torch.equal(fast[0], plain[0]) and torch.equal(fast[1], plain[1])
