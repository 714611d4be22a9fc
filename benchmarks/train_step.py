"""Time one Faster R-CNN training step and see where the time goes.

For each backbone (random weights, 20 classes, the default configs): one
``FasterRCNNTrainer.train_step`` on a batch of ``--batch`` images of
``--size`` x ``--size`` with 5 random boxes each.  Prints

* seconds per step (best of ``--reps``, after a cheap warm-up step),
* FLOPs of the step (``torch.utils.flop_counter.FlopCounterMode``, counted
  during the first timed step), the achieved FLOP/s, and their ratio to the FLOP/s of a
  large ``conv2d`` timed in the same run (how close the step gets to the
  machine's conv speed),
* the share of the step spent outside the backbone and the RoI head (forward
  and backward), timed inside the step with module hooks; the same without
  the RPN's convolutions; and the direct cost of the pieces that are code
  rather than network layers (target creation, proposal creation, losses,
  optimiser step).

and, separately, the time of anchor + proposal target creation for 4 images
with 20 gt boxes each on the anchors of a 600x600 input.

Usage: ``python benchmarks/train_step.py [--backbones vgg16 resnet50] [--size 600]
[--batch 2] [--reps 2] [--device cpu]``.  About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections import defaultdict
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from detkit.registry import registry


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_boxes(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * size * 0.7
    wh = 32 + torch.rand(n, 2, generator=generator) * size * 0.3
    return torch.cat([xy, (xy + wh).clamp(max=size)], dim=1)


def conv_throughput(device: torch.device, reps: int = 3) -> float:
    """FLOP/s of a 3x3, 512 -> 512 conv on a [2, 512, 38, 38] input (VGG conv5 at 600 px)."""
    x = torch.randn(2, 512, 38, 38, device=device)
    conv = nn.Conv2d(512, 512, 3, padding=1).to(device)
    flops = 2 * x.shape[0] * 512 * 512 * 9 * 38 * 38
    best = float("inf")
    with torch.no_grad():
        conv(x)
        for _ in range(reps):
            sync(device)
            t = time.perf_counter()
            conv(x)
            sync(device)
            best = min(best, time.perf_counter() - t)
    return flops / best


class StepTimeline:
    """Wall-clock time of the pieces of a training step, from hooks (CPU: ops are synchronous).

    Forward of a module: forward pre-hook -> forward hook.  Backward of the
    head: backward pre-hook (gradients of its outputs ready) -> backward hook
    (gradient of its input features done).  Backward of the backbone: its
    backward pre-hook -> the optimiser's step pre-hook (nothing runs in
    between: the images need no gradient and no clipping is configured).
    """

    def __init__(self, trainer: nn.Module, device: torch.device):
        self.device = device
        self.times: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}
        self.handles = []
        model = trainer.model
        timed_forward = {
            "backbone_fwd": model.extractor,
            "head_fwd": model.head,
            "proposal_creator": model.rpn.proposal_creator,
            "anchor_target": trainer.anchor_target,
            "proposal_target": trainer.proposal_target,
        }
        for name in ("rpn_loc_loss", "rpn_cls_loss", "roi_loc_loss", "roi_cls_loss"):
            timed_forward[f"loss:{name}"] = getattr(trainer, name)
        for name, module in timed_forward.items():
            self.handles.append(module.register_forward_pre_hook(self._begin(name)))
            self.handles.append(module.register_forward_hook(self._end(name)))
        self.handles.append(model.head.register_full_backward_pre_hook(self._begin("head_bwd")))
        self.handles.append(model.head.register_full_backward_hook(self._end("head_bwd")))
        for conv in (model.rpn.conv1, model.rpn.score, model.rpn.loc):  # the RPN's own layers
            self.handles.append(conv.register_forward_pre_hook(self._begin("rpn_net_fwd")))
            self.handles.append(conv.register_forward_hook(self._end("rpn_net_fwd")))
            self.handles.append(conv.register_full_backward_pre_hook(self._begin("rpn_net_bwd")))
            self.handles.append(conv.register_full_backward_hook(self._end("rpn_net_bwd")))
        self.handles.append(model.extractor.register_full_backward_pre_hook(self._begin("backbone_bwd")))
        opt = trainer.optimizer
        self.handles.append(opt.register_step_pre_hook(self._end("backbone_bwd")))
        self.handles.append(opt.register_step_pre_hook(self._begin("optimizer_step")))
        self.handles.append(opt.register_step_post_hook(self._end("optimizer_step")))

    def _now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def _begin(self, name: str) -> Callable:
        def hook(*args):
            self._start[name] = self._now()

        return hook

    def _end(self, name: str) -> Callable:
        def hook(*args):
            if name in self._start:
                self.times[name] += self._now() - self._start.pop(name)

        return hook

    def reset(self) -> None:
        self.times.clear()
        self._start.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def bench_backbone(name: str, size: int, batch: int, reps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = registry("detector").build({"type": "faster_rcnn", "backbone": {"type": name}}, num_classes=20)
    model.to(device).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    trainer = registry("trainer").build({"type": "faster_rcnn_trainer", "seed": 0}, model=model, optimizer=opt)
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(batch, 3, size, size, generator=g).to(device)
    boxes = [random_boxes(5, size, g).to(device) for _ in range(batch)]
    labels = [torch.randint(0, 20, (5,), generator=g).to(device) for _ in range(batch)]

    # Warm-up (lazy initialisation, allocator) on a small, cheap batch: few RoIs.
    warm = registry("trainer").build(
        {"type": "faster_rcnn_trainer", "proposal_target": {"type": "proposal_target", "n_sample": 8}},
        model=model,
        optimizer=opt,
    )
    warm.train_step(imgs[:1, :, :224, :224], [torch.zeros(0, 4, device=device)], [labels[0][:0]])

    # The first timed step also counts FLOPs: the counter's per-op dispatch
    # costs milliseconds against steps of seconds, and a separate counted
    # step would double the run time.
    timeline = StepTimeline(trainer, device)
    steps, parts, flops = [], [], 0
    for rep in range(reps):
        timeline.reset()
        counter = FlopCounterMode(display=False) if rep == 0 else None
        sync(device)
        t = time.perf_counter()
        if counter is not None:
            with counter:
                trainer.train_step(imgs, boxes, labels)
            flops = counter.get_total_flops()
        else:
            trainer.train_step(imgs, boxes, labels)
        sync(device)
        steps.append(time.perf_counter() - t)
        parts.append(dict(timeline.times))
    timeline.remove()
    best = min(range(reps), key=lambda i: steps[i])
    return {"step_s": steps[best], "all_steps_s": steps, "flops": flops, "parts": parts[best]}


def bench_targets(device: torch.device, reps: int = 10) -> dict:
    """Anchor + proposal target creation: 4 images, 20 gt each, 600x600 anchors, 600 RoIs per image."""
    from detkit_builtins.anchors import AnchorGenerator
    from detkit_builtins.targets import AnchorTargetCreator, ProposalTargetCreator

    n, size = 4, 600
    anchors = AnchorGenerator(16, [0.5, 1.0, 2.0], [8.0, 16.0, 32.0], 16.0, 0.0)(size // 16 + 1, size // 16 + 1, device)
    g = torch.Generator().manual_seed(0)
    gt = [random_boxes(20, size, g).to(device) for _ in range(n)]
    gt_labels = [torch.randint(0, 20, (20,), generator=g).to(device) for _ in range(n)]
    rois = torch.cat([random_boxes(600, size, g) for _ in range(n)]).to(device)
    roi_indices = torch.arange(n).repeat_interleave(600).to(device)
    image_sizes = torch.tensor([[size, size]] * n, device=device)
    atc, ptc = AnchorTargetCreator(), ProposalTargetCreator()
    gen = torch.Generator(device=device).manual_seed(0)
    std = (0.1, 0.1, 0.2, 0.2)
    a_times, p_times = [], []
    for i in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        atc(gt, anchors, image_sizes, generator=gen)
        sync(device)
        t1 = time.perf_counter()
        ptc(rois, roi_indices, gt, gt_labels, std, generator=gen)
        sync(device)
        t2 = time.perf_counter()
        if i:  # first call is a warm-up
            a_times.append(t1 - t0)
            p_times.append(t2 - t1)
    return {
        "anchors": anchors.shape[0],
        "anchor_target_s": statistics.median(a_times),
        "proposal_target_s": statistics.median(p_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="*", default=["vgg16", "resnet50"], help="none: only the conv and target-creation figures")
    parser.add_argument("--size", type=int, default=600)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"device {device}, {torch.get_num_threads()} threads")
    conv = conv_throughput(device)
    print(f"conv2d 3x3 512->512 on [2, 512, 38, 38]: {conv / 1e9:.1f} GFLOP/s")

    t = bench_targets(device)
    total = t["anchor_target_s"] + t["proposal_target_s"]
    print(
        f"target creation, 4 images x 20 gt, {t['anchors']} anchors, 4 x 600 RoIs: "
        f"anchor {t['anchor_target_s'] * 1e3:.1f} ms + proposal {t['proposal_target_s'] * 1e3:.1f} ms "
        f"= {total * 1e3:.1f} ms"
    )

    for name in args.backbones:
        r = bench_backbone(name, args.size, args.batch, args.reps, device)
        p = r["parts"]
        step = r["step_s"]
        network = p["backbone_fwd"] + p["backbone_bwd"] + p["head_fwd"] + p["head_bwd"]
        losses = sum(v for k, v in p.items() if k.startswith("loss:"))
        ours = losses + sum(p.get(k, 0.0) for k in ("anchor_target", "proposal_target", "proposal_creator"))
        optim = p.get("optimizer_step", 0.0)
        achieved = r["flops"] / step
        print(f"\n{name}: train step, batch {args.batch} at {args.size}x{args.size}")
        print(f"  step: {step:.2f} s (all reps: {', '.join(f'{s:.2f}' for s in r['all_steps_s'])})")
        print(
            f"  FLOPs: {r['flops'] / 1e12:.3f} TFLOP -> {achieved / 1e9:.1f} GFLOP/s achieved, "
            f"{achieved / conv:.2f} x the conv2d throughput"
        )
        print(
            f"  backbone fwd {p['backbone_fwd']:.2f} s + bwd {p['backbone_bwd']:.2f} s, "
            f"head fwd {p['head_fwd']:.2f} s + bwd {p['head_bwd']:.2f} s"
        )
        rpn_net = p.get("rpn_net_fwd", 0.0) + p.get("rpn_net_bwd", 0.0)
        print(f"  outside backbone and head: {step - network:.3f} s = {100 * (step - network) / step:.1f}% of the step")
        print(
            f"  RPN convs fwd+bwd {rpn_net:.2f} s; outside all network layers (backbone, RPN convs, head): "
            f"{step - network - rpn_net:.3f} s = {100 * (step - network - rpn_net) / step:.1f}%"
        )
        print(
            f"  target creation: anchor {p.get('anchor_target', 0.0) * 1e3:.1f} ms + proposal "
            f"{p.get('proposal_target', 0.0) * 1e3:.1f} ms; proposal creator (decode + NMS) "
            f"{p.get('proposal_creator', 0.0) * 1e3:.1f} ms; losses {losses * 1e3:.1f} ms "
            f"= {100 * ours / step:.1f}% of the step; optimiser step {optim * 1e3:.1f} ms "
            f"= {100 * optim / step:.1f}%"
        )


if __name__ == "__main__":
    main()
