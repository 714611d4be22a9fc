"""COCO-format data sets: an image directory and an instances JSON file.

Category ids become contiguous labels ``0..C-1`` in sorted id order and the
class names come from the categories.  Boxes ``[x, y, w, h]`` become xyxy.
Crowd annotations are kept only with ``use_crowd`` and are then flagged
``difficult`` (evaluation ignores them).  Images without annotations stay.
Boxes are clipped to their image; boxes with nothing left, and boxes written
with ``w <= 0`` or ``h <= 0``, are dropped; all are counted in
``dataset.box_report`` (see :mod:`detkit.data.box_report`).  The image's size
is read from its header (the JSON's ``height``/``width`` may be wrong); images
where the two differ are counted there too.  A box with a non-finite number
(``NaN``, ``Infinity``: Python's JSON reader accepts both) is refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from detkit.data.box_report import BoxReport
from detkit.data.image import image_size, load_image
from detkit.data.paths import path_field, resolve, where as path_origin
from detkit.errors import DataError
from detkit.interfaces import DetectionDataset


def _require(cond: bool, path: Path, field: str, problem: str) -> None:
    if not cond:
        raise DataError(f"{path}: {field}: {problem}")


def read_coco_json(path: Path, origin: str = "annotations") -> dict[str, Any]:
    """The parsed instances file, with its top-level structure checked."""
    if not path.is_file():
        raise DataError(f"{path}: COCO annotation file not found ({origin}; it should name an instances_*.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    _require(isinstance(data, dict), path, "<root>", "expected an object with images, annotations, categories")
    for key in ("images", "categories"):
        _require(isinstance(data.get(key), list), path, key, "missing or not a list")
    _require(isinstance(data.get("annotations", []), list), path, "annotations", "not a list")
    return data


IMAGE_SUBDIR = "images"  # where `detkit data synth --format coco` puts the images, beside annotations/
CHECKED_IMAGES = 3  # the first annotated images whose files must exist: a few, not all


def image_root(root: Path, file_name: str | None) -> Path:
    """The folder ``file_name`` is relative to: ``root``, or ``root/images`` when the file is there instead.

    ``root`` may thus be the image folder itself or a data set folder holding it
    as ``images/`` (the layout ``detkit data synth --format coco`` writes).
    ``root`` when neither holds the file (:mod:`detkit.data.image_check` then
    says so).
    """
    if file_name is None or (root / file_name).is_file() or not (root / IMAGE_SUBDIR / file_name).is_file():
        return root
    return root / IMAGE_SUBDIR


class COCODataset(DetectionDataset):
    """A COCO-format split; ``dataset[i] -> (image [3, H, W], target)``, images in id order.

    ``root`` is the folder the images' ``file_name`` is relative to (COCO's
    ``train2017/``), or a folder holding that one as ``images/`` (what ``detkit
    data synth --format coco`` writes: ``OUT/images/`` and
    ``OUT/annotations/instances_<split>.json``); which one is decided by where
    the first annotated image is.
    """

    root_hint = "the folder the images' file_name is relative to, or one holding it as images/"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        root: str = path_field(
            description="the image folder (the one images' file_name is relative to, e.g. COCO's train2017), or "
            "the folder `detkit data synth --format coco` writes (its images/ subfolder is used)"
        )
        annotations: str = path_field(description="instances JSON file")
        use_crowd: bool = Field(
            False, description="keep iscrowd boxes (flagged difficult); set true for evaluation splits"
        )

    def __init__(self, params: "COCODataset.Params"):
        p = self.params = params
        self.root = resolve(p.root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: COCO image directory not found ({path_origin('root', p.root)})")
        path = resolve(p.annotations)
        data = read_coco_json(path, path_origin("annotations", p.annotations))

        cats = data["categories"]
        for k, c in enumerate(cats):
            _require(isinstance(c, dict) and isinstance(c.get("id"), int), path, f"categories[{k}].id", "missing or not an int")
            _require(isinstance(c.get("name"), str), path, f"categories[{k}].name", "missing or not a string")
        cats = sorted(cats, key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in cats]
        _require(len(set(self.category_ids)) == len(cats), path, "categories", "duplicate ids")
        self.classes = [c["name"] for c in cats]
        label_of = {cid: i for i, cid in enumerate(self.category_ids)}

        images = data["images"]
        for k, im in enumerate(images):
            _require(isinstance(im, dict) and "id" in im, path, f"images[{k}].id", "missing")
            _require(isinstance(im.get("file_name"), str), path, f"images[{k}].file_name", "missing or not a string")
        self.images = sorted(images, key=lambda im: im["id"])
        row_of = {im["id"]: i for i, im in enumerate(self.images)}
        _require(len(row_of) == len(images), path, "images", "duplicate ids")

        per_image: list[list[tuple[list[float], int, bool]]] = [[] for _ in self.images]
        empty = 0
        for k, a in enumerate(data.get("annotations", [])):
            where = f"annotations[{k}]"
            _require(isinstance(a, dict), path, where, "not an object")
            _require(a.get("image_id") in row_of, path, f"{where}.image_id", f"unknown image id {a.get('image_id')!r}")
            _require(
                a.get("category_id") in label_of, path, f"{where}.category_id",
                f"unknown category id {a.get('category_id')!r}",
            )
            bbox = a.get("bbox")
            _require(
                isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox),
                path, f"{where}.bbox", f"expected [x, y, w, h] numbers, got {bbox!r}",
            )
            _require(
                all(math.isfinite(v) for v in bbox), path, f"{where}.bbox",
                f"not finite: {bbox!r} (image {a['image_id']!r}, "
                f"{self.images[row_of[a['image_id']]]['file_name']!r})",
            )
            crowd = bool(a.get("iscrowd", 0))
            if crowd and not p.use_crowd:
                continue
            if bbox[2] <= 0 or bbox[3] <= 0:
                empty += 1  # no signal in them; COCO has a few. Counted, not hidden.
                continue
            x, y, w, h = (float(v) for v in bbox)
            per_image[row_of[a["image_id"]]].append(([x, y, x + w, y + h], label_of[a["category_id"]], crowd))

        self.box_report = BoxReport(empty=empty)
        annotated = [row for row, objs in enumerate(per_image) if objs] or list(range(len(self.images)))
        self._checked = annotated[:CHECKED_IMAGES]
        self.root = image_root(self.root, self.images[annotated[0]]["file_name"] if annotated else None)
        self.sizes = [self._size(row, path) for row in range(len(self.images))]
        self.targets = []
        for row, objs in enumerate(per_image):
            boxes = np.asarray([o[0] for o in objs], dtype=np.float32).reshape(-1, 4)
            boxes, keep = self.box_report.clip(boxes, self.sizes[row] if objs else None)
            # numpy, not tensors: cheap to pickle to spawned workers.
            self.targets.append({
                "boxes": boxes[keep],
                "labels": np.asarray([o[1] for o in objs], dtype=np.int64)[keep],
                "difficult": np.asarray([o[2] for o in objs], dtype=bool).reshape(-1)[keep],
            })  # fmt: skip

    def _size(self, index: int, json_path: Path) -> tuple[int, int] | None:
        """``(height, width)`` from the image header (the pixels will have it), else the JSON's;
        None if neither is known.  A difference is counted in the box report."""
        im = self.images[index]
        written = None
        if isinstance(im.get("height"), int) and isinstance(im.get("width"), int):
            written = im["height"], im["width"]
        try:  # the header only: cheap
            real = image_size(self.root / im["file_name"])
        except DataError:
            real = None  # reported with its file name when the image is loaded
        return self.box_report.real_size(f"{json_path}: images id {im['id']!r} ({im['file_name']})", written, real)

    def __len__(self) -> int:
        return len(self.images)

    def first_image_paths(self) -> list[Path]:
        """The files of the first few annotated images (:mod:`detkit.data.image_check` looks for them)."""
        return [self.root / self.images[row]["file_name"] for row in self._checked]

    def _target(self, index: int) -> dict[str, Any]:
        t = self.targets[index]
        return {**{k: torch.tensor(v) for k, v in t.items()}, "image_id": str(self.images[index]["id"])}

    def annotation(self, index: int) -> tuple[tuple[int, int], dict[str, Any]]:
        """``((height, width), target)``: the size from the image header (the JSON's if unreadable)."""
        size = self.sizes[index]
        if size is None:
            size = image_size(self.root / self.images[index]["file_name"])
        return size, self._target(index)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        return load_image(self.root / self.images[index]["file_name"]), self._target(index)
