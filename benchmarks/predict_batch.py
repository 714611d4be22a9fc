"""``Predictor.predict`` on a list: one image per forward against batches.

For each ``--configs`` entry (random weights, the config's model with
``model.preprocess`` at ``--size``), ``--images`` random uint8 images are
predicted in one call with ``batch_size=1`` and with ``batch_size=--batch``.
The two settings alternate, ``--reps`` rounds after one warm-up round of each,
so a load change on a shared machine hits both alike.  Printed per config:
seconds per call (median and best) for each setting, the speed-up of the
medians, and the largest difference between the two settings' detections: a box to
its nearest box of the other setting (detections whose scores tie to float
rounding may swap places) and the scores, rank by rank (the API's promise:
batched detections equal one-image calls up to float rounding).

``--mixed`` makes the images of three sizes (a folder of photos of mixed
orientation): the API batches only images of one padded input size, so the
passes are fewer and smaller.

Usage: ``python benchmarks/predict_batch.py [--configs configs/quickstart.yaml
configs/frcnn_resnet50_fpn.yaml] [--size 320] [--images 20] [--batch 8]
[--reps 3] [--mixed] [--device cpu] [--threads N]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def build(config: str, size: int, device: torch.device):
    from detkit.api import Predictor
    from detkit.config import load_config
    from detkit.registry import registry

    cfg = load_config(config, [f"model.preprocess.min_size={size}", f"model.preprocess.max_size={size}"]).to_dict()
    if "pretrained" in cfg["model"]["backbone"]:
        cfg["model"]["backbone"]["pretrained"] = False  # random weights: no download
    torch.manual_seed(0)
    module = registry("detector").build(cfg["model"], num_classes=20).to(device).eval()
    return Predictor(module, [f"c{k}" for k in range(20)], cfg, device)


def images(n: int, size: int, mixed: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(size, size * 4 // 3), (size * 4 // 3, size), (size, size)] if mixed else [(size, size * 4 // 3)]
    return [torch.randint(0, 256, (3, *shapes[i % len(shapes)]), dtype=torch.uint8, generator=g) for i in range(n)]


def timed(model, ims, batch_size: int, device: torch.device) -> tuple[float, list]:
    t = time.perf_counter()
    # score 0: every RoI is a detection, so the comparison below has something to compare
    out = model.predict(ims, score_thresh=0.0, batch_size=batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+",
                    default=[str(REPO / "configs/quickstart.yaml"), str(REPO / "configs/frcnn_resnet50_fpn.yaml")])
    ap.add_argument("--size", type=int, default=320, help="network input side (quickstart keeps its 128)")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mixed", action="store_true", help="images of three sizes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}, load average {os.getloadavg()[0]:.2f}")
    print(f"{'config':28} {'size':>5} {'images':>6}  {'b=1 med':>8} {'b=1 min':>8}  "
          f"{'b=' + str(args.batch) + ' med':>8} {'min':>8}  {'speed-up':>8}  {'max |dbox|':>10} {'max |dscore|':>12}")
    for config in args.configs:
        size = 128 if Path(config).name == "quickstart.yaml" else args.size
        model = build(config, size, device)
        ims = images(args.images, size, args.mixed)
        timed(model, ims, 1, device), timed(model, ims, args.batch, device)  # warm-up
        times: dict[int, list[float]] = {1: [], args.batch: []}
        outs = {}
        for _ in range(args.reps):
            for b in (1, args.batch):
                t, outs[b] = timed(model, ims, b, device)
                times[b].append(t)
        one, many = outs[1], outs[args.batch]
        assert all(len(a) == len(b) for a, b in zip(one, many)), "batched detections differ in count"
        assert sum(len(a) for a in one) > 0, "nothing detected: the comparison compared nothing"
        # Detections whose scores tie to rounding may swap places: match each to its nearest.
        dbox = max(float(torch.cdist(a.boxes, b.boxes, p=float("inf")).min(1).values.max())
                   for a, b in zip(one, many) if len(a))
        dscore = max(float((a.scores - b.scores).abs().max()) for a, b in zip(one, many) if len(a))
        m1, mb = statistics.median(times[1]), statistics.median(times[args.batch])
        print(f"{Path(config).name:28} {size:5d} {args.images:6d}  {m1:8.2f} {min(times[1]):8.2f}  "
              f"{mb:8.2f} {min(times[args.batch]):8.2f}  {m1 / mb:7.2f}x  {dbox:10.2e} {dscore:12.2e}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
