"""Data-parallel training throughput: one process against DistributedDataParallel.

Each run builds the config's detector and trainer (random weights) in every
process, makes ``--warmup + --steps`` batches of ``data.batch_size`` images per
process from the config's training set (each process its own images), and
times the training steps (``trainer.train_step(images, targets)``: forward,
backward, all-reduce, optimizer step) after the warm-up.  Runs, all in this
invocation:

* ``plain``: one process, the trainer itself (the baseline);
* ``ddp x1``: one process through the DDP wrapper ``detkit train`` uses under
  torchrun, put at ``trainer.module`` as ``DistributedHook`` does (its
  overhead: bucketing, the all-reduce of a world of one);
* ``ddp xN``: N processes (``--procs``), gloo on the CPU, NCCL on CUDA.

Prints, per run: processes, milliseconds per step (the slowest process),
images/s over all processes, and the ratio to ``plain``.  On the CPU the
threads (``--threads``, default all cores) are split evenly between the
processes, so ``ddp x2`` uses the same cores as ``plain``.  On CUDA each
process takes its own GPU (``ddp x1`` vs ``plain`` is the per-GPU overhead).

Usage::

    python benchmarks/ddp.py                                   # CPU, quickstart model, 1 and 2 processes
    python benchmarks/ddp.py --device cuda --config configs/frcnn_resnet50.yaml \\
        --set model.backbone.pretrained=false --procs 1        # per-GPU step time with and without DDP
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, ddp: bool, args: argparse.Namespace, port: int, out: str) -> None:
    from detkit.config import load_config
    from detkit.data.collate import collate
    from detkit.data.loader import build_dataset
    from detkit.engine.distributed import DistInfo, wrap_for_training
    from detkit.engine.optim import build_optimizer
    from detkit.registry import registry

    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, args.threads // world))
    info = DistInfo(rank, world, rank)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        # wrap_for_training leaves a world of one unwrapped (nothing to average); here it is the point.
        info = DistInfo(rank, max(world, 2), rank)
    cfg = load_config(args.config, args.set)
    torch.manual_seed(0)
    data = build_dataset(cfg.data, "train", seed=0)
    model = registry("detector").build(cfg.model, num_classes=len(data.classes)).to(device)
    optimizer = build_optimizer(model, cfg.train.optimizer)
    trainer = registry("trainer").build(cfg.train.trainer, model=model, optimizer=optimizer, amp=cfg.train.amp)
    model.train()
    # The forward runs through trainer.module: the detector, or its DDP wrapper (as DistributedHook sets it).
    trainer.module = wrap_for_training(model, info, device) if ddp else model
    b = args.batch_size or cfg.data.batch_size
    n = args.warmup + args.steps
    batches = []
    for k in range(n):
        first = (k * world + rank) * b
        batches.append(collate([data[(first + i) % len(data)] for i in range(b)]).to(device))
    times = []
    for k, batch in enumerate(batches):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        trainer.train_step(batch.images, batch.targets)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k >= args.warmup:
            times.append(time.perf_counter() - t0)
    torch.save({"times": times, "batch": b, "wrapped": type(trainer.module).__name__}, f"{out}/{rank}.pt")
    if ddp:
        dist.destroy_process_group()


def run(name: str, world: int, ddp: bool, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, ddp, args, free_port(), out), nprocs=world, join=True)
        results = [torch.load(f"{out}/{r}.pt") for r in range(world)]
    # A step ends when the slowest process ends it: per step, the max over processes.
    per_step = [max(r["times"][k] for r in results) for k in range(args.steps)]
    step = statistics.median(per_step)
    images = results[0]["batch"] * world
    return {"name": name, "procs": world, "step_ms": step * 1e3, "images_per_s": images / step,
            "wrapped": results[0]["wrapped"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--procs", type=int, nargs="+", default=[2], help="process counts of the DDP runs beyond 1")
    parser.add_argument("--batch-size", type=int, default=None, help="images per process (default data.batch_size)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the processes")
    args = parser.parse_args()
    if args.device == "cuda" and max(args.procs) > torch.cuda.device_count():
        parser.error(f"--procs {max(args.procs)} needs as many GPUs; {torch.cuda.device_count()} visible")

    what = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{platform.processor() or platform.machine()}"
    load = os.getloadavg()
    print(f"{args.config}, {args.device} ({what}, {os.cpu_count()} cores, load {load[0]:.1f}), torch {torch.__version__}, "
          f"{args.steps} timed steps after {args.warmup}")
    runs = [run("plain", 1, False, args), run("ddp x1", 1, True, args)]
    runs += [run(f"ddp x{p}", p, True, args) for p in args.procs if p > 1]
    base = runs[0]
    print(f"{'run':<8} {'procs':>5} {'ms/step':>9} {'images/s':>9} {'vs plain':>9}")
    for r in runs:
        print(f"{r['name']:<8} {r['procs']:>5} {r['step_ms']:>9.1f} {r['images_per_s']:>9.1f} "
              f"{r['images_per_s'] / base['images_per_s']:>8.2f}x")
    overhead = runs[1]["step_ms"] / base["step_ms"] - 1
    print(f"DDP overhead on one {'GPU' if args.device == 'cuda' else 'process'}: {overhead * 100:+.1f}% step time "
          f"(load now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
