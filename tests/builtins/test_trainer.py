"""FasterRCNNTrainer: loss definitions, SGD on a tiny detector, bf16 autocast, clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from detkit.interfaces import Detector, RPNOutput
from detkit.registry import ComponentValidationError, registry
from detkit.amp import Amp
from detkit_builtins.trainer import FasterRCNNTrainer

COLOURS = torch.tensor([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.2, 0.2, 1.0]])


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def shapes_batch():
    """Two 96x96 images with coloured rectangles on a dark background."""
    boxes = [torch.tensor([[8.0, 8, 56, 60], [50, 40, 90, 88]]), torch.tensor([[20.0, 30, 80, 76]])]
    labels = [torch.tensor([0, 2]), torch.tensor([1])]
    imgs = torch.full((2, 3, 96, 96), 0.1)
    for i, (b, l) in enumerate(zip(boxes, labels)):
        for (x1, y1, x2, y2), c in zip(b.int().tolist(), l.tolist()):
            imgs[i, :, y1:y2, x1:x2] = COLOURS[c][:, None, None]
    return imgs, boxes, labels


def tiny_detector(seed: int = 0):
    torch.manual_seed(seed)
    return registry("detector").build(
        {
            "type": "faster_rcnn",
            "backbone": {"type": "tiny", "channels": [8, 16, 32, 64], "tail_features": 64},
            "rpn": {
                "type": "rpn",
                "mid_channels": 64,
                "proposal": {"train_pre_nms": 300, "train_post_nms": 64, "test_pre_nms": 300, "test_post_nms": 64},
            },
        },
        num_classes=3,
    )


def tiny_trainer(model, optimizer=None, **params):
    spec = {
        "type": "faster_rcnn_trainer",
        "anchor_target": {"type": "anchor_target", "n_sample": 64},
        "proposal_target": {"type": "proposal_target", "n_sample": 32},
        "seed": 0,
        **params,
    }
    return registry("trainer").build(spec, model=model, optimizer=optimizer)


def grad_norm(model: nn.Module) -> float:
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return torch.cat(grads).norm().item()


# ------------------------------------------- loss definitions on a stub model
class StubDetector(Detector):
    """Fixed RPN/head outputs, so every loss can be worked out by hand.

    RPN: all deltas 1.0 and all logits 0; anchors/RoIs given. Head: logits 0,
    and every coordinate of class ``k``'s deltas equals ``k``.
    """

    def __init__(self, anchors, rois, roi_indices, num_classes=2):
        super().__init__()
        self.num_classes = num_classes
        self.loc_normalize_std = (0.1, 0.1, 0.2, 0.2)
        self.w = nn.Parameter(torch.ones(()))
        self._anchors, self._rois, self._roi_indices = anchors, rois, roi_indices
        self.head_rois = None

    def forward(self, x, mode="forward", **kw):
        if mode == "extractor":
            return x
        if mode == "rpn":
            n, a = x.shape[0], self._anchors.shape[0]
            locs = self.w * torch.ones(n, a, 4)
            scores = self.w * torch.zeros(n, a, 2)
            return RPNOutput(locs, scores, self._rois, self._roi_indices, self._anchors)
        if mode == "head":
            r = kw["rois"].shape[0]
            self.head_rois = (kw["rois"], kw["roi_indices"])
            per_class = torch.arange(self.num_classes + 1.0).repeat_interleave(4)
            return self.w * per_class.expand(r, -1), self.w * torch.zeros(r, self.num_classes + 1)
        raise ValueError(mode)

    def predict(self, images, **kw):
        raise NotImplementedError


def test_losses_on_hand_worked_batch():
    a = torch.tensor([[0.0, 0, 20, 20]])
    b = torch.tensor([[40.0, 40, 60, 60]])
    far = torch.tensor([[70.0, 0, 90, 20]])
    anchors = torch.cat([a, b, far])
    # image 0: rois a, far; image 1: rois b, b, far (3 foreground incl. its gt)
    rois = torch.cat([a, far, b, b, far])
    roi_indices = torch.tensor([0, 0, 1, 1, 1])
    model = StubDetector(anchors, rois, roi_indices)
    trainer = FasterRCNNTrainer(
        model,
        anchor_target={"type": "anchor_target", "n_sample": 8},
        proposal_target={"type": "proposal_target", "n_sample": 8, "pos_ratio": 1.0},
        seed=0,
    )
    imgs = torch.zeros(2, 3, 100, 100)
    losses = trainer(imgs, [a, b], [torch.tensor([0]), torch.tensor([1])])
    assert list(losses) == ["rpn_loc", "rpn_cls", "roi_loc", "roi_cls", "total"]
    # RPN: positive anchors match their gt exactly (target 0), predictions 1.0:
    # smooth L1 (sigma 1) = 4 * (1 - 0.5) = 2 per positive; logits 0 -> CE log 2.
    assert losses["rpn_loc"].item() == pytest.approx(2.0)
    assert losses["rpn_cls"].item() == pytest.approx(math.log(2))
    # Head: foreground RoIs equal their gt (target 0); the prediction picked for
    # label L is L per coordinate: L=1 -> 2.0 per row, L=2 -> 4 * 1.5 = 6.0.
    # Pooled over the batch: (2 rows * 2.0 + 3 rows * 6.0) / 5 (a per-image mean would be 4.0).
    assert losses["roi_loc"].item() == pytest.approx(22 / 5)
    assert losses["roi_cls"].item() == pytest.approx(math.log(3))
    assert losses["total"].item() == pytest.approx(2.0 + math.log(2) + 22 / 5 + math.log(3))
    losses["total"].backward()
    assert model.w.grad is not None and model.w.grad.item() != 0
    # The head saw fixed-size samples: 8 rows per image, in image order.
    sample_rois, sample_indices = model.head_rois
    assert sample_rois.shape == (16, 4) and sample_indices.tolist() == [0] * 8 + [1] * 8


def test_train_step_needs_an_optimizer():
    model = StubDetector(torch.tensor([[0.0, 0, 10, 10]]), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    trainer = FasterRCNNTrainer(model)
    with pytest.raises(RuntimeError, match="optimizer"):
        trainer.train_step(torch.zeros(1, 3, 16, 16), [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.int64)])


def test_params_defaults_and_validation():
    spec = registry("trainer").validate({"type": "faster_rcnn_trainer"})
    dumped = spec.to_dict()
    assert dumped["anchor_target"]["type"] == "anchor_target"
    assert dumped["anchor_target"]["n_sample"] == 256
    assert dumped["proposal_target"]["n_sample"] == 128
    assert dumped["rpn_loc_loss"] == {"type": "smooth_l1", "sigma": 1.0}
    assert dumped["roi_cls_loss"] == {"type": "cross_entropy", "ignore_index": -1}
    assert dumped["grad_clip"] is None and dumped["seed"] is None
    with pytest.raises(ComponentValidationError, match=r"rpn_loc_loss\.type"):
        registry("trainer").validate({"type": "faster_rcnn_trainer", "rpn_loc_loss": {"type": "smoth_l1"}})
    with pytest.raises(ComponentValidationError, match=r"proposal_target\.n_sampel"):
        registry("trainer").validate(
            {"type": "faster_rcnn_trainer", "proposal_target": {"type": "proposal_target", "n_sampel": 3}}
        )


# ------------------------------------------------------ the real tiny model
def test_batch_losses_pool_images(shapes_batch):
    """Two copies of an image give the single image's losses (pooling = mean for equal counts)."""
    imgs, boxes, labels = shapes_batch
    model = tiny_detector().eval()  # BN running stats: images do not see each other
    # Samples large enough that nothing is subsampled: no randomness left.
    trainer = tiny_trainer(
        model,
        anchor_target={"type": "anchor_target", "n_sample": 10000},
        proposal_target={"type": "proposal_target", "n_sample": 128, "pos_ratio": 1.0},
    )
    with torch.no_grad():
        single = trainer(imgs[:1], boxes[:1], labels[:1])
        double = trainer(imgs[:1].repeat(2, 1, 1, 1), boxes[:1] * 2, labels[:1] * 2)
    assert single.keys() == double.keys()
    for name in single:
        assert double[name].item() == pytest.approx(single[name].item(), rel=1e-5), name
    assert single["roi_loc"].item() > 0 and single["rpn_loc"].item() > 0


def test_sgd_steps_lower_the_loss(shapes_batch):
    imgs, boxes, labels = shapes_batch
    model = tiny_detector()
    trainer = tiny_trainer(model, torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)).train()

    def measured():
        # Same sampling every time (a fresh seeded trainer) so only the weights differ.
        with torch.no_grad():
            return tiny_trainer(model, seed=123)(imgs, boxes, labels)

    before = measured()
    history = [trainer.train_step(imgs, boxes, labels) for _ in range(20)]
    after = measured()
    assert all(torch.isfinite(l["total"]) for l in history)
    assert after["total"].item() < 0.8 * before["total"].item()
    assert after["rpn_cls"].item() < before["rpn_cls"].item()
    assert after["rpn_loc"].item() < before["rpn_loc"].item()
    assert after["roi_cls"].item() < before["roi_cls"].item()
    for l in history[-1].values():
        assert not l.requires_grad


def test_amp_on_cpu_uses_bf16_autocast(shapes_batch):
    imgs, boxes, labels = shapes_batch
    model = tiny_detector()
    trainer = tiny_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01)).train()
    seen = []
    model.extractor.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    before = model.rpn.conv1.weight.detach().clone()
    losses = trainer.train_step(imgs, boxes, labels, amp=Amp("cpu", enabled=True))
    assert seen == [torch.bfloat16]
    assert all(l.dtype == torch.float32 and torch.isfinite(l) for l in losses.values())
    assert losses["total"].item() > 0
    assert not torch.equal(before, model.rpn.conv1.weight)  # a step was taken
    assert model.rpn.conv1.weight.dtype == torch.float32


@pytest.mark.parametrize("with_scaler", [False, True])
def test_grad_clip_bounds_the_norm(shapes_batch, with_scaler):
    imgs, boxes, labels = shapes_batch
    model = tiny_detector()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: gradients stay inspectable
    free = tiny_trainer(model, opt).train()
    free.train_step(imgs, boxes, labels)
    unclipped = grad_norm(model)
    clip = unclipped / 10
    clipped = tiny_trainer(model, opt, grad_clip=clip).train()
    # A CPU GradScaler scales the loss by 2**16: clipping must see unscaled gradients.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if with_scaler else None
    clipped.train_step(imgs, boxes, labels, amp=Amp("cpu", enabled=False, scaler=scaler))
    assert grad_norm(model) == pytest.approx(clip, rel=1e-3)
