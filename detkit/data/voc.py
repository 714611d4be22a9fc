"""PASCAL VOC data sets read from a VOCdevkit directory.

Layout: ``<root>/Annotations/<id>.xml``, ``<root>/JPEGImages/<file>``,
``<root>/ImageSets/Main/<split>.txt``.  VOC boxes are 1-based inclusive
pixel indices; they become 0-based continuous corners by ``x1 - 1, y1 - 1``
(``x2, y2`` unchanged), so a box covering pixels 1..10 is ``[0, 10]``.
Boxes are clipped to the image and those with nothing left are dropped,
counted in ``dataset.box_report`` (see :mod:`detkit.data.box_report`); the
image's size is read from its header (the XML's ``size`` may be wrong) and
files where the two differ are counted there too.  Non-finite coordinates
(``inf``, ``nan``) are refused, naming the file and the object.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from detkit.data.box_report import BoxReport
from detkit.data.image import image_size, load_image
from detkit.data.paths import path_field, resolve, where as path_origin
from detkit.errors import DataError
from detkit.interfaces import DetectionDataset

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

_HOW_TO_GET = (
    "download VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar (PASCAL VOC 2007) and extract them "
    "so that <root>/Annotations exists (the archives unpack to VOCdevkit/VOC2007)"
)


def find_voc_root(root: str | Path, origin: str | None = None) -> Path:
    """The directory holding ``Annotations``: ``root`` itself or ``root/[VOCdevkit/]VOC2007``.

    ``origin`` says where ``root`` came from (for the error message).
    """
    root = resolve(root)
    candidates = [root, root / "VOC2007", root / "VOCdevkit" / "VOC2007"]
    for c in candidates:
        if (c / "Annotations").is_dir():
            return c
    looked = ", ".join(str(c / "Annotations") for c in candidates)
    came = f" ({origin})" if origin else ""
    raise DataError(f"VOC data not found: looked for {looked}{came}; {_HOW_TO_GET}")


def _text(node: ET.Element, tag: str, xml: Path, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DataError(f"{xml}: {where}{tag}: missing")
    return child.text.strip()


def _number(node: ET.Element, tag: str, xml: Path, where: str) -> float:
    text = _text(node, tag, xml, where)
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{xml}: {where}{tag}: not a number: {text!r}") from None
    if not math.isfinite(value):
        raise DataError(f"{xml}: {where}{tag}: not a finite number: {text!r}")
    return value


def parse_voc_xml(
    xml: Path, class_index: dict[str, int], ignore_other_classes: bool = False
) -> dict[str, Any]:
    """One annotation file -> ``{"filename", "size", "boxes" [G,4], "labels" [G], "difficult" [G]}`` (numpy)."""
    try:
        tree = ET.parse(xml)
    except FileNotFoundError:
        raise DataError(f"{xml}: annotation file not found") from None
    except ET.ParseError as exc:
        raise DataError(f"{xml}: invalid XML: {exc}") from None
    ann = tree.getroot()
    filename_node = ann.find("filename")
    filename = filename_node.text.strip() if filename_node is not None and filename_node.text else None
    size_node = ann.find("size")
    size = None
    if size_node is not None:
        h, w = int(_number(size_node, "height", xml, "size.")), int(_number(size_node, "width", xml, "size."))
        size = (h, w) if h > 0 and w > 0 else None  # some tools write 0 for unknown
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(ann.findall("object")):
        where = f"object[{k}]."
        name = _text(obj, "name", xml, where)
        if name not in class_index:
            if ignore_other_classes:
                continue
            raise DataError(
                f"{xml}: {where}name: unknown class {name!r}; known classes: {', '.join(class_index)} "
                "(set ignore_other_classes: true to skip objects of other classes)"
            )
        diff_node = obj.find("difficult")
        try:
            diff = bool(int(diff_node.text)) if diff_node is not None and diff_node.text else False
        except ValueError:
            raise DataError(f"{xml}: {where}difficult: expected 0 or 1, got {diff_node.text!r}") from None
        bb = obj.find("bndbox")
        if bb is None:
            raise DataError(f"{xml}: {where}bndbox: missing")
        bwhere = where + "bndbox."
        x1, y1, x2, y2 = (_number(bb, t, xml, bwhere) for t in ("xmin", "ymin", "xmax", "ymax"))
        box = (x1 - 1, y1 - 1, x2, y2)
        if not (box[2] > box[0] and box[3] > box[1]):
            raise DataError(f"{xml}: {where}bndbox: empty box xmin={x1:g} ymin={y1:g} xmax={x2:g} ymax={y2:g}")
        boxes.append(box)
        labels.append(class_index[name])
        difficult.append(diff)
    # numpy, not tensors: a data set pickled to spawned workers would otherwise
    # put every small tensor in its own shared-memory file.
    return {
        "filename": filename,
        "size": size,
        "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, dtype=np.int64),
        "difficult": np.asarray(difficult, dtype=bool),
    }


class VOCDataset(DetectionDataset):
    """A PASCAL VOC split; ``dataset[i] -> (image [3, H, W], target)``.

    All annotations are parsed when the data set is built, so a bad file
    fails at once with its name rather than in the middle of an epoch.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        root: str = path_field(description="VOC2007 directory (holding Annotations/), or a parent VOCdevkit")
        split: str = Field("trainval", min_length=1, description="ImageSets/Main/<split>.txt")
        classes: list[str] = Field(default_factory=lambda: list(VOC_CLASSES), min_length=1)
        use_difficult: bool = Field(
            False, description="keep boxes marked difficult (flagged); set true for evaluation splits"
        )
        ignore_other_classes: bool = Field(False, description="skip objects whose class is not in classes")

        @field_validator("classes")
        @classmethod
        def _unique(cls, v: list[str]) -> list[str]:
            if len(set(v)) != len(v):
                raise ValueError("classes must be unique")
            return v

    def __init__(self, params: "VOCDataset.Params"):
        p = self.params = params
        self.classes = list(p.classes)
        self.root = find_voc_root(p.root, path_origin("root", p.root))
        split_file = self.root / "ImageSets" / "Main" / f"{p.split}.txt"
        if not split_file.is_file():
            have = sorted(f.stem for f in (self.root / "ImageSets" / "Main").glob("*.txt") if "_" not in f.stem)
            raise DataError(
                f"{split_file}: split file not found (split: {p.split!r}); available splits: "
                f"{', '.join(have) or 'none'}"
            )
        self.ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        index = {c: i for i, c in enumerate(self.classes)}
        self.annotations = [
            parse_voc_xml(self.root / "Annotations" / f"{i}.xml", index, p.ignore_other_classes) for i in self.ids
        ]
        self.box_report = BoxReport()
        for k, a in enumerate(self.annotations):
            try:  # the header only: cheap, and the pixels will have this size
                real = image_size(self.image_path(k))
            except DataError:
                real = None  # reported with its file name when the image is loaded
            xml = self.root / "Annotations" / f"{self.ids[k]}.xml"
            size = a["size"] = self.box_report.real_size(str(xml), a["size"], real)
            boxes, keep = self.box_report.clip(a["boxes"], size)
            a["boxes"], a["labels"], a["difficult"] = boxes[keep], a["labels"][keep], a["difficult"][keep]
        if not p.use_difficult:
            for a in self.annotations:
                keep = ~a["difficult"]
                a["boxes"], a["labels"], a["difficult"] = a["boxes"][keep], a["labels"][keep], a["difficult"][keep]

    def __len__(self) -> int:
        return len(self.ids)

    root_hint = "the VOC2007 folder (holding Annotations/ and JPEGImages/) or its VOCdevkit parent"

    def first_image_paths(self, count: int = 3) -> list[Path]:
        """The files of the first ``count`` images (:mod:`detkit.data.image_check` looks for them)."""
        return [self.image_path(k) for k in range(min(count, len(self.ids)))]

    def image_path(self, index: int) -> Path:
        ann = self.annotations[index]
        if ann["filename"]:
            path = self.root / "JPEGImages" / ann["filename"]
            if path.is_file():
                return path
        return self.root / "JPEGImages" / f"{self.ids[index]}.jpg"

    def _target(self, index: int) -> dict[str, Any]:
        ann = self.annotations[index]
        return {
            "boxes": torch.tensor(ann["boxes"]),
            "labels": torch.tensor(ann["labels"]),
            "difficult": torch.tensor(ann["difficult"]),
            "image_id": self.ids[index],
        }

    def annotation(self, index: int) -> tuple[tuple[int, int], dict[str, Any]]:
        """``((height, width), target)``: the size from the image header (the XML's if unreadable)."""
        size = self.annotations[index]["size"]
        if size is None:
            size = image_size(self.image_path(index))
        return size, self._target(index)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        return load_image(self.image_path(index)), self._target(index)
