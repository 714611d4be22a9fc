"""Time the plain Faster R-CNN training step, then see where its time goes.

For each backbone (random weights, 20 classes, the default configs) and each
precision: ``FasterRCNNTrainer.train_step(images, targets)`` (mixed precision:
the trainer's own ``Amp``) on a batch of ``--batch`` images of ``--size`` x
``--size`` with 5 random boxes each.

1. **Plain step**: the step with nothing attached (no hooks, no FLOP
   counter, no profiler), ``--warmup`` untimed steps on the full batch, then
   ``--reps`` timed ones (device synchronised before and after each).  Prints
   the median and best seconds and the images/s of the median.  This is the
   figure to compare with ``detkit train`` and with other implementations.
2. **Instrumented reps** (``--split``, separate from the plain ones): one
   step under ``FlopCounterMode`` for the FLOPs, then ``--split-reps`` steps
   with module hooks that synchronise the device at each boundary, for the
   per-part split (backbone, neck, RoI head network, RPN convs, the stages'
   target creators and losses, proposals, optimiser).  The hooks slow the step (full backward hooks disable some
   fusion, the syncs stall the GPU), so the split's own total is printed next
   to the plain step and the parts are shown as shares of that total.

A backbone written ``NAME/full-nms`` (e.g. ``resnet50/full-nms``) runs the
RPN's NMS over all pre-NMS boxes of each image, the path before
``nms_first`` (same proposals): the baseline for that change in the same run.

At the end, with several backbones, the ratio of their plain steps, then the
R50-FPN rows: detkit's step against torchvision's own ``fasterrcnn_resnet50_fpn``
on the same batch in the same run (``fpn_vs_torchvision.py``; ``--fpn-size 0``
skips them).

Usage: ``python benchmarks/train_step.py [--backbones vgg16 resnet50] [--size 600]
[--batch 2] [--reps 3] [--precision fp32 amp] [--device cpu|cuda] [--threads N]
[--no-split] [--interleave] [--no-channels-last] [--compile]``.  About 3 minutes on 2 CPU cores
with the defaults.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections import defaultdict
from typing import Any, Callable

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


def make_step(trainer: Any) -> Callable[..., Any]:
    """``step(images, targets)``: the trainer's train_step (its own Amp: mixed precision set when built)."""
    return lambda images, targets: trainer.train_step(images, targets)


class StepTimeline:
    """Wall-clock time of the pieces of a training step, from hooks on the detector's modules that sync the device.

    Forward of a module: forward pre-hook -> forward hook; a part made of
    several modules (the RoI head's network: pooler, box head, predictors;
    the RPN's convs) adds theirs up.  The target creators and losses are the
    stages' own (``rpn.anchor_target``, ``roi_head.proposal_target``,
    ``rpn.loc_loss`` ...).  Backward of the RoI head: the first backward
    pre-hook of its predictors -> the pooler's backward hook.  Backward of the
    backbone (and neck): its backward pre-hook -> the optimiser's step
    pre-hook.  Used only in the separate instrumented reps: the hooks change
    what they measure.  (Modules whose outputs are dicts of levels, e.g. an
    FPN, get no backward hook call: their backward parts stay empty.)
    """

    def __init__(self, model: nn.Module, trainer: Any, device: torch.device):
        self.device = device
        self.times: dict[str, float] = defaultdict(float)
        self._start: dict[str, float] = {}
        self.handles = []
        rpn, head = model.rpn, model.roi_head
        timed_forward: dict[str, list[nn.Module]] = {
            "backbone_fwd": [model.backbone],
            "head_fwd": [head.pooler, head.box_head, head.cls_loc, head.score],
            "rpn_net_fwd": [rpn.conv1, rpn.score, rpn.loc],
            "proposal_creator": [rpn.proposal_creator],
            "anchor_target": [rpn.anchor_target],
            "proposal_target": [head.proposal_target],
            "rpn_loc_loss": [rpn.loc_loss],
            "rpn_cls_loss": [rpn.cls_loss],
            "roi_loc_loss": [head.loc_loss],
            "roi_cls_loss": [head.cls_loss],
        }
        if model.neck is not None:
            timed_forward["neck_fwd"] = [model.neck]
        for name, modules in timed_forward.items():
            for module in modules:
                if isinstance(module, nn.Module):
                    self.handles.append(module.register_forward_pre_hook(self._begin(name)))
                    self.handles.append(module.register_forward_hook(self._end(name)))
        for predictor in (head.cls_loc, head.score):  # whichever gets its gradient first starts the head's backward
            self.handles.append(predictor.register_full_backward_pre_hook(self._begin("head_bwd", first=True)))
        self.handles.append(head.pooler.register_full_backward_hook(self._end("head_bwd")))
        trunk = model.neck if model.neck is not None else model.backbone
        self.handles.append(trunk.register_full_backward_pre_hook(self._begin("backbone_bwd")))
        opt = trainer.optimizer
        self.handles.append(opt.register_step_pre_hook(self._end("backbone_bwd")))
        self.handles.append(opt.register_step_pre_hook(self._begin("optimizer_step")))
        self.handles.append(opt.register_step_post_hook(self._end("optimizer_step")))

    def _now(self) -> float:
        sync(self.device)
        return time.perf_counter()

    def _begin(self, name: str, first: bool = False) -> Callable:
        def hook(*args):
            if not (first and name in self._start):
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


def unfold_batchnorm(model: nn.Module) -> None:
    """Undo ``fold_batchnorm``: BatchNorm as its own pass again (the layout before issue 8's fix)."""
    for m in model.modules():
        cls = type(m).__name__
        if cls == "_BNFoldedConv2d":
            m.__class__ = nn.Conv2d
        elif cls == "_FoldedBatchNorm2d":
            m.__class__ = nn.BatchNorm2d


def build(
    name: str, device: torch.device, channels_last: bool, compile_: bool, fold_bn: bool = True, amp: bool = False
) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    model = registry("detector").build(
        {"type": "faster_rcnn", "backbone": {"type": name}, "channels_last": channels_last}, num_classes=20
    )
    if not fold_bn:
        unfold_batchnorm(model)
    model.to(device).train()
    if compile_:  # in place, as train.compile does: backbone (neck) and the RoI box head
        for module in model.compile_modules():
            module.compile()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    trainer = registry("trainer").build(
        {"type": "faster_rcnn_trainer", "seed": 0}, model=model, optimizer=opt, amp=amp
    )
    return model, trainer


def full_nms(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` with the RPN's NMS over every pre-NMS box (no early stop), for the duration of each call."""
    from torchvision.ops import nms

    from detkit_builtins import rpn

    def run(*args):
        early = rpn.nms_first
        rpn.nms_first = lambda boxes, scores, iou, need: nms(boxes, scores, iou)
        try:
            return step(*args)
        finally:
            rpn.nms_first = early

    return run


def setup(name: str, args: argparse.Namespace, amp: bool, device: torch.device) -> tuple:
    backbone, _, variant = name.partition("/")
    if variant not in ("", "full-nms"):
        raise SystemExit(f"--backbones {name}: the only variant is NAME/full-nms")
    model, trainer = build(backbone, device, args.channels_last, args.compile, args.fold_bn, amp)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, args.size, args.size, generator=g).to(device) for _ in range(args.batch)]
    targets = [
        {"boxes": random_boxes(5, args.size, g).to(device), "labels": torch.randint(0, 20, (5,), generator=g).to(device)}
        for _ in range(args.batch)
    ]
    step = make_step(trainer)
    return model, trainer, full_nms(step) if variant else step, images, targets


def interleaved(args: argparse.Namespace, amp: bool, device: torch.device) -> dict[str, list[float]]:
    """Plain steps of all backbones in turn (A B A B ...): drift in a shared machine's load hits each alike."""
    runs = {name: setup(name, args, amp, device) for name in args.backbones}
    for _ in range(args.warmup):
        for _, _, step, images, targets in runs.values():
            step(images, targets)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, (_, _, step, images, targets) in runs.items():
            sync(device)
            t = time.perf_counter()
            step(images, targets)
            sync(device)
            times[name].append(time.perf_counter() - t)
    return times


def bench(name: str, args: argparse.Namespace, amp: bool, device: torch.device) -> dict:
    model, trainer, step, images, targets = setup(name, args, amp, device)

    for _ in range(args.warmup):  # allocator, cudnn autotuning, lazy init, compilation
        step(images, targets)
    sync(device)
    plain = []
    for _ in range(args.reps):
        sync(device)
        t = time.perf_counter()
        step(images, targets)
        sync(device)
        plain.append(time.perf_counter() - t)
    out: dict[str, Any] = {"plain": plain}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            step(images, targets)
            sync(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"--- profile of one {name} step ({'amp' if amp else 'fp32'}), top ops by {key}")
        print(prof.key_averages().table(sort_by=key, row_limit=args.profile))
    if not args.split:
        return out

    counter = FlopCounterMode(display=False)
    with counter:
        step(images, targets)
    out["flops"] = counter.get_total_flops()
    timeline = StepTimeline(model, trainer, device)
    split_steps, parts = [], []
    for _ in range(args.split_reps):
        timeline.reset()
        sync(device)
        t = time.perf_counter()
        step(images, targets)
        sync(device)
        split_steps.append(time.perf_counter() - t)
        parts.append(dict(timeline.times))
    timeline.remove()
    best = min(range(len(split_steps)), key=lambda i: split_steps[i])
    out["split_step"], out["parts"] = split_steps[best], parts[best]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="*", default=["vgg16", "resnet50"])
    parser.add_argument("--size", type=int, default=600)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3, help="timed plain steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed full steps first")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "amp"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--no-split", dest="split", action="store_false", help="skip the instrumented reps")
    parser.add_argument("--split-reps", type=int, default=1)
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone and the RoI tail")
    parser.add_argument("--interleave", action="store_true",
                        help="plain steps only, backbones alternating rep by rep (fairer ratios on a busy machine)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the top N ops of one profiled step")
    parser.add_argument("--fpn-size", type=int, default=512, help="R50-FPN rows vs torchvision: input size (0: skip)")
    parser.add_argument("--no-fold-bn", dest="fold_bn", action="store_false",
                        help="ResNet: BatchNorm as a separate pass (before the fold)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        dev = torch.cuda.get_device_name(device)
    else:
        dev = platform.processor() or platform.machine()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {dev}, device {device}, {torch.get_num_threads()} threads, "
        f"load {load:.2f}; batch {args.batch} at {args.size}x{args.size}, channels_last {args.channels_last}, "
        f"cudnn.benchmark {args.cudnn_benchmark if device.type == 'cuda' else '-'}, compile {args.compile}, "
        f"fold_bn {args.fold_bn}"
    )
    summary: list[tuple[str, str, float]] = []
    for precision in args.precision:
        if args.interleave:
            times = interleaved(args, precision == "amp", device)
            for name, plain in times.items():
                med = statistics.median(plain)
                summary.append((name, precision, med))
                print(f"\n{name} {precision} (interleaved): plain step median {med:.3f} s, best {min(plain):.3f} s "
                      f"(reps: {', '.join(f'{t:.3f}' for t in plain)})")
            names = list(times)
            for first, second in zip(names, names[1:]):
                a, b = times[first], times[second]
                print(f"  per-rep ratio {second} / {first}: " + ", ".join(f"{y / x:.2f}" for x, y in zip(a, b)))
            continue
        for name in args.backbones:
            r = bench(name, args, precision == "amp", device)
            med = statistics.median(r["plain"])
            summary.append((name, precision, med))
            print(
                f"\n{name} {precision}: plain step median {med:.3f} s, best {min(r['plain']):.3f} s "
                f"= {args.batch / med:.1f} images/s (reps: {', '.join(f'{s:.3f}' for s in r['plain'])})"
            )
            if "parts" not in r:
                continue
            p, total = r["parts"], r["split_step"]
            print(
                f"  FLOPs {r['flops'] / 1e12:.3f} TFLOP -> {r['flops'] / med / 1e9:.1f} GFLOP/s at the plain step"
            )
            print(f"  instrumented rep (separate; hooks sync the device): {total:.3f} s = {total / med:.2f}x the plain step")
            network = sum(p.get(k, 0.0) for k in ("backbone_fwd", "neck_fwd", "backbone_bwd", "head_fwd", "head_bwd"))
            for key in ("backbone_fwd", "neck_fwd", "backbone_bwd", "head_fwd", "head_bwd", "rpn_net_fwd", "proposal_creator",
                        "anchor_target", "proposal_target", "optimizer_step"):
                if key in p:
                    print(f"    {key:17s} {p[key]:8.3f} s  {100 * p[key] / total:5.1f}%")
            losses = sum(v for k, v in p.items() if k.endswith("_loss"))
            print(f"    {'losses':17s} {losses:8.3f} s  {100 * losses / total:5.1f}%")
            print(f"    outside backbone and head: {100 * (total - network) / total:.1f}% of the instrumented step")
    print("\nsummary (plain step, median):")
    for name, precision, med in summary:
        print(f"  {name:18s} {precision:5s} {med:8.3f} s  {args.batch / med:8.1f} images/s")
    for precision in args.precision:
        by = {n: m for n, pr, m in summary if pr == precision}
        for a, b in (("vgg16", "resnet50"), ("vgg16/full-nms", "resnet50/full-nms"), ("vgg16", "vgg16/full-nms"),
                     ("resnet50", "resnet50/full-nms")):
            if a in by and b in by:
                print(f"  {precision}: {b} / {a} step time = {by[b] / by[a]:.2f}x")
    if args.fpn_size:
        # R50-FPN beside torchvision's own fasterrcnn_resnet50_fpn: same weights, batch and boxes (fp32).
        from fpn_vs_torchvision import report, train_step as fpn_train_step

        times = fpn_train_step(args.fpn_size, args.batch, max(args.reps, 2), device)
        print(f"\nR50-FPN train step, batch {args.batch} at {args.fpn_size}x{args.fpn_size}, fp32:")
        print("\n".join(report("train step", times, args.batch)))


if __name__ == "__main__":
    main()
