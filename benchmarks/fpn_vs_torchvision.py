"""Faster R-CNN R50-FPN: detkit against torchvision's own ``fasterrcnn_resnet50_fpn``, in one run.

Both models carry the same random weights (torchvision's, imported with the
torchvision import config's layout, so any difference is code, not weights)
and get the same input: ``--batch`` images of ``--size`` x ``--size`` (min_size =
max_size = size on both sides, so neither resizes), 5 boxes each for training.

* inference: ``model.eval()(images)`` on both (detkit's forward includes its
  preprocessing, as torchvision's does): normalisation, padding, backbone +
  FPN, RPN with 1000 proposals per image, RoI head, post-processing;
* train step: ``FasterRCNNTrainer.train_step(images, targets)`` vs torchvision's
  ``sum(model(images, targets).values()).backward(); optimizer.step()``, SGD,
  torchvision's sampling (RPN 256 at 0.5 positive, RoI 512 at 0.25: the
  detector's ``roi_head.proposal_target``).

Prints best and median wall seconds of ``--reps`` runs after a warm-up, the
runs of the two interleaved so both see the same machine load, the median
process CPU seconds, and the ratios torchvision / detkit (> 1: detkit is
faster).  Imported by
``inference.py`` and ``train_step.py`` for their R50-FPN rows; also runs alone:
``python benchmarks/fpn_vs_torchvision.py [--size 512] [--batch 2] [--reps 3] [--device cpu]``.

``--models NAME,...`` (or ``all``) times torchvision's detection zoo instead:
inference on one ``--image`` H x W picture per call, each model at its own
input size (both sides resize it as the model's builder says: 800/1333 for the
ResNet50 models and ``mobilenet_v3_large_fpn``, 320/640 for ``_320_fpn``), the
runs of every model and both implementations interleaved in one loop.  A
model detkit cannot build here (no import config yet, or its import fails) is
skipped with one line saying why.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _paired(fns: dict[str, Callable[[], object]], device: torch.device, reps: int, warmup: int = 1):
    """Wall and process-CPU seconds of each function, the runs interleaved (a, b, a, b, ...).

    Interleaving gives both the same machine load on average; the process CPU
    time (all threads of this process) is less sensitive to other processes than
    the wall clock, so both are reported.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            c, t = time.process_time(), time.perf_counter()
            fn()
            _sync(device)
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {"wall": wall, "cpu": cpu}


def freeze_body_bn(tv: torch.nn.Module) -> None:
    """torchvision with weights uses FrozenBatchNorm2d in the backbone body; do the same here
    (weights=None gives trainable BatchNorm everywhere, which no detection recipe uses)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    def freeze(module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, torch.nn.BatchNorm2d):
                f = FrozenBatchNorm2d(child.num_features, eps=child.eps)
                f.weight.copy_(child.weight.detach())
                f.bias.copy_(child.bias.detach())
                f.running_mean.copy_(child.running_mean)
                f.running_var.copy_(child.running_var)
                setattr(module, name, f)
            else:
                freeze(child)

    freeze(tv.backbone.body)


def build_pair(size: int, device: torch.device, num_classes: int = 90):
    """``(detkit model, torchvision model)`` with the same weights, neither resizing a ``size`` input."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    from detkit.config import load_config
    from detkit.registry import build_detector

    torch.manual_seed(0)
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes + 1,
                                 min_size=size, max_size=size)
    freeze_body_bn(tv)
    for name, p in tv.backbone.body.named_parameters():
        if not name.startswith(("layer2", "layer3", "layer4")):
            p.requires_grad_(False)
    overrides = [f"model.preprocess.min_size={size}", f"model.preprocess.max_size={size}"]
    cfg = load_config(REPO / "configs" / "import" / "torchvision_fasterrcnn_resnet50_fpn.yaml", overrides)
    model = cfg.to_dict()["model"]
    # torchvision's RoI sampling (512 per image, a quarter positive); the RPN's default is already its 256 at 0.5.
    model["roi_head"]["proposal_target"] = {"type": "proposal_target", "n_sample": 512, "pos_ratio": 0.25}
    dk = build_detector(model, num_classes)
    dk.import_state_dict(tv.state_dict(), source="torchvision")
    return dk.to(device), tv.to(device)


def images_and_targets(batch: int, size: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g).to(device) for _ in range(batch)]
    boxes, labels = [], []
    for _ in range(batch):
        xy = torch.rand(5, 2, generator=g) * size * 0.6
        wh = 32 + torch.rand(5, 2, generator=g) * size * 0.35
        boxes.append(torch.cat([xy, (xy + wh).clamp(max=size)], dim=1).to(device))
        labels.append(torch.randint(0, 20, (5,), generator=g).to(device))
    return images, boxes, labels


def inference(size: int, batch: int, reps: int, device: torch.device) -> dict:
    dk, tv = build_pair(size, device)
    dk.eval(), tv.eval()
    images, _, _ = images_and_targets(batch, size, device)
    with torch.inference_mode():
        return _paired({"detkit": lambda: dk(images), "torchvision": lambda: tv(images)}, device, reps)


def train_step(size: int, batch: int, reps: int, device: torch.device) -> dict:
    from detkit.registry import registry

    dk, tv = build_pair(size, device)
    images, boxes, labels = images_and_targets(batch, size, device)
    params = [p for p in dk.parameters() if p.requires_grad]
    trainer = registry("trainer").build(
        {"type": "faster_rcnn_trainer"}, model=dk, optimizer=torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    )
    dk.train()
    tv.train()
    opt = torch.optim.SGD([p for p in tv.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    targets = [{"boxes": b, "labels": l + 1} for b, l in zip(boxes, labels)]  # torchvision: 0 is background
    dk_targets = [{"boxes": b, "labels": l} for b, l in zip(boxes, labels)]

    def tv_step():
        opt.zero_grad(set_to_none=True)
        losses = tv(images, targets)
        sum(losses.values()).backward()
        opt.step()

    return _paired({"detkit": lambda: trainer.train_step(images, dk_targets), "torchvision": tv_step}, device, reps)


ZOO = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
       "fasterrcnn_mobilenet_v3_large_320_fpn")


def build_zoo_pair(name: str, device: torch.device, num_classes: int = 90):
    """``(detkit, torchvision)`` for torchvision's ``name`` at its own sizes, same random weights.

    Raises when detkit cannot build or import it (the caller skips the model).
    """
    from torchvision.models import detection

    from detkit.config import load_config
    from detkit.engine.import_weights import default_import_config
    from detkit.registry import build_detector

    config = default_import_config(source="torchvision", model=name)  # a ConfigError for a model detkit lacks
    torch.manual_seed(0)
    tv = getattr(detection, name)(weights=None, weights_backbone=None, num_classes=num_classes + 1)
    freeze_body_bn(tv)
    dk = build_detector(load_config(config).to_dict()["model"], num_classes)
    dk.import_state_dict(tv.state_dict(), source="torchvision", new_classes=False)
    return dk.to(device).eval(), tv.to(device).eval()


def zoo_inference(names: list[str], image_hw: tuple[int, int], reps: int, device: torch.device):
    """``({name: times}, skipped lines)``: per-image inference of each model, all runs interleaved."""
    fns, skipped, inputs = {}, [], {}
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, *image_hw, generator=g).to(device)
    for name in names:
        try:
            dk, tv = build_zoo_pair(name, device)
        except Exception as exc:  # noqa: BLE001 - reported as one line, the other models still run
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            skipped.append(f"skip {name}: detkit cannot build it here ({reason})")
            continue
        inputs[name] = dk.preprocess.output_size(*image_hw)
        fns[f"{name}|detkit"] = lambda dk=dk: dk([image])
        fns[f"{name}|torchvision"] = lambda tv=tv: tv([image])
    if not fns:
        return {}, skipped, inputs
    with torch.inference_mode():
        times = _paired(fns, device, reps)
    per_model = {}
    for name in inputs:
        per_model[name] = {kind: {impl: times[kind][f"{name}|{impl}"] for impl in ("detkit", "torchvision")}
                           for kind in ("wall", "cpu")}
    return per_model, skipped, inputs


def report(title: str, times: dict, batch: int) -> list[str]:
    wall, cpu = times["wall"], times["cpu"]
    lines = [f"{title}: {'':<14}{'best s':>8}{'median s':>10}{'img/s':>8}{'CPU s':>8}"]
    for name, ts in wall.items():
        med = statistics.median(ts)
        lines.append(f"{'':<{len(title) + 2}}{name:<14}{min(ts):>8.3f}{med:>10.3f}{batch / med:>8.2f}"
                     f"{statistics.median(cpu[name]):>8.2f}")
    for label, d in (("wall, median", wall), ("process CPU, median", cpu)):
        ratio = statistics.median(d["torchvision"]) / statistics.median(d["detkit"])
        lines.append(f"{'':<{len(title) + 2}}torchvision / detkit ({label}): {ratio:.2f}x "
                     f"({'detkit faster' if ratio >= 1 else 'detkit SLOWER'})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=["inference", "train"], default=None)
    parser.add_argument("--models", default=None,
                        help=f"comma-separated torchvision models, or all ({', '.join(ZOO)}): time the zoo instead")
    parser.add_argument("--image", type=int, nargs=2, default=[480, 640], metavar=("H", "W"),
                        help="--models: the picture both implementations resize to each model's input size")
    args = parser.parse_args()
    device = torch.device(args.device)
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if args.models is not None:
        names = list(ZOO) if args.models == "all" else [n.strip() for n in args.models.split(",") if n.strip()]
        print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, load {load:.2f}; "
              f"one {args.image[0]}x{args.image[1]} image per call, {args.reps} interleaved reps")
        per_model, skipped, inputs = zoo_inference(names, tuple(args.image), args.reps, device)
        for line in skipped:
            print(line)
        for name, times in per_model.items():
            h, w = inputs[name]
            print("\n".join(report(f"{name} at {h}x{w}", times, 1)))
        return
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, load {load:.2f}; "
          f"R50-FPN, batch {args.batch} at {args.size}x{args.size}, {args.reps} reps")
    if args.only in (None, "inference"):
        print("\n".join(report("inference", inference(args.size, args.batch, args.reps, device), args.batch)))
    if args.only in (None, "train"):
        print("\n".join(report("train step", train_step(args.size, args.batch, args.reps, device), args.batch)))


if __name__ == "__main__":
    main()
