"""``detkit predict``: detections for image files, one JSON file per image.

A file that cannot be read (missing, corrupt, not an image) is skipped with a
one-line warning and the rest go on; the count of skipped files is reported
at the end.  ``strict`` makes any skipped file an error (after the readable
ones are written); a run that could read nothing is always an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from detkit.data.image import read_image_uint8
from detkit.engine.device import resolve_device
from detkit.errors import ConfigError, DataError


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def expand_images(images: Sequence[str | Path]) -> list[Path]:
    """The given files, with each folder replaced by the images directly inside it (sorted)."""
    paths: list[Path] = []
    for item in map(Path, images):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise DataError(f"{item}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        else:
            paths.append(item)
    return paths


def _out_names(images: Sequence[Path]) -> list[str]:
    """``<stem>.json`` per image; repeated stems get ``_1``, ``_2``... so none is overwritten."""
    seen: dict[str, int] = {}
    names = []
    for path in images:
        n = seen.get(path.stem, 0)
        seen[path.stem] = n + 1
        names.append(f"{path.stem}.json" if n == 0 else f"{path.stem}_{n}.json")
    return names


class PredictResult(list):
    """The written records (a list, in input order) and ``skipped``: ``(path, reason)`` pairs."""

    def __init__(self, records: Sequence[dict[str, Any]] = (), skipped: Sequence[tuple[Path, str]] = ()):
        super().__init__(records)
        self.skipped = list(skipped)


def predict_files(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    out_dir: str | Path,
    score_thresh: float | None = None,
    nms_iou: float | None = None,
    device: str = "auto",
    batch_size: int = 8,
    draw: bool = False,
    strict: bool = False,
    console: Any = None,
    max_detections: int | None = None,
) -> PredictResult:
    """Detect objects in ``images`` and write ``out_dir/<stem>.json`` for each.

    Boxes are ``[x1, y1, x2, y2]`` in the original image's pixels.  Returns
    the written records in input order.  ``batch_size`` images are read at a
    time and passed to :meth:`detkit.Predictor.predict`, which batches those
    of one input size (the detections equal one-image passes'; 1 runs one
    image per pass).  ``max_detections`` caps the detections per image (best
    first; default the model's).  ``draw`` also writes
    ``out_dir/<stem>.detections.png`` with the boxes drawn on the image.

    Unreadable files are skipped with a warning on ``console`` (stderr by
    default) and listed in the result's ``skipped``; with ``strict`` they make
    it a :class:`DataError` once the others are written, as does a run in
    which no file could be read.
    """
    from rich.console import Console

    from detkit.api import load
    from detkit.engine.checkpoint import atomic_write_text
    from detkit.engine.evaluate import progress_bar
    from detkit.io import check_output_dir, make_output_dir

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if max_detections is not None and max_detections < 1:
        raise ConfigError(f"--max-detections must be at least 1, got {max_detections}")
    console = console or Console(stderr=True)
    paths = expand_images(images)
    check_output_dir(out_dir)  # before the checkpoint is loaded
    detector = load(checkpoint, resolve_device(device, "--device"))
    out_dir = make_output_dir(check_output_dir(out_dir))
    names = _out_names(paths)
    records = PredictResult()
    with progress_bar("predicting", len(paths), console) as progress:
        for start in range(0, len(paths), batch_size):
            chunk, tensors, chunk_names = [], [], []
            for path, name in zip(paths[start : start + batch_size], names[start : start + batch_size]):
                try:
                    tensors.append(read_image_uint8(path))
                except DataError as exc:
                    records.skipped.append((path, str(exc)))
                    console.print(f"warning: {exc}; skipped", markup=False, highlight=False, soft_wrap=True)
                    continue
                chunk.append(path)
                chunk_names.append(name)
            if not chunk:
                progress(min(start + batch_size, len(paths)), len(paths))
                continue
            dets = detector.predict(tensors, score_thresh=score_thresh, nms_iou=nms_iou,
                                    max_detections=max_detections, batch_size=batch_size)
            for path, image, det, name in zip(chunk, tensors, dets, chunk_names):
                record = {**det.to_dict(), "image": str(path)}
                atomic_write_text(out_dir / name, json.dumps(record, indent=1) + "\n")
                if draw:
                    draw_detections(image, record["detections"], out_dir / name.replace(".json", ".detections.png"))
                records.append(record)
            progress(min(start + batch_size, len(paths)), len(paths))
    if records.skipped and (strict or not records):
        reason = records.skipped[0][1]
        if len(paths) == 1:
            raise DataError(reason)
        why = "--strict" if records else "nothing could be read"
        raise DataError(f"{len(records.skipped)} of {len(paths)} images could not be read ({why}); "
                        f"first: {reason}")
    return records


def draw_detections(image: torch.Tensor, detections: list[dict[str, Any]], path: Path) -> Path:
    """Write ``image`` (uint8 ``[3, H, W]``) with labelled boxes as a PNG, atomically."""
    from PIL import Image
    from torchvision.utils import draw_bounding_boxes

    if detections:
        boxes = torch.tensor([d["box"] for d in detections], dtype=torch.float32)
        labels = [f"{d['name']} {d['score']:.2f}" for d in detections]
        palette = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"]
        colors = [palette[d["label"] % len(palette)] for d in detections]
        width = max(1, round(max(image.shape[1:]) / 300))
        image = draw_bounding_boxes(image, boxes, labels, colors=colors, width=width)
    from detkit.io import atomic_write

    picture = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    return atomic_write(path, lambda fh: picture.save(fh, format="PNG"))
