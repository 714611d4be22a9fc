"""Inference images/s on the CPU: the detector's eval forward in PyTorch against its exported ONNX file.

For each backbone (random weights, 20 classes, the detector's defaults: short
side resized to 600 px, long side at most 1000, 300 test proposals), the same
uint8 375x500 image (a VOC-sized photo shape, resized to 600x800 inside both)
goes through

* ``model.eval(); model([image])`` in PyTorch (``torch.inference_mode``, the
  model's channels-last layout), what ``predict`` runs, and
* the file written by ``detkit export --format onnx`` in ONNX Runtime's CPU
  provider (graph optimisations on, ``--threads`` intra-op threads, as torch),

which both include the resize, normalisation, RPN, RoI head, decoding and
NMS.  Prints seconds per image (median of ``--reps`` after a warm-up; the
two runtimes alternate so that both see the same machine load), images/s and
the ONNX Runtime / PyTorch speed ratio.  The outputs are compared with the
eval forward first (0.01 px, 1e-4, as ``detkit export`` checks) and the
result printed, with the number of detections compared.  With random weights
VGG16 leaves no detection above the 0.5 threshold, while ResNet50's
un-normalised activations saturate the class softmax (many detections at
exactly 1.0, where the tie order decides which survive): the timings are of
the full pipeline all the same, but the check is only meaningful in the tests
(tests/export), which use weights without such ties.

Usage: ``python benchmarks/export.py [--backbones vgg16 resnet50] [--reps 5]
[--threads 2] [--min-size 600 --max-size 1000]``.  Needs the export extra; a
few minutes on 2 cores (VGG16's ONNX file is 0.5 GB, written to a temporary
folder).  ``--backbones tiny --min-size 128 --max-size 128 --reps 1``: a
seconds-long run that only shows the script works.
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
    parser.add_argument("--min-size", type=int, default=None, help="model.preprocess.min_size (default: 600)")
    parser.add_argument("--max-size", type=int, default=None, help="model.preprocess.max_size (default: 1000)")
    parser.add_argument("--score-thresh", type=float, default=None, help="model.score_thresh (default: 0.5)")
    args = parser.parse_args()
    preprocess = {k: v for k, v in (("min_size", args.min_size), ("max_size", args.max_size)) if v is not None}

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
            spec = {"type": "faster_rcnn", "backbone": {"type": name}, "preprocess": preprocess}
            if args.score_thresh is not None:
                spec["score_thresh"] = args.score_thresh
            model = registry("detector").build(spec, num_classes=20).eval()

            def forward():
                with torch.inference_mode():
                    return model([image])[0]

            path = export_model(model, Path(tmp) / f"{name}.onnx", "onnx")
            run = load_exported(path, **options)
            array = image.numpy()
            expected = forward()  # warm-up of both, and the check
            problem = compare_detections(run(array), expected)
            top = expected["scores"]
            ties = int((top == top.max()).sum()) if len(top) else 0
            check = "match the eval forward" if problem is None else f"differ from the eval forward ({problem})"
            if problem is None and not len(top):
                check = "(nothing compared: no detection above score_thresh with random weights)"
            if problem is not None and ties > 1:
                # Random weights can saturate the softmax: many detections score exactly 1.0,
                # and which of them survive NMS and the cap of 100 depends on the tie order.
                check += f"; {ties} detections tie at score {float(top.max()):.6f}, so the kept set is order-dependent"
            torch_times, ort_times = [], []
            for _ in range(args.reps):  # alternate: both runtimes see the same load
                torch_times.append(median_time(forward, 1))
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
