"""The training step of two source trees, interleaved in one run: a change measured against its baseline.

Each rep runs one subprocess per (tree, model) that builds the model from the
tree's own config file (random weights), takes ``--warmup`` untimed steps
and ``--steps`` timed ones on the same random batch, and prints seconds per
step, wall clock and process CPU time.  The trees alternate within every rep,
so a shared, noisy machine slows both alike; the ratio after / before is
printed per rep and as the median over reps.

The step is the trainer's ``train_step`` on images already at the network
input size (so the new detector's resize is an identity and both trees do
the same work); the data loader is not timed.  Works with both trainer APIs:
before the one-forward detector contract (``train_step(imgs, boxes,
labels)`` on a padded tensor) and after it (``train_step(images, targets)``).

Usage::

    git worktree add /tmp/before <commit>
    python benchmarks/before_after.py --before /tmp/before [--models vgg16 resnet50 r50_fpn quickstart]
        [--reps 3] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# model name -> (config file, size, batch, classes)
MODELS = {
    "vgg16": ("configs/frcnn_vgg.yaml", 600, 2, 20),
    "resnet50": ("configs/frcnn_resnet50.yaml", 600, 2, 20),
    "r50_fpn": ("configs/frcnn_resnet50_fpn.yaml", 600, 2, 20),
    "quickstart": ("configs/quickstart.yaml", 128, 8, 4),
}


def register_tree_plugins(tree: Path) -> None:
    """Register the tree's own built-in entry points that the installed metadata lacks.

    The venv's metadata lists today's built-ins; an older tree may name components
    that no longer exist (``multiscale_roi_head``), importable from its own modules.
    """
    import importlib
    import tomllib

    from detkit.registry import registry

    groups = tomllib.loads((tree / "pyproject.toml").read_text())["project"]["entry-points"]
    for group, entries in groups.items():
        if not group.startswith("detkit."):
            continue
        reg = registry(group.removeprefix("detkit."))
        for name, target in entries.items():
            if name not in reg:
                module, attr = target.split(":")
                reg.add(name, getattr(importlib.import_module(module), attr))


def worker(name: str, warmup: int, steps: int, threads: int) -> dict[str, float]:
    import torch

    from detkit import interfaces
    from detkit.config import load_config
    from detkit.engine.optim import build_optimizer
    from detkit.registry import build_detector, registry

    torch.set_num_threads(threads)
    register_tree_plugins(Path.cwd())
    path, size, batch, classes = MODELS[name]
    cfg = load_config(path)
    torch.manual_seed(0)
    model = build_detector(cfg.model.to_dict(), classes)
    model.train()
    optimizer = build_optimizer(model, cfg.train.optimizer)
    trainer = registry("trainer").build(cfg.train.trainer, model=model, optimizer=optimizer)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=g)
    boxes, labels = [], []
    for _ in range(batch):
        xy = torch.rand(5, 2, generator=g) * size * 0.6
        wh = size * 0.1 + torch.rand(5, 2, generator=g) * size * 0.3
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=size - 1)], 1))
        labels.append(torch.randint(0, classes, (5,), generator=g))
    if hasattr(interfaces, "ImageBatch"):  # the one-forward contract
        targets = [{"boxes": b, "labels": l} for b, l in zip(boxes, labels)]
        step = lambda: trainer.train_step(list(images), targets)  # noqa: E731
    else:
        step = lambda: trainer.train_step(images, boxes, labels)  # noqa: E731
    for _ in range(warmup):
        step()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return {"wall": (time.perf_counter() - wall0) / steps, "cpu": (time.process_time() - cpu0) / steps}


def run(tree: Path, name: str, args: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=f"{tree}:{tree / 'plugins'}")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--threads", str(args.threads)]
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{tree} {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, help="the baseline source tree (a git worktree)")
    ap.add_argument("--after", type=Path, default=REPO)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.warmup, args.steps, args.threads)))
        return
    if args.before is None:
        ap.error("--before is required")
    print(f"before: {args.before}  after: {args.after}  threads {args.threads}, {args.steps} steps x {args.reps} reps")
    for name in args.models:
        ratios: dict[str, list[float]] = {"wall": [], "cpu": []}
        for rep in range(args.reps):
            order = [("before", args.before), ("after", args.after)]
            if rep % 2:
                order.reverse()  # alternate which tree goes first
            got = {label: run(tree, name, args) for label, tree in order}
            for key in ratios:
                ratios[key].append(got["after"][key] / got["before"][key])
            print(f"{name:10s} rep {rep + 1}: before {got['before']['wall']:.3f} s ({got['before']['cpu']:.3f} cpu)  "
                  f"after {got['after']['wall']:.3f} s ({got['after']['cpu']:.3f} cpu)  "
                  f"after/before wall {ratios['wall'][-1]:.3f}  cpu {ratios['cpu'][-1]:.3f}", flush=True)
        print(f"{name:10s} median after/before: wall {statistics.median(ratios['wall']):.3f}  "
              f"cpu {statistics.median(ratios['cpu']):.3f}", flush=True)


if __name__ == "__main__":
    main()
