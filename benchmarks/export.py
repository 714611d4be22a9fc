"""``predict`` images/s on the CPU: PyTorch against the exported ONNX file in ONNX Runtime.

For each backbone (random weights, 20 classes, the detector's defaults: short
side resized to 600 px, long side at most 1000, 300 test proposals), the same
uint8 375x500 image (a VOC-sized photo shape, resized to 600x800 inside both)
goes through

* ``model.predict([image])`` in PyTorch (``torch.inference_mode``, the
  model's channels-last layout), and
* the file written by ``detkit export --format onnx`` in ONNX Runtime's CPU
  provider (graph optimisations on, ``--threads`` intra-op threads, as torch),

which both include the resize, normalisation, RPN, RoI head, decoding and
NMS.  Prints seconds per image (median of ``--reps`` after a warm-up; the
two runtimes alternate so that both see the same machine load), images/s and
the ONNX Runtime / PyTorch speed ratio.  The outputs are compared with
``predict`` first (1 px, 1e-3) and the result printed.  With random weights
VGG16 leaves no detection above the 0.5 threshold, while ResNet50's
un-normalised activations saturate the class softmax (many detections at
exactly 1.0, where the tie order decides which survive): the timings are of
the full pipeline all the same, but the check is only meaningful in the tests
(tests/export), which use weights without such ties.

Usage: ``python benchmarks/export.py [--backbones vgg16 resnet50] [--reps 5]
[--threads 2]``.  Needs the export extra; a few minutes on 2 cores (VGG16's
ONNX file is 0.5 GB, written to a temporary folder).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from detkit.export import compare_detections, example_image, export_model, load_exported
from detkit.registry import registry


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=["vgg16", "resnet50"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--width", type=int, default=500)
    args = parser.parse_args()

    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads; load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    image = example_image(args.height, args.width, seed=0)
    options = {"sess_options": ort.SessionOptions()}
    options["sess_options"].intra_op_num_threads = args.threads
    options["sess_options"].inter_op_num_threads = 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backbones:
            torch.manual_seed(0)
            model = registry("detector").build({"type": "faster_rcnn", "backbone": {"type": name}}, num_classes=20)
            model.eval()
            path = export_model(model, Path(tmp) / f"{name}.onnx", "onnx")
            run = load_exported(path, **options)
            array = image.numpy()
            expected = model.predict([image])[0]  # warm-up of both, and the check
            problem = compare_detections(run(array), expected)
            top = expected["scores"]
            ties = int((top == top.max()).sum()) if len(top) else 0
            check = "match predict" if problem is None else f"differ from predict ({problem})"
            if problem is not None and ties > 1:
                # Random weights can saturate the softmax: many detections score exactly 1.0,
                # and which of them survive NMS and the cap of 100 depends on the tie order.
                check += f"; {ties} detections tie at score {float(top.max()):.6f}, so the kept set is order-dependent"
            torch_times, ort_times = [], []
            for _ in range(args.reps):  # alternate: both runtimes see the same load
                torch_times.append(median_time(lambda: model.predict([image]), 1))
                ort_times.append(median_time(lambda: run(array), 1))
            t_torch, t_ort = statistics.median(torch_times), statistics.median(ort_times)
            rows.append((name, t_torch, t_ort, len(expected["scores"])))
            size_mb = path.stat().st_size / 2**20
            path.unlink()
            print(f"  {name}: exported {size_mb:.0f} MB, {len(expected['scores'])} detections {check}")
    print(f"\n{'backbone':<10} {'PyTorch s/img':>14} {'img/s':>7} {'ORT s/img':>10} {'img/s':>7} {'ORT/PyTorch':>12}")
    for name, t_torch, t_ort, _ in rows:
        print(f"{name:<10} {t_torch:>14.3f} {1 / t_torch:>7.2f} {t_ort:>10.3f} {1 / t_ort:>7.2f} "
              f"{t_torch / t_ort:>11.2f}x")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
