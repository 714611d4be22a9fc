"""`detkit train` end to end against its own bare training step, in one run.

On one VOC-layout set of photo-like JPEGs of varied sizes (see
``photo_voc.py``; generated under ``--root`` if missing), at the same batch
size, resolution, backbone and precision:

1. **bare step**: batches taken from the same loader settings (grouped by
   aspect ratio; each image at its own size, resized and padded by the
   detector's preprocessing), moved to the device before timing; then
   ``--steps`` calls of ``trainer.train_step(batch.images, batch.targets)``
   cycling over them (the trainer built as ``detkit train`` builds it, with
   ``amp``), timed with the device synchronised at the ends.  Images/s.
2. **loop**: ``detkit train`` (the CLI, in a subprocess) with
   ``data.num_workers = --workers``, evaluation off, checkpoints at the end
   only.  Images/s is the mean of the ``images_per_s`` of the metrics
   records after the first (warm-up) window: wall time of whole logging
   windows, loader waits included; also the mean over the last epoch, when
   ``cudnn.benchmark`` has met most batch shapes (each new shape is tuned
   once, which a short run does not amortise).

Prints both and the ratio loop / step.  The machine's load average is
printed at the start and end.

Usage: ``python benchmarks/train_loop.py [--device cuda] [--backbone vgg16] [--amp]
[--batch 8] [--size 600] [--workers 8] [--images 400] [--epochs 2] [--steps 30] [--root DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photo_voc import CLASSES, make_photo_voc  # noqa: E402


def config(args: argparse.Namespace, root: Path) -> dict:
    return {
        "name": "bench_loop",
        "model": {"type": "faster_rcnn", "backbone": {"type": args.backbone},
                  "preprocess": {"min_size": args.size, "max_size": args.max_size}},
        "data": {
            "train": {"type": "voc", "root": str(root), "split": "train", "classes": CLASSES},
            "batch_size": args.batch, "num_workers": args.workers,
            "transforms": {"hflip": 0.5},  # augmentation only: the size is model.preprocess's
        },
        # last.pt at the end only: a 1 GB VGG16 checkpoint per tiny epoch would dominate the timing.
        "train": {"epochs": args.epochs, "device": args.device, "amp": args.amp, "log_interval": args.log_interval,
                  "checkpoint_interval": 10_000,
                  "optimizer": {"type": "sgd", "lr": 1e-3, "momentum": 0.9}, "compile": args.compile},
        "eval": {"interval": 0},
    }


def load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step(cfg_dict: dict, args: argparse.Namespace) -> float:
    from detkit.config import validate
    from detkit.data.loader import build_dataset, build_loader
    from detkit.engine.optim import build_optimizer
    from detkit.registry import registry

    cfg = validate(cfg_dict)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_set = build_dataset(cfg.data, "train", seed=0)
    loader = build_loader(train_set, batch_size=args.batch, shuffle=True, num_workers=min(args.workers, 4), seed=0,
                          drop_last=True)
    batches = []
    for batch in loader:
        batches.append(batch.to(device))
        if len(batches) == args.batches:
            break
    torch.manual_seed(0)
    model = registry("detector").build(cfg.model, num_classes=len(CLASSES)).to(device).train()
    if args.compile:  # in place, as train.compile does
        for module in model.compile_modules():
            module.compile()
    trainer = registry("trainer").build(
        cfg.train.trainer, model=model, optimizer=build_optimizer(model, cfg.train.optimizer), amp=args.amp
    )

    def step(b):
        return trainer.train_step(b.images, b.targets)

    for b in batches:  # warm-up: every batch shape once (cudnn.benchmark tunes per shape)
        step(b)
    sync(device)
    t = time.perf_counter()
    for k in range(args.steps):
        step(batches[k % len(batches)])
    sync(device)
    return args.steps * args.batch / (time.perf_counter() - t)


def loop(cfg_dict: dict, args: argparse.Namespace, work: Path) -> tuple[float, float, list[float], float]:
    cfg_path = work / "loop.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    out = work / "run"
    cmd = [sys.executable, "-c", "from detkit.cli import main; main()", "train", str(cfg_path), "--out", str(out),
           "--overwrite"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"detkit train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("type") == "train"]
    rates = [r["images_per_s"] for r in records]
    last = [r["images_per_s"] for r in records if r["epoch"] == records[-1]["epoch"]]
    return statistics.mean(rates[1:] or rates), statistics.mean(last[1:] or last), rates, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backbone", default="vgg16")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=600)
    p.add_argument("--max-size", type=int, default=1000)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--steps", type=int, default=30, help="timed bare steps")
    p.add_argument("--batches", type=int, default=12, help="distinct batches the bare step cycles over")
    p.add_argument("--root", type=Path, default=None, help="VOC directory (generated there if missing)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="detkit_loop_"))
    root = args.root or work / "voc"
    if not (root / "ImageSets" / "Main" / "train.txt").is_file():
        t = time.perf_counter()
        make_photo_voc(root, args.images)
        print(f"generated {args.images} photo-like JPEGs in {time.perf_counter() - t:.1f} s under {root}")
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
          + f", {os.cpu_count()} CPUs, load {load()}; {args.backbone}, amp {args.amp}, compile {args.compile}, "
          f"batch {args.batch}, short side {args.size}, loop workers {args.workers}")
    cfg_dict = config(args, root)
    step_rate = bare_step(cfg_dict, args)
    print(f"bare train_step: {step_rate:.3g} images/s", flush=True)
    loop_rate, last_rate, rates, wall = loop(cfg_dict, args, work)
    print(f"detkit train loop: {loop_rate:.3g} images/s over all windows after the first, {last_rate:.3g} in the "
          f"last epoch (windows: {', '.join(f'{r:.3g}' for r in rates)}; {wall:.0f} s wall with start-up)")
    print(f"loop / step = {loop_rate / step_rate:.2f} (all windows), {last_rate / step_rate:.2f} (last epoch: "
          f"batch shapes seen before, cudnn tuned); load at the end {load()}")


if __name__ == "__main__":
    main()
