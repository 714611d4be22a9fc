"""Train-loader throughput against the number of workers, and JPEG decoding speed.

1. **Decoding** (one thread): ``detkit.data.image.read_image_uint8`` (libjpeg-turbo
   through ``torchvision.io.decode_jpeg``) against the plain PIL path it
   replaced (``Image.open()``, ``exif_transpose``, ``convert("RGB")`` -> numpy -> tensor), ms per image
   and whether the pixels are identical, on the generated photo-like JPEGs
   and on every real photograph given with ``--real`` (by default the ones
   found on the machine: matplotlib's ``grace_hopper.jpg``).
2. **Loader**: images/s of ``build_loader`` over the train split (VOC layout,
   hflip, batch ``--batch``, grouped by aspect ratio, uint8 batches of images
   at their own sizes: the loader neither resizes nor pads, the detector's
   preprocessing does) for each ``--workers`` count: one epoch to start the
   workers and warm up, then ``--epochs`` timed epochs.  Each worker runs one
   torch thread (``DataLoader`` sets it).  Ratios are against 1 worker.
   ``--pin`` adds pinned memory (what CUDA training uses).
3. **Preprocessing**: images/s of the detector's ``model.preprocess`` (short
   side ``--size``, long side at most ``--max-size``, padded to 32) on those
   batches in the main process, all threads: the resize the loader did
   before, now inside the model on its device (here the CPU).

4. **Augmentation against the hand-written one** (``--compare-augment REPS``):
   images/s of the loader (``--workers`` of the first count) with the
   default augmentation (hflip 0.5) and with ``photometric`` added (one torch
   thread in the main process too), on
   torchvision.transforms.v2 (today's steps) against a copy of the
   hand-written steps they replaced (kept below as the baseline), the two
   interleaved within every rep so that a noisy machine slows both alike;
   the median ratio v2 / hand-written per setting.  Also the IoU crop +
   zoom-out recipe (configs/scratch/tiny_aug.yaml's steps), for its cost, and
   the cost of seeding one v2 step (``detkit.data.augment.seeded`` against
   ``fork_rng`` + ``manual_seed``).

The machine's load average is printed before and after: on a shared machine
the worker scaling is only meaningful when it is quiet.

Usage: ``python benchmarks/loader.py [--workers 0 1 2] [--images 96] [--batch 8]
[--size 600] [--epochs 1] [--root DIR] [--pin] [--photos FILE ...] [--compare-augment REPS]``; with
``--photos`` the loader's images are crops of those real photographs.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photo_voc import CLASSES, bits_per_pixel, make_photo_voc  # noqa: E402

from detkit.data.config import DataConfig  # noqa: E402
from detkit.data.image import read_image_uint8  # noqa: E402
from detkit.data.loader import build_dataset, build_loader  # noqa: E402
from detkit.data.transforms import DetectionTransform  # noqa: E402
from detkit.interfaces import Transform  # noqa: E402


def pil_read(path: str) -> torch.Tensor:
    from PIL import ImageOps

    with Image.open(path) as im:  # as detkit reads it: EXIF orientation applied
        return torch.from_numpy(np.asarray(ImageOps.exif_transpose(im).convert("RGB")).copy()).permute(2, 0, 1)


def time_decoder(fn, files: list[str], reps: int) -> float:
    for f in files[:2]:
        fn(f)
    t = time.perf_counter()
    for _ in range(reps):
        for f in files:
            fn(f)
    return (time.perf_counter() - t) / (reps * len(files))


def decode_report(name: str, files: list[str], reps: int) -> None:
    if not files:
        return
    same = all(torch.equal(read_image_uint8(f), pil_read(f)) for f in files)
    pil = time_decoder(pil_read, files, reps)
    fast = time_decoder(read_image_uint8, files, reps)
    pix = sum(np.prod(Image.open(f).size) for f in files) / len(files)
    print(f"  {name:28s} {len(files):4d} files, {pix / 1e3:6.0f} kpixel: PIL {pil * 1e3:6.2f} ms, "
          f"detkit {fast * 1e3:6.2f} ms ({pil / fast:.2f}x), identical pixels: {same}")


class HandFlip(Transform):
    """The hand-written horizontal flip that v2's replaced (the baseline of --compare-augment)."""

    random_draws = 1

    def __init__(self, p: float):
        self.p = p

    def __call__(self, image, target, rand):
        if rand is None or not bool(rand[0] < self.p):
            return image, target
        b, w = target["boxes"], int(image.shape[-1])
        target["boxes"] = torch.stack((w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]), dim=1)
        return image.flip(-1), target


class HandPhotometric(Transform):
    """The hand-written brightness/contrast/saturation jitter that v2's ops replaced (baseline)."""

    random_draws = 3
    gray = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)

    def __call__(self, image, target, rand):
        b, c, s = (1 + 0.25 * (2 * rand - 1)).tolist()
        image = image * b
        mean = (image * self.gray).sum(0).mean()
        image = (image - mean) * c + mean
        gray = (image * self.gray).sum(0, keepdim=True)
        return ((image - gray) * s + gray).clamp_(0, 1), target


AUGMENT = {  # setting -> (today's steps, the hand-written baseline's or None)
    "default (hflip 0.5)": ([{"type": "hflip", "p": 0.5}], lambda: [HandFlip(0.5)]),
    "photometric (+ hflip)": ([{"type": "hflip", "p": 0.5}, {"type": "photometric"}],
                            lambda: [HandFlip(0.5), HandPhotometric()]),
    "tiny_aug (+ zoom_out, iou_crop)": ([{"type": "photometric"}, {"type": "zoom_out", "side_range": [1.0, 2.0]},
                                         {"type": "iou_crop", "p": 0.5}, {"type": "hflip", "p": 0.5}], None),
}


def loader_rate(root: Path, workers: int, args: argparse.Namespace, steps: Any = None) -> float:
    """Images/s of the train loader; ``steps``: data.transforms steps (default hflip 0.5), or built ones."""
    cfg = DataConfig.model_validate({
        "train": {"type": "voc", "root": str(root), "split": "train", "classes": CLASSES},
        "batch_size": args.batch, "num_workers": workers,
        "transforms": {"hflip": 0.5},  # augmentation only: the size is the detector's (preprocess_rate)
    })  # fmt: skip
    ds = build_dataset(cfg, "train", seed=0)
    if steps is not None:
        ds.transform = DetectionTransform(steps, train=True)
    loader = build_loader(ds, batch_size=args.batch, shuffle=True, num_workers=workers, seed=0, drop_last=True,
                          pin_memory=args.pin)
    for _ in loader:  # start the workers, warm the page cache
        pass
    n, t = 0, time.perf_counter()
    for _ in range(args.epochs):
        for batch in loader:
            n += len(batch)
    rate = n / (time.perf_counter() - t)
    del loader
    return rate


def preprocess_rate(root: Path, args: argparse.Namespace) -> float:
    """Images/s of the detector's preprocessing (resize, normalise, pad) on the loader's batches."""
    from detkit.preprocess import ImagePreprocessor, PreprocessParams

    pre = ImagePreprocessor(PreprocessParams(min_size=args.size, max_size=args.max_size, size_divisible=32)).train()
    cfg = DataConfig.model_validate({
        "train": {"type": "voc", "root": str(root), "split": "train", "classes": CLASSES},
        "batch_size": args.batch, "transforms": {"hflip": 0.5},
    })  # fmt: skip
    batches = list(build_loader(build_dataset(cfg, "train", seed=0), batch_size=args.batch, shuffle=True,
                                num_workers=0, seed=0, drop_last=True))
    with torch.inference_mode():
        pre(batches[0].images)  # warm-up
        n, t = 0, time.perf_counter()
        for _ in range(args.epochs):
            for batch in batches:
                pre(batch.images, batch.targets)
                n += len(batch)
    return n / (time.perf_counter() - t)


def seeding_cost(reps: int = 2000) -> tuple[float, float]:
    """Microseconds a v2 step spends to run seeded: detkit's ``seeded`` against fork_rng + manual_seed."""
    from detkit.data.augment import seeded

    t = time.perf_counter()
    for i in range(reps):
        with seeded(i):
            pass
    ours = (time.perf_counter() - t) / reps * 1e6
    t = time.perf_counter()
    for i in range(reps // 10):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(i)
    return ours, (time.perf_counter() - t) / (reps // 10) * 1e6


def transform_cost(root: Path, reps: int) -> None:
    """Microseconds per image of the transforms alone (decoded images, per-sample generators, as in the
    loader), v2 against hand-written, interleaved: the part of the loader's work that changed."""
    cfg = DataConfig.model_validate({"train": {"type": "voc", "root": str(root), "split": "train",
                                               "classes": CLASSES}})
    base = build_dataset(cfg, "train", augment=False)
    samples = [base[i] for i in range(len(base))]
    times: dict[str, list[float]] = {}
    for rep in range(reps):
        for name, (steps, hand) in AUGMENT.items():
            for kind, s in [("v2", steps)] + ([("hand", hand())] if hand else []):
                t = DetectionTransform(s, train=True)
                start = time.perf_counter()
                for i, (image, target) in enumerate(samples):
                    t(image, target, torch.Generator().manual_seed(rep * 1000 + i))
                times.setdefault(f"{name}|{kind}", []).append((time.perf_counter() - start) / len(samples) * 1e6)
    print(f"transforms alone, {len(samples)} decoded images, {reps} interleaved reps, median us per image:")
    for name, (_, hand) in AUGMENT.items():
        line = f"  {name:32s} v2 {statistics.median(times[f'{name}|v2']):8.0f}"
        if hand:
            line += f", hand-written {statistics.median(times[f'{name}|hand']):8.0f}"
        print(line)


def compare_augment(root: Path, args: argparse.Namespace) -> None:
    workers = args.workers[0]
    torch.set_num_threads(1)  # one thread like a loader worker (two threads that wait spin on a busy machine)
    print("seeding one v2 step: {:.1f} us (fork_rng + manual_seed: {:.1f} us)".format(*seeding_cost()))
    transform_cost(root, 10)
    names = [n for n in AUGMENT if n.split()[0] in args.augment_settings] if args.augment_settings else list(AUGMENT)
    print(f"loader, v2 against hand-written, {workers} workers, {args.reps_augment} interleaved reps "
          f"of {args.epochs} epoch(s)")
    rates: dict[str, list[float]] = {}
    for rep in range(args.reps_augment):
        for name, (steps, hand) in ((n, AUGMENT[n]) for n in names):
            runs = [("v2", steps)] + ([("hand", hand())] if hand else [])
            for kind, s in runs if rep % 2 == 0 else runs[::-1]:  # alternate which goes first
                rates.setdefault(f"{name}|{kind}", []).append(loader_rate(root, workers, args, s))
        print(f"  rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()) + f"  (load {load()})",
              flush=True)
    for name, (_, hand) in ((n, AUGMENT[n]) for n in names):
        new = statistics.median(rates[f"{name}|v2"])
        line = f"  {name:32s} v2 {new:7.1f} images/s"
        if hand:
            old = statistics.median(rates[f"{name}|hand"])
            ratios = [a / b for a, b in zip(rates[f"{name}|v2"], rates[f"{name}|hand"])]
            line += (f", hand-written {old:7.1f}: median ratio v2/hand {statistics.median(ratios):.3f} "
                     f"(per rep {' '.join(f'{r:.3f}' for r in ratios)})")
        print(line)


def load() -> str:
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=600)
    p.add_argument("--max-size", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--decode-reps", type=int, default=3)
    p.add_argument("--pin", action="store_true")
    p.add_argument("--root", type=Path, default=None)
    p.add_argument("--real", nargs="*", default=None, help="real JPEG photographs to decode")
    p.add_argument(
        "--photos", nargs="+", default=None,
        help="real photographs (any format PIL reads): the loader's set is made of random crops of them, "
        "re-encoded as quality-90 JPEGs, instead of generated photo-like images",
    )
    p.add_argument("--compare-augment", dest="reps_augment", type=int, default=0, metavar="REPS",
                   help="only the v2 against hand-written augmentation comparison, REPS interleaved reps")
    p.add_argument("--augment-settings", nargs="+", default=None, metavar="NAME",
                   help="with --compare-augment: the loader settings to time (default, photometric, tiny_aug; default all)")
    args = p.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="detkit_loader_")) / "voc"
    if not (root / "ImageSets" / "Main" / "train.txt").is_file():
        make_photo_voc(root, args.images, photos=args.photos)
    kind = f"crops of {len(args.photos)} real photographs" if args.photos else "photo-like"
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load {load()}; {root}: "
          f"{args.images} {kind} JPEGs, {bits_per_pixel(root):.2f} bits/pixel")

    if args.reps_augment:
        compare_augment(root, args)
        print(f"load {load()}")
        return
    torch.set_num_threads(1)
    real = args.real
    if real is None:
        import matplotlib

        real = glob.glob(os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "*.jpg"))
    print("decoding, 1 thread:")
    decode_report("the loader's set" if args.photos else "generated photo-like", sorted(glob.glob(str(root / "JPEGImages" / "*.jpg")))[:32], args.decode_reps)
    decode_report("real photographs", real, args.decode_reps * 4)
    torch.set_num_threads(os.cpu_count() or 1)

    print(f"loader, batch {args.batch}, images at their own sizes (no resize), pin_memory {args.pin}:")
    rates = {}
    for w in args.workers:
        rates[w] = loader_rate(root, w, args)
        base = rates.get(1)
        ratio = f", {rates[w] / base:.2f}x 1 worker" if base and w != 1 else ""
        print(f"  {w:2d} workers: {rates[w]:7.1f} images/s{ratio}  (load {load()})", flush=True)
    rate = preprocess_rate(root, args)
    print(f"detector preprocessing (model.preprocess, short side {args.size}, max {args.max_size}, main process, "
          f"{torch.get_num_threads()} threads): {rate:7.1f} images/s  (load {load()})")


if __name__ == "__main__":
    main()
