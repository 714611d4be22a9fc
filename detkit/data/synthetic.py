"""Synthetic shapes: the embedded default data set, generated in torch.

Each image is a cluttered background (a two-colour gradient, soft blobs,
thin lines, pixel noise) with a few shapes on it; the class of an object is
its shape, its colour is random.  Objects sit on whole-pixel boxes, so the
boxes are exact and survive export to integer-coordinate formats; shapes
are anti-aliased from a signed distance so their edges look natural.

Everything comes from a ``torch.Generator`` seeded by ``(seed, split,
index)``: image ``i`` is the same whatever the access order, the number of
workers or the process, and the ``train`` and ``val`` splits differ.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from detkit.interfaces import DetectionDataset

# Shapes the renderer knows; a data set uses any subset as its classes.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond", "ring")

_MASK63 = (1 << 63) - 1


def sample_seed(seed: int, split: str, index: int) -> int:
    """A 63-bit seed mixing ``seed``, ``split`` and ``index`` (stable across processes)."""
    # crc32 rather than hash(): str hashes are salted per process.
    x = (seed * 0x9E3779B97F4A7C15 + zlib.crc32(split.encode()) * 0xBF58476D1CE4E5B9 + index) & _MASK63
    # splitmix64-style finaliser so that neighbouring indices get unrelated streams
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & _MASK63
    x ^= x >> 29
    return x


class SyntheticShapes(DetectionDataset):
    """Cluttered images of coloured shapes; ``dataset[i] -> (image [3, H, W], target)``.

    Boxes are integer-valued float32 ``[G, 4]`` xyxy pixels; ``G`` is between
    ``objects[0]`` and ``objects[1]`` (fewer only when no free place is found).
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        num_images: int = Field(1000, gt=0, description="images in the split")
        image_size: tuple[int, int] = Field((128, 128), description="(height, width) in pixels")
        classes: list[str] = Field(
            default_factory=lambda: ["circle", "square", "triangle", "cross"],
            min_length=1,
            description=f"shapes used as classes, in label order; any of {', '.join(SHAPES)}",
        )
        seed: int = Field(0, description="base seed; image i depends only on (seed, split, i)")
        split: str = Field("train", min_length=1, description="name mixed into the seed, so splits differ")
        objects: tuple[int, int] = Field((1, 4), description="(min, max) objects per image")
        object_size: tuple[int, int] | None = Field(
            None,
            description="(min, max) sqrt(box area) in pixels, sampled log-uniformly; "
            "default (short side / 8, short side / 2), e.g. (16, 64) for 128 px images",
        )
        aspect_range: tuple[float, float] = Field(
            (0.75, 1.33), description="(min, max) box height / width, sampled log-uniformly"
        )
        max_overlap: float = Field(
            0.15, ge=0, lt=1, description="largest share of the smaller of two boxes they may share"
        )
        clutter: float = Field(1.0, ge=0, le=4, description="amount of background lines and blobs")
        noise: float = Field(0.03, ge=0, le=0.5, description="std of the Gaussian pixel noise")
        min_contrast: float = Field(
            0.35, ge=0, le=1, description="least RGB distance between an object and its background"
        )

        @field_validator("classes")
        @classmethod
        def _known_shapes(cls, v: list[str]) -> list[str]:
            unknown = [c for c in v if c not in SHAPES]
            if unknown:
                raise ValueError(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
            if len(set(v)) != len(v):
                raise ValueError("classes must be unique")
            return v

        @model_validator(mode="after")
        def _ranges(self) -> "SyntheticShapes.Params":
            h, w = self.image_size
            if min(h, w) < 32:
                raise ValueError(f"image_size {self.image_size}: both sides must be >= 32")
            lo, hi = self.objects
            if not 0 <= lo <= hi:
                raise ValueError(f"objects {self.objects}: need 0 <= min <= max")
            if self.object_size is None:
                side = min(h, w)
                self.object_size = (max(4, side // 8), side // 2)
            smin, smax = self.object_size
            if not 4 <= smin <= smax:
                raise ValueError(f"object_size {self.object_size}: need 4 <= min <= max")
            amin, amax = self.aspect_range
            if not 0 < amin <= amax:
                raise ValueError(f"aspect_range {self.aspect_range}: need 0 < min <= max")
            # The longer side of the largest, most elongated box must fit.
            longest = smax * math.sqrt(max(amax, 1 / amin))
            if longest > min(h, w):
                raise ValueError(
                    f"object_size max {smax} with aspect_range {self.aspect_range} gives sides up to "
                    f"{longest:.0f} px, larger than image_size {self.image_size}"
                )
            return self

    def __init__(self, **params: Any):
        p = self.params = self.Params(**params)
        self.classes = list(p.classes)
        self._shape_ids = [SHAPES.index(c) for c in p.classes]

    def __len__(self) -> int:
        return self.params.num_images

    def _generator(self, index: int) -> torch.Generator:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} synthetic images")
        g = torch.Generator()
        g.manual_seed(sample_seed(self.params.seed, self.params.split, index))
        return g

    def image_id(self, index: int) -> str:
        return f"{self.params.split}_{index:06d}"

    # ------------------------------------------------------------- layout
    def _layout(self, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Boxes ``[G, 4]`` (int-valued float32), labels ``[G]``, orientations ``[G]``."""
        p = self.params
        h, w = p.image_size
        lo, hi = p.objects
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        tries = 12
        # All candidates are drawn up front, so the stream (and the image) does not
        # depend on how many placements get rejected.
        u = torch.rand(n, 2, generator=g, dtype=torch.float64)
        size = torch.exp(math.log(p.object_size[0]) + u[:, 0] * math.log(p.object_size[1] / p.object_size[0]))
        aspect = torch.exp(math.log(p.aspect_range[0]) + u[:, 1] * math.log(p.aspect_range[1] / p.aspect_range[0]))
        bw = (size / aspect.sqrt()).round().clamp(4, w)
        bh = (size * aspect.sqrt()).round().clamp(4, h)
        pos = torch.rand(n, tries, 2, generator=g, dtype=torch.float64)
        x1 = (pos[..., 0] * (w - bw + 1)[:, None]).floor()
        y1 = (pos[..., 1] * (h - bh + 1)[:, None]).floor()
        cand = torch.stack((x1, y1, x1 + bw[:, None], y1 + bh[:, None]), dim=-1)  # [n, tries, 4]
        labels = torch.randint(len(self.classes), (n,), generator=g)
        orient = torch.randint(4, (n,), generator=g)

        kept: list[Tensor] = []
        keep_idx: list[int] = []
        for i in range(n):  # sequential by nature: each placement depends on the earlier ones
            c = cand[i]
            if kept:
                ok = _max_share(c, torch.stack(kept)) <= self.params.max_overlap
                if not bool(ok.any()):
                    continue
                c = c[int(ok.to(torch.uint8).argmax())]
            else:
                c = c[0]
            kept.append(c)
            keep_idx.append(i)
        idx = torch.tensor(keep_idx, dtype=torch.long)
        boxes = torch.stack(kept).float() if kept else torch.zeros(0, 4)
        return boxes, labels[idx], orient[idx]

    def annotation(self, index: int) -> tuple[tuple[int, int], dict[str, Any]]:
        """``((height, width), target)`` without rendering the image."""
        boxes, labels, _ = self._layout(self._generator(index))
        return tuple(self.params.image_size), self._target(index, boxes, labels)  # type: ignore[return-value]

    def _target(self, index: int, boxes: Tensor, labels: Tensor) -> dict[str, Any]:
        return {
            "boxes": boxes,
            "labels": labels.long(),
            "difficult": torch.zeros(len(labels), dtype=torch.bool),
            "image_id": self.image_id(index),
        }

    # ------------------------------------------------------------ drawing
    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        g = self._generator(index)
        boxes, labels, orient = self._layout(g)
        img = self._background(g)
        colours = torch.rand(len(boxes), 5, 3, generator=g)
        shading = torch.rand(len(boxes), 2, generator=g)
        for k in range(len(boxes)):
            self._draw(img, boxes[k], self._shape_ids[int(labels[k])], int(orient[k]), colours[k], shading[k])
        if self.params.noise > 0:
            img.add_(torch.randn(img.shape, generator=g) * self.params.noise)
        img.clamp_(0, 1)
        return img, self._target(index, boxes, labels)

    def _background(self, g: torch.Generator) -> Tensor:
        """A ``[3, H, W]`` gradient with soft blobs and thin lines of random colours."""
        h, w = self.params.image_size
        ys = torch.arange(h, dtype=torch.float32).view(h, 1) + 0.5
        xs = torch.arange(w, dtype=torch.float32).view(1, w) + 0.5
        c = torch.rand(2, 3, 1, 1, generator=g)
        theta = float(torch.rand((), generator=g)) * 2 * math.pi
        t = (xs * math.cos(theta) + ys * math.sin(theta)) / math.hypot(h, w) + 0.5
        img = c[0] + (c[1] - c[0]) * t.clamp(0, 1)

        clutter = self.params.clutter
        n_blobs = int(torch.randint(0, int(round(4 * clutter)) + 1, (1,), generator=g))
        n_lines = int(torch.randint(0, int(round(6 * clutter)) + 1, (1,), generator=g))
        side = float(min(h, w))
        if n_blobs:
            b = torch.rand(n_blobs, 7, generator=g)
            cx, cy = b[:, 0] * w, b[:, 1] * h
            sigma = side * (0.06 + 0.2 * b[:, 2])
            strength = 0.3 + 0.5 * b[:, 3]
            d2 = (xs - cx.view(-1, 1, 1)) ** 2 + (ys - cy.view(-1, 1, 1)) ** 2
            alpha = strength.view(-1, 1, 1) * torch.exp(-d2 / (2 * sigma.view(-1, 1, 1) ** 2))
            for k in range(n_blobs):
                img = img + alpha[k] * (b[k, 4:7].view(3, 1, 1) - img)
        if n_lines:
            seg = torch.rand(n_lines, 8, generator=g)
            p0 = seg[:, 0:2] * torch.tensor([w, h])
            p1 = seg[:, 2:4] * torch.tensor([w, h])
            width = 1.0 + 2.0 * seg[:, 4]
            alpha = _segment_alpha(xs, ys, p0, p1, width) * 0.85
            for k in range(n_lines):
                img = img + alpha[k] * (seg[k, 5:8].view(3, 1, 1) - img)
        return img.contiguous()

    def _draw(self, img: Tensor, box: Tensor, shape: int, orient: int, colours: Tensor, shading: Tensor) -> None:
        """Paint one shape filling ``box`` (xyxy, whole pixels) into ``img`` in place."""
        x1, y1, x2, y2 = (int(v) for v in box.tolist())
        bw, bh = x2 - x1, y2 - y1
        # Normalised coordinates of the pixel centres: the box spans [-1, 1] x [-1, 1].
        u = ((torch.arange(bw, dtype=torch.float32) + 0.5) / bw * 2 - 1).view(1, bw)
        v = ((torch.arange(bh, dtype=torch.float32) + 0.5) / bh * 2 - 1).view(bh, 1)
        if orient & 1:  # mirror (only visible for the triangle)
            v = -v
        sd = _shape_sdf(SHAPES[shape], u, v, swap=bool(orient & 2))
        # Signed distance in box units -> pixels, then a one-pixel anti-aliased edge.
        alpha = (0.5 - sd * (min(bw, bh) / 2)).clamp(0, 1)

        region = img[:, y1:y2, x1:x2]
        bg = (region * alpha).sum(dim=(1, 2)) / alpha.sum().clamp(min=1e-6)
        # Candidates: four random colours, then black and white; take the first with
        # enough contrast against what lies under the shape, else the most distinct.
        cand = torch.cat((colours[:4], torch.zeros(1, 3), torch.ones(1, 3)))
        dist = (cand - bg).norm(dim=1)
        good = dist >= self.params.min_contrast
        pick = int(good.to(torch.uint8).argmax()) if bool(good.any()) else int(dist.argmax())
        colour = cand[pick].view(3, 1, 1)
        # A gentle linear shading so objects are not perfectly flat.
        shade = 1.0 + 0.25 * (shading[0] - 0.5) * u + 0.25 * (shading[1] - 0.5) * v
        fill = (colour * shade).clamp(0, 1)
        region.add_(alpha * (fill - region))


def _max_share(cand: Tensor, boxes: Tensor) -> Tensor:
    """Largest intersection / smaller-area of each ``[T, 4]`` candidate with ``[K, 4]`` boxes -> ``[T]``."""
    lt = torch.maximum(cand[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(cand[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_c = (cand[:, 2:] - cand[:, :2]).prod(-1)
    area_b = (boxes[:, 2:] - boxes[:, :2]).prod(-1)
    smaller = torch.minimum(area_c[:, None], area_b[None, :])
    return (inter / smaller).amax(dim=1)


def _shape_sdf(shape: str, u: Tensor, v: Tensor, swap: bool) -> Tensor:
    """Approximate signed distance (negative inside) in box units, ``[bh, bw]``."""
    if swap and shape == "triangle":  # point left/right instead of up/down
        u, v = v, u
    au, av = u.abs(), v.abs()
    if shape == "circle":
        return torch.sqrt(u * u + v * v) - 1
    if shape == "square":
        return torch.maximum(au, av) - 1
    if shape == "diamond":
        return (au + av - 1) / math.sqrt(2)
    if shape == "triangle":  # apex at (0, -1), base on v = 1
        return torch.maximum(v - 1, (2 * au - v - 1) / math.sqrt(5))
    if shape == "cross":
        t = 0.34
        return torch.minimum(torch.maximum(au - t, av - 1), torch.maximum(au - 1, av - t))
    if shape == "ring":
        r = torch.sqrt(u * u + v * v)
        return (r - 0.775).abs() - 0.225
    raise ValueError(f"unknown shape {shape!r}")


def _segment_alpha(xs: Tensor, ys: Tensor, p0: Tensor, p1: Tensor, width: Tensor) -> Tensor:
    """Coverage ``[K, H, W]`` of K line segments ``p0 -> p1`` (``[K, 2]`` x, y) of ``width`` px."""
    d = p1 - p0
    len2 = (d * d).sum(1).clamp(min=1e-6).view(-1, 1, 1)
    px = xs - p0[:, 0].view(-1, 1, 1)
    py = ys - p0[:, 1].view(-1, 1, 1)
    t = ((px * d[:, 0].view(-1, 1, 1) + py * d[:, 1].view(-1, 1, 1)) / len2).clamp(0, 1)
    dx = px - t * d[:, 0].view(-1, 1, 1)
    dy = py - t * d[:, 1].view(-1, 1, 1)
    dist = torch.sqrt(dx * dx + dy * dy)
    return (width.view(-1, 1, 1) / 2 + 0.5 - dist).clamp(0, 1)
