"""Write the synthetic data set to disk in VOC or COCO layout.

VOC: ``OUT/Annotations/<id>.xml``, ``OUT/JPEGImages/<id>.<ext>``,
``OUT/ImageSets/Main/<split>.txt``.  COCO: ``OUT/images/<id>.<ext>`` and
``OUT/annotations/instances_<split>.json``.  Images are PNG by default
(lossless, so reading them back gives the same pixels up to 8-bit
rounding); JPEG changes pixels slightly.  Synthetic boxes are whole pixels,
so both annotation formats store them exactly.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from PIL import Image
from torch import Tensor

from detkit.data.synthetic import SyntheticShapes
from detkit.errors import DataError


def save_image(image: Tensor, path: Path) -> None:
    """Write float ``[3, H, W]`` 0..1 as an 8-bit RGB file (PNG or JPEG by suffix)."""
    arr = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    im = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    if path.suffix.lower() in (".jpg", ".jpeg"):
        im.save(path, quality=95, subsampling=0)
    else:
        im.save(path)


def voc_xml(image_id: str, filename: str, size: tuple[int, int], boxes: Tensor, labels: Tensor,
            difficult: Tensor, classes: list[str]) -> ET.ElementTree:
    """A VOC annotation; boxes (0-based corners) are written 1-based: ``x1 + 1, y1 + 1, x2, y2``."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = "VOC2007"
    ET.SubElement(ann, "filename").text = filename
    src = ET.SubElement(ann, "source")
    ET.SubElement(src, "database").text = "detkit synthetic"
    sz = ET.SubElement(ann, "size")
    ET.SubElement(sz, "width").text = str(size[1])
    ET.SubElement(sz, "height").text = str(size[0])
    ET.SubElement(sz, "depth").text = "3"
    ET.SubElement(ann, "segmented").text = "0"
    for box, label, diff in zip(boxes.tolist(), labels.tolist(), difficult.tolist()):
        obj = ET.SubElement(ann, "object")
        ET.SubElement(obj, "name").text = classes[label]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = str(int(diff))
        bb = ET.SubElement(obj, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), (box[0] + 1, box[1] + 1, box[2], box[3])):
            ET.SubElement(bb, tag).text = f"{v:g}"
    tree = ET.ElementTree(ann)
    ET.indent(tree)
    return tree


def export_synthetic(
    out: str | Path,
    format: Literal["voc", "coco"],
    dataset: SyntheticShapes,
    image_format: Literal["png", "jpg"] = "png",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write every image of ``dataset`` under ``out``; returns the annotation file or directory."""
    out = Path(out)
    if format not in ("voc", "coco"):
        raise DataError(f"--format: expected voc or coco, got {format!r}")
    if image_format not in ("png", "jpg"):
        raise DataError(f"--image-format: expected png or jpg, got {image_format!r}")
    split = dataset.params.split
    try:
        if format == "voc":
            return _write_voc(out, dataset, split, image_format, progress)
        return _write_coco(out, dataset, split, image_format, progress)
    except PermissionError as exc:
        raise DataError(f"{exc.filename or out}: permission denied") from None


def _write_voc(out: Path, ds: SyntheticShapes, split: str, ext: str,
               progress: Callable[[int, int], None] | None) -> Path:
    ann_dir, img_dir, sets = out / "Annotations", out / "JPEGImages", out / "ImageSets" / "Main"
    for d in (ann_dir, img_dir, sets):
        d.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(len(ds)):
        image, t = ds[i]
        image_id = t["image_id"]
        filename = f"{image_id}.{ext}"
        save_image(image, img_dir / filename)
        voc_xml(image_id, filename, tuple(image.shape[-2:]), t["boxes"], t["labels"], t["difficult"],
                ds.classes).write(ann_dir / f"{image_id}.xml", encoding="unicode")
        ids.append(image_id)
        if progress:
            progress(i + 1, len(ds))
    (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return out


def _write_coco(out: Path, ds: SyntheticShapes, split: str, ext: str,
                progress: Callable[[int, int], None] | None) -> Path:
    img_dir, ann_dir = out / "images", out / "annotations"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for i in range(len(ds)):
        image, t = ds[i]
        h, w = image.shape[-2:]
        filename = f"{t['image_id']}.{ext}"
        save_image(image, img_dir / filename)
        images.append({"id": i + 1, "file_name": filename, "height": int(h), "width": int(w)})
        for box, label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            x1, y1, x2, y2 = box
            anns.append({
                "id": len(anns) + 1, "image_id": i + 1, "category_id": label + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
            })  # fmt: skip
        if progress:
            progress(i + 1, len(ds))
    categories = [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(ds.classes)]
    path = ann_dir / f"instances_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return path
