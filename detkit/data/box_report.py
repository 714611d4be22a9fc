"""Ground-truth boxes checked against their image: clipped, dropped and counted.

Annotation tools and conversions leave boxes that reach past the image edge,
start at negative coordinates, or lie wholly outside it.  Kept as they are,
the wholly-outside ones become zero-area ground truth (and once made
``data stats`` suggest an anchor scale of 6e-05).  The readers clip every box
to its image, drop the ones with nothing left, and count both per data set;
training prints :meth:`BoxReport.line` at its start and keeps it in the run
directory, and ``detkit data stats`` prints it too.

The image file wins over its annotation: boxes are clipped to the size read
from the image's header (EXIF orientation applied, as the pixels are read),
and files whose annotated size differs are counted, the first one named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class BoxReport:
    """What a reader did to one data set's boxes."""

    kept: int = 0
    clipped: int = 0  # reached past the image; kept, clipped to it
    outside: int = 0  # nothing left after clipping: dropped
    empty: int = 0  # zero or negative width or height as written (COCO w <= 0 or h <= 0): dropped
    size_mismatch: int = 0  # files whose annotated size differs from the image's (the image's is used)
    first_mismatch: str = field(default="", compare=False)  # "<file>: annotated WxH, image WxH"

    @property
    def dropped(self) -> int:
        return self.outside + self.empty

    def real_size(
        self, name: str, annotated: tuple[int, int] | None, real: tuple[int, int] | None
    ) -> tuple[int, int] | None:
        """The ``(height, width)`` boxes are clipped to: the image's own (``real``, from its header)
        where it could be read, else the annotated one; a difference is counted, ``name`` the file."""
        if real is None:
            return annotated
        if annotated is not None and tuple(annotated) != tuple(real):
            self.size_mismatch += 1
            if not self.first_mismatch:
                (ah, aw), (rh, rw) = annotated, real
                turned = " (sides swapped: EXIF orientation?)" if (ah, aw) == (rw, rh) else ""
                self.first_mismatch = f"{name}: annotated {aw}x{ah}, image {rw}x{rh}{turned}"
        return tuple(real)

    def clip(self, boxes: np.ndarray, size: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
        """``(boxes clipped to (height, width), keep mask)`` for ``[G, 4]`` xyxy boxes; counts them.

        With ``size`` None (unknown) boxes are only counted as kept.
        """
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if size is None:
            self.kept += len(boxes)
            return boxes, np.ones(len(boxes), dtype=bool)
        h, w = size
        out = boxes.copy()
        out[:, 0::2] = out[:, 0::2].clip(0, w)
        out[:, 1::2] = out[:, 1::2].clip(0, h)
        keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
        changed = (out != boxes).any(axis=1)
        self.outside += int((~keep).sum())
        self.clipped += int((changed & keep).sum())
        self.kept += int(keep.sum())
        return out, keep

    def line(self, name: str) -> str:
        """One line for a person: ``data.train: 1200 boxes; 14 clipped to their image, 3 dropped ...``."""
        head = f"{name}: {self.kept} boxes"
        sizes = ""
        if self.size_mismatch:
            files = "file's" if self.size_mismatch == 1 else "files'"
            sizes = (f"; {self.size_mismatch} {files} annotated size differs from the image, whose size "
                     f"is used (first: {self.first_mismatch})")
        if not (self.clipped or self.dropped):
            return head + ", all inside their images" + sizes
        parts = []
        if self.clipped:
            parts.append(f"{self.clipped} clipped to their image")
        if self.outside:
            parts.append(f"{self.outside} dropped (wholly outside their image)")
        if self.empty:
            parts.append(f"{self.empty} dropped (zero or negative width or height)")
        return f"{head} kept; " + ", ".join(parts) + sizes

    def to_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "clipped": self.clipped, "outside": self.outside, "empty": self.empty,
                "dropped": self.dropped, "size_mismatch": self.size_mismatch}


def find_box_report(dataset: Any) -> BoxReport | None:
    """The :class:`BoxReport` of ``dataset``, looking through wrappers (``.dataset``)."""
    for _ in range(6):
        if dataset is None:
            return None
        report = getattr(dataset, "box_report", None)
        if isinstance(report, BoxReport):
            return report
        dataset = getattr(dataset, "dataset", None)
    return None
