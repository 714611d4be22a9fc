"""Inference time of Faster R-CNN per 600x600 image, against this machine's conv speed.

For each backbone (random weights, 20 classes, eval mode, ``torch.inference_mode``):
``model([image])`` on one 600x600 image, ``model.preprocess`` set to that size
so nothing is resized (the whole pipeline: normalisation, backbone, RPN +
proposals, RoI head on the test-time 300 RoIs, decoding, per-class NMS).  Prints

* seconds per image (best of ``--reps`` after a warm-up; the model's default
  channels-last layout),
* FLOPs of one inference (``torch.utils.flop_counter.FlopCounterMode``),
* the FLOP/s of a large ``conv2d`` timed in the same run (3x3, 512 -> 512 on a
  ``[1, 512, 64, 64]`` input, best of NCHW and channels-last, re-timed beside
  each model: the machine's practical peak for these layers),
* achieved / peak FLOP/s and time / compute floor (floor = FLOPs / peak),
* a per-stage split, timed apart from the plain figure, each stage called on
  its own as the forward chains them: ``model.preprocess([image])`` (pre),
  ``model.features(batch.tensor)`` (backbone, with the neck if any),
  ``model.rpn(features, batch)`` (RPN incl. proposals),
  ``model.roi_head(features, proposals, batch)`` (RoI head) and
  ``model.postprocess(predictions, batch)`` (post).

Random weights make every RoI a weak detection below the 0.5 threshold, so
the post-processing here is the cheap path; it is timed separately with a
threshold of 0 (``model.detection_settings(score_thresh=0.0)``) in the
"post (thr 0)" column to show its worst case.

Then the R50-FPN rows: detkit's R50-FPN against torchvision's own
``fasterrcnn_resnet50_fpn`` on the same input in the same run (see
``fpn_vs_torchvision.py``; ``--fpn-size 0`` skips them).

Usage: ``python benchmarks/inference.py [--backbones vgg16 resnet50] [--reps 3]
[--size 600] [--device cpu] [--threads N] [--fpn-size 512] [--fpn-batch 2]``.  About 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from detkit.registry import registry


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    fn()  # warm-up: allocator, kernels, anchor cache
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


@torch.inference_mode()
def conv_throughput(device: torch.device, reps: int) -> float:
    """FLOP/s of a 3x3 512 -> 512 conv on ``[1, 512, 64, 64]`` (2 FLOPs per multiply-add).

    The better of the NCHW and channels-last layouts: the machine's practical peak.
    """
    flops = 2 * 512 * 512 * 9 * 64 * 64
    best = 0.0
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(1, 512, 64, 64, device=device).contiguous(memory_format=fmt)
        conv = nn.Conv2d(512, 512, 3, padding=1).to(device).eval().to(memory_format=fmt)
        best = max(best, flops / best_time(lambda: conv(x), device, reps))
    return best


def count_flops(fn: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


@torch.inference_mode()
def stage_times(model, image: torch.Tensor, device: torch.device, reps: int) -> dict[str, float]:
    """Seconds of each stage of one inference, each timed on its own (the forward's stages, called one by one)."""
    batch, _ = model.preprocess([image])
    feats = model.features(batch.tensor)
    proposals, _ = model.rpn(feats, batch)
    preds, _ = model.roi_head(feats, proposals, batch)

    def post(thresh: float):
        def run():
            with model.detection_settings(score_thresh=thresh):
                return model.postprocess(preds, batch)

        return run

    return {
        "pre": best_time(lambda: model.preprocess([image]), device, reps),
        "backbone": best_time(lambda: model.features(batch.tensor), device, reps),
        "rpn": best_time(lambda: model.rpn(feats, batch), device, reps),
        "head": best_time(lambda: model.roi_head(feats, proposals, batch), device, reps),
        "post": best_time(post(model.score_thresh), device, reps),
        "post0": best_time(post(0.0), device, reps),
        "rois": float(proposals.boxes.shape[0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["vgg16", "resnet50"])
    parser.add_argument("--size", type=int, default=600)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--fpn-size", type=int, default=512, help="R50-FPN rows: input size (0: skip them)")
    parser.add_argument("--fpn-batch", type=int, default=2, help="R50-FPN rows: images per call")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"device: {where}; torch {torch.__version__}; input {args.size}x{args.size}; best of {args.reps}")
    # The conv reference is re-timed beside every model and the best figure kept,
    # so that both see the same machine load (other processes may be running).
    peak = conv_throughput(device, args.reps)

    header = (f"{'backbone':<10}{'s/img':>8}{'GFLOP':>8}{'GFLOP/s':>9}{'of peak':>9}{'t/floor':>9}"
              f"{'pre':>7}{'backbone':>10}{'rpn':>7}{'head':>7}{'post':>7}{'post(thr 0)':>12}{'RoIs':>6}")
    results = []
    for name in args.backbones:
        torch.manual_seed(0)  # same random weights (hence RoI count) whatever ran before
        # The input size set in model.preprocess (the one place it lives), so a --size image is not resized.
        model = registry("detector").build(
            {"type": "faster_rcnn", "backbone": {"type": name},
             "preprocess": {"min_size": args.size, "max_size": args.size}},
            num_classes=20,
        )
        model.to(device).eval()
        image = torch.rand(3, args.size, args.size, device=device)

        def infer():
            return model([image])

        with torch.inference_mode():
            seconds = best_time(infer, device, args.reps)
            peak = max(peak, conv_throughput(device, args.reps))
            flops = count_flops(infer)
        stages = stage_times(model, image, device, 1)
        results.append((name, seconds, flops, stages))
        del model
    print(f"measured conv2d throughput (3x3 512->512, 64x64, best in the run): {peak / 1e9:.1f} GFLOP/s")
    rows = []
    for name, seconds, flops, stages in results:
        achieved = flops / seconds
        floor = flops / peak
        rows.append(
            f"{name:<10}{seconds:>8.3f}{flops / 1e9:>8.1f}{achieved / 1e9:>9.1f}{achieved / peak:>9.2f}"
            f"{seconds / floor:>9.2f}{stages['pre']:>7.3f}{stages['backbone']:>10.3f}{stages['rpn']:>7.3f}{stages['head']:>7.3f}"
            f"{stages['post']:>7.3f}{stages['post0']:>12.3f}{int(stages['rois']):>6}"
        )
    print(header)
    for row in rows:
        print(row)
    print("stage columns: seconds of each stage timed on its own; t/floor = time / (FLOPs / conv throughput)")
    if args.fpn_size:
        # R50-FPN beside torchvision's own fasterrcnn_resnet50_fpn, same weights and input.
        from fpn_vs_torchvision import inference as fpn_inference, report

        times = fpn_inference(args.fpn_size, args.fpn_batch, max(args.reps, 2), device)
        print(f"\nR50-FPN, {args.fpn_batch} images {args.fpn_size}x{args.fpn_size} per call (model.eval()(images) on both):")
        print("\n".join(report("inference", times, args.fpn_batch)))


if __name__ == "__main__":
    main()
