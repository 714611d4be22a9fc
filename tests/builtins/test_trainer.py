"""The stages' losses on hand-worked cases, and FasterRCNNTrainer: weighted total, SGD, bf16 autocast, clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detkit.amp import Amp
from detkit.errors import ConfigError
from detkit.interfaces import ImageBatch, Proposals, RoITail, ShapeSpec, freeze_batchnorm
from detkit.registry import ComponentValidationError, registry
from detkit_builtins.trainer import FasterRCNNTrainer

COLOURS = torch.tensor([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.2, 0.2, 1.0]])
LOSSES = ["rpn_loc", "rpn_cls", "roi_loc", "roi_cls"]


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def shapes_batch():
    """Two 96x96 images with coloured rectangles on a dark background, and their targets."""
    boxes = [torch.tensor([[8.0, 8, 56, 60], [50, 40, 90, 88]]), torch.tensor([[20.0, 30, 80, 76]])]
    labels = [torch.tensor([0, 2]), torch.tensor([1])]
    images = []
    for b, l in zip(boxes, labels):
        img = torch.full((3, 96, 96), 0.1)
        for (x1, y1, x2, y2), c in zip(b.int().tolist(), l.tolist()):
            img[:, y1:y2, x1:x2] = COLOURS[c][:, None, None]
        images.append(img)
    return images, [{"boxes": b, "labels": l} for b, l in zip(boxes, labels)]


@pytest.fixture
def tiny_detector(tiny_detector_config):
    """``tiny_detector(seed=0, n_anchor=64, n_roi=32, pos_ratio=None)``: the tiny config at 96 px, sampling sizes set."""

    def build(seed: int = 0, n_anchor: int = 64, n_roi: int = 32, pos_ratio: float | None = None):
        cfg = tiny_detector_config(preprocess={"min_size": 96, "max_size": 96})
        cfg["rpn"]["proposal"].update(train_pre_nms=300, train_post_nms=64)
        cfg["rpn"]["anchor_target"] = {"type": "anchor_target", "n_sample": n_anchor}
        cfg["roi_head"]["proposal_target"] = {"type": "proposal_target", "n_sample": n_roi}
        if pos_ratio is not None:
            cfg["roi_head"]["proposal_target"]["pos_ratio"] = pos_ratio
        torch.manual_seed(seed)
        return registry("detector").build(cfg, num_classes=3).train()

    return build


def tiny_trainer(model, optimizer=None, amp=False, **params):
    return registry("trainer").build({"type": "faster_rcnn_trainer", **params}, model=model, optimizer=optimizer,
                                     amp=amp)


def grad_norm(model: nn.Module) -> float:
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return torch.cat(grads).norm().item()


def image_batch(n: int, h: int = 100, w: int = 100) -> ImageBatch:
    sizes = torch.tensor([[h, w]] * n)
    return ImageBatch(torch.zeros(n, 3, h, w), sizes, sizes, torch.ones(n))


A = torch.tensor([[0.0, 0, 20, 20]])
B = torch.tensor([[40.0, 40, 60, 60]])
FAR = torch.tensor([[70.0, 0, 90, 20]])
TARGETS = [{"boxes": A, "labels": torch.tensor([0])}, {"boxes": B, "labels": torch.tensor([1])}]


# --------------------------------------------- the stages' losses by hand
def test_rpn_losses_on_hand_worked_batch():
    """All deltas 1 and all logits 0; anchors a, b, far; image 0's gt is a, image 1's is b."""
    rpn = registry("proposal_generator").build(
        {"type": "rpn", "mid_channels": 1, "anchor": {"scales": [1], "ratios": [1.0]},
         "anchor_target": {"type": "anchor_target", "n_sample": 8}},
        in_channels=1, feat_stride=16,
    ).train()
    with torch.no_grad():
        for layer in (rpn.conv1, rpn.score, rpn.loc):
            layer.weight.zero_()
            layer.bias.zero_()
        rpn.loc.bias.fill_(1.0)
    anchors = torch.cat([A, B, FAR])
    rpn.anchors = lambda *args, **kwargs: anchors  # three anchors, one per cell of a 1 x 3 map
    _, losses = rpn(torch.zeros(2, 1, 1, 3), image_batch(2), TARGETS)
    assert list(losses) == ["rpn_loc", "rpn_cls"]
    # Positive anchors match their gt exactly (target 0), predictions 1.0:
    # smooth L1 (sigma 1) = 4 * (1 - 0.5) = 2 per positive; logits 0 -> CE log 2.
    assert losses["rpn_loc"].item() == pytest.approx(2.0)
    assert losses["rpn_cls"].item() == pytest.approx(math.log(2))
    (losses["rpn_loc"] + losses["rpn_cls"]).backward()
    assert rpn.loc.bias.grad.abs().sum() > 0


def test_roi_head_losses_on_hand_worked_batch():
    """Logits 0; every coordinate of class k's deltas is k; RoIs a, far (image 0) and b, b, far (image 1)."""
    tail = RoITail(nn.Sequential(nn.Flatten(1), nn.Linear(1, 4)), 1, 4)
    head = registry("roi_head").build(
        {"type": "roi_head", "pooler": {"type": "roi_pool"}, "box_head": {"type": "backbone_tail"},
         "proposal_target": {"type": "proposal_target", "n_sample": 8, "pos_ratio": 1.0}},
        num_classes=2, input_shapes={"features": ShapeSpec(1, 16)}, tail=tail,
    ).train()
    with torch.no_grad():
        head.score.weight.zero_()
        head.score.bias.zero_()
        head.cls_loc.weight.zero_()
        head.cls_loc.bias.copy_(torch.arange(3.0).repeat_interleave(4))
    seen = []
    head.pooler.register_forward_hook(lambda m, args, out: seen.append((args[1], args[2])))
    proposals = Proposals(torch.cat([A, FAR, B, B, FAR]), torch.tensor([0, 0, 1, 1, 1]))
    predictions, losses = head(torch.zeros(2, 1, 7, 7), proposals, image_batch(2), TARGETS)
    assert predictions is None and list(losses) == ["roi_loc", "roi_cls"]
    # Foreground RoIs equal their gt (target 0); the prediction picked for label L is
    # L per coordinate: L=1 -> 2.0 per row, L=2 -> 4 * 1.5 = 6.0. Pooled over the
    # batch: (2 rows * 2.0 + 3 rows * 6.0) / 5 (a per-image mean would be 4.0).
    assert losses["roi_loc"].item() == pytest.approx(22 / 5)
    assert losses["roi_cls"].item() == pytest.approx(math.log(3))
    (losses["roi_loc"] + losses["roi_cls"]).backward()
    assert head.cls_loc.bias.grad.abs().sum() > 0
    # The head pooled fixed-size samples: 8 rows per image, in image order.
    (boxes, indices), = seen
    assert boxes.shape == (16, 4) and indices.tolist() == [0] * 8 + [1] * 8


# ------------------------------------------------------------- the trainer
def test_total_is_the_weighted_sum_of_the_models_losses(tiny_detector, shapes_batch):
    images, targets = shapes_batch
    model = tiny_detector()
    model.set_sampling_generator(None)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        plain = tiny_trainer(model).losses(images, targets)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        weighted = tiny_trainer(model, loss_weights={"roi_loc": 2.0, "rpn_cls": 0.0}).losses(images, targets)
    assert list(plain) == LOSSES + ["total"]
    assert plain["total"].item() == pytest.approx(sum(plain[k].item() for k in LOSSES), rel=1e-6)
    for k in LOSSES:
        assert weighted[k].item() == pytest.approx(plain[k].item(), rel=1e-6)
    expected = plain["rpn_loc"] + 2.0 * plain["roi_loc"] + plain["roi_cls"]
    assert weighted["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ConfigError, match="train.trainer.loss_weights: roi_los is not a loss of this model"):
        tiny_trainer(model, loss_weights={"roi_los": 1.0}).losses(images, targets)


def test_train_step_needs_an_optimizer(tiny_detector, shapes_batch):
    trainer = FasterRCNNTrainer(model=tiny_detector())
    with pytest.raises(RuntimeError, match="optimizer"):
        trainer.train_step(*shapes_batch)


def test_params_defaults_and_validation():
    dumped = registry("trainer").validate({"type": "faster_rcnn_trainer"}).to_dict()
    assert dumped["loss_weights"] == {} and dumped["grad_clip"] is None and dumped["seed"] is None
    # The target creators and losses live in the stages now, with the reference defaults.
    rpn = registry("proposal_generator").validate({"type": "rpn"}).to_dict()
    assert rpn["anchor_target"]["type"] == "anchor_target" and rpn["anchor_target"]["n_sample"] == 256
    assert rpn["loc_loss"] == {"type": "smooth_l1", "sigma": 1.0} and rpn["cls_loss"]["type"] == "cross_entropy"
    head = registry("roi_head").validate({"type": "roi_head"}).to_dict()
    assert head["proposal_target"]["n_sample"] == 128
    assert head["cls_loss"] == {"type": "cross_entropy", "ignore_index": -1}
    with pytest.raises(ComponentValidationError, match=r"loc_loss\.type"):
        registry("roi_head").validate({"type": "roi_head", "loc_loss": {"type": "smoth_l1"}})
    with pytest.raises(ComponentValidationError, match=r"proposal_target\.n_sampel"):
        registry("roi_head").validate(
            {"type": "roi_head", "proposal_target": {"type": "proposal_target", "n_sampel": 3}}
        )
    with pytest.raises(ComponentValidationError, match="anchor_target"):  # no longer a trainer field
        registry("trainer").validate({"type": "faster_rcnn_trainer", "anchor_target": {"type": "anchor_target"}})
    with pytest.raises(ComponentValidationError, match="loss_weights"):
        registry("trainer").validate({"type": "faster_rcnn_trainer", "loss_weights": {"roi_loc": -1.0}})


def test_batch_losses_pool_images(tiny_detector, shapes_batch):
    """Two copies of an image give the single image's losses (pooling = mean for equal counts)."""
    images, targets = shapes_batch
    # Samples large enough that nothing is subsampled: no randomness left.
    model = tiny_detector(n_anchor=10000, n_roi=128, pos_ratio=1.0)
    freeze_batchnorm(model, freeze_affine=False)  # BN running stats: images do not see each other
    with torch.no_grad():
        single = model(images[:1], targets[:1])
        double = model(images[:1] * 2, targets[:1] * 2)
    assert single.keys() == double.keys() == set(LOSSES)
    for name in single:
        assert double[name].item() == pytest.approx(single[name].item(), rel=1e-5), name
    assert single["roi_loc"].item() > 0 and single["rpn_loc"].item() > 0


def test_sgd_steps_lower_the_loss(tiny_detector, shapes_batch):
    images, targets = shapes_batch
    model = tiny_detector()
    trainer = tiny_trainer(model, torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9))

    def measured():
        # The same sampling every time (torch's RNG, reseeded) so only the weights differ.
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(123)
            return trainer.losses(images, targets)

    before = measured()
    history = [trainer.train_step(images, targets) for _ in range(20)]
    after = measured()
    assert all(torch.isfinite(l["total"]) for l in history)
    assert after["total"].item() < 0.8 * before["total"].item()
    assert after["rpn_cls"].item() < before["rpn_cls"].item()
    assert after["rpn_loc"].item() < before["rpn_loc"].item()
    assert after["roi_cls"].item() < before["roi_cls"].item()
    for l in history[-1].values():
        assert not l.requires_grad


def test_amp_on_cpu_uses_bf16_autocast(tiny_detector, shapes_batch):
    model = tiny_detector()
    trainer = tiny_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), amp=Amp("cpu", enabled=True))
    seen = []
    model.backbone.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = model.rpn.conv1.weight.detach().clone()
    losses = trainer.train_step(*shapes_batch)
    assert seen == [torch.bfloat16]
    assert all(l.dtype == torch.float32 and torch.isfinite(l) for l in losses.values())
    assert losses["total"].item() > 0
    assert not torch.equal(before, model.rpn.conv1.weight)  # a step was taken
    assert model.rpn.conv1.weight.dtype == torch.float32


@pytest.mark.parametrize("with_scaler", [False, True])
def test_grad_clip_bounds_the_norm(tiny_detector, shapes_batch, with_scaler):
    model = tiny_detector()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: gradients stay inspectable
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tiny_trainer(model, opt).train_step(*shapes_batch)
    unclipped = grad_norm(model)
    clip = unclipped / 10
    # A CPU GradScaler scales the loss by 2**16: clipping must see unscaled gradients.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if with_scaler else None
    clipped = tiny_trainer(model, opt, amp=Amp("cpu", enabled=False, scaler=scaler), grad_clip=clip)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        clipped.train_step(*shapes_batch)
    assert grad_norm(model) == pytest.approx(clip, rel=1e-3)


def test_seeded_trainer_repeats_its_sampling(tiny_detector, shapes_batch):
    """``seed``: the stages draw from the trainer's own generator, so two runs of it take the same steps."""
    runs = []
    for _ in range(2):
        model = tiny_detector()
        trainer = tiny_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), seed=3)
        torch.manual_seed(99 + len(runs))  # the global RNG differs between the runs
        runs.append([trainer.train_step(*shapes_batch)["total"].item() for _ in range(2)])
    assert runs[0] == runs[1]
