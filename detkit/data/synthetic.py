"""Synthetic shapes: the embedded default data set, generated in torch.

Each image is a cluttered background (a two-colour gradient, soft blobs,
thin lines, pixel noise) with a few shapes on it; the class of an object is
its shape, its colour is random.  Objects sit on whole-pixel boxes, so the
boxes are exact and survive export to integer-coordinate formats; shapes
are anti-aliased from a signed distance so their edges look natural.

Everything comes from a ``torch.Generator`` seeded by ``(seed, split,
index)``: image ``i`` is the same whatever the access order, the number of
workers or the process, and the ``train`` and ``val`` splits differ.

``preset: clutter`` is a harder set, close to a small real custom data set:
images of 320-480 px on procedural textures and generated photograph-like
scenes (sky, horizon, ground, large out-of-focus forms, lighting, vignette),
hard-edged distractors (irregular blobs, arcs, bars) besides lines and soft
blobs, textured objects, occluders over parts of objects, and 1-8 objects
from 14 px to 40 % of the short side.  Nothing is downloaded or bundled.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from detkit.interfaces import DetectionDataset

# Shapes the renderer knows; a data set uses any subset as its classes.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond", "ring", "star")

_MASK63 = (1 << 63) - 1

# Images per split that ``detkit data synth --preset NAME`` writes.
PRESET_SPLITS: dict[str, dict[str, int]] = {"clutter": {"train": 400, "val": 100}}

# Named settings; a preset fills the parameters a config leaves unset.
PRESETS: dict[str, dict[str, Any]] = {
    "clutter": {
        "num_images": 400,
        "classes": ["circle", "square", "triangle", "cross", "diamond", "ring"],
        "size_range": (320, 480),
        "objects": (1, 8),
        "object_size": (14, 192),
        "max_object_frac": 0.4,
        "aspect_range": (0.6, 1.67),
        "max_overlap": 0.3,
        "background": "mixed",
        "clutter": 2.0,
        "distractors": 6,
        "occlusion": 0.3,
        "object_texture": 0.4,
        "noise": 0.04,
        "min_contrast": 0.3,
    },
}


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

        preset: Literal["clutter"] | None = Field(
            None, description="named settings (clutter: the harder set); explicit parameters override it"
        )
        num_images: int = Field(1000, gt=0, description="images in the split")
        image_size: tuple[int, int] = Field((128, 128), description="(height, width) in pixels")
        size_range: tuple[int, int] | None = Field(
            None, description="(min, max): each image's height and width drawn uniformly; overrides image_size"
        )
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
        max_object_frac: float | None = Field(
            None, gt=0, le=1, description="cap on an object's sqrt(area) as a share of the image's short side"
        )
        background: Literal["gradient", "texture", "photo", "mixed"] = Field(
            "gradient", description="gradient; texture (stripes, checks, noise, rings); photo (a generated "
            "scene); mixed (one of the three per image)"
        )
        distractors: int = Field(
            0, ge=0, le=32, description="up to this many hard-edged irregular blobs, arcs and bars per image"
        )
        occlusion: float = Field(0.0, ge=0, le=1, description="probability that an occluder covers part of an object")
        object_texture: float = Field(0.0, ge=0, le=1, description="probability that an object has a textured fill")

        @model_validator(mode="before")
        @classmethod
        def _apply_preset(cls, data: Any) -> Any:
            if isinstance(data, dict) and data.get("preset") is not None:
                name = data["preset"]
                if name not in PRESETS:
                    raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
                data = {**PRESETS[name], **data}
            return data

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
            if self.size_range is not None:
                if not 32 <= self.size_range[0] <= self.size_range[1]:
                    raise ValueError(f"size_range {self.size_range}: need 32 <= min <= max")
                h = w = self.size_range[0]
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
            if self.max_object_frac is not None:
                smax = min(smax, self.max_object_frac * min(h, w))
            longest = smax * math.sqrt(max(amax, 1 / amin))
            if longest > min(h, w):
                raise ValueError(
                    f"object_size max {smax} with aspect_range {self.aspect_range} gives sides up to "
                    f"{longest:.0f} px, larger than "
                    + (f"image_size {self.image_size}" if self.size_range is None else f"size_range min {h}")
                )
            return self

    def __init__(self, params: "SyntheticShapes.Params | None" = None):
        p = self.params = params if params is not None else self.Params()
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
    def _size(self, g: torch.Generator) -> tuple[int, int]:
        """The image's ``(height, width)``: fixed, or drawn first from its stream."""
        p = self.params
        if p.size_range is None:
            return int(p.image_size[0]), int(p.image_size[1])
        lo, hi = p.size_range
        hw = torch.randint(lo, hi + 1, (2,), generator=g)
        return int(hw[0]), int(hw[1])

    def _layout(self, g: torch.Generator, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
        """Boxes ``[G, 4]`` (int-valued float32), labels ``[G]``, orientations ``[G]``."""
        p = self.params
        lo, hi = p.objects
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        tries = 12
        smin, smax = p.object_size  # type: ignore[misc]
        if p.max_object_frac is not None:
            smax = max(smin, min(smax, p.max_object_frac * min(h, w)))
        # All candidates are drawn up front, so the stream (and the image) does not
        # depend on how many placements get rejected.
        u = torch.rand(n, 2, generator=g, dtype=torch.float64)
        size = torch.exp(math.log(smin) + u[:, 0] * math.log(smax / smin))
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
        g = self._generator(index)
        h, w = self._size(g)
        boxes, labels, _ = self._layout(g, h, w)
        return (h, w), self._target(index, boxes, labels)

    def _target(self, index: int, boxes: Tensor, labels: Tensor) -> dict[str, Any]:
        return {
            "boxes": boxes,
            "labels": labels.long(),
            "difficult": torch.zeros(len(labels), dtype=torch.bool),
            "image_id": self.image_id(index),
        }

    # ------------------------------------------------------------ drawing
    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        p = self.params
        g = self._generator(index)
        h, w = self._size(g)
        boxes, labels, orient = self._layout(g, h, w)
        img = self.scene(g, h, w)
        if p.distractors:
            _hard_distractors(img, g, int(torch.randint(0, p.distractors + 1, (1,), generator=g)))
        colours = torch.rand(len(boxes), 5, 3, generator=g)
        shading = torch.rand(len(boxes), 2, generator=g)
        for k in range(len(boxes)):
            fill = None
            if p.object_texture and float(torch.rand((), generator=g)) < p.object_texture:
                fill = torch.rand(4, generator=g)  # texture kind, frequency, angle, strength
            self._draw(img, boxes[k], self._shape_ids[int(labels[k])], int(orient[k]), colours[k], shading[k], fill)
            if p.occlusion and float(torch.rand((), generator=g)) < p.occlusion:
                _occlude(img, boxes[k], g)
        if self.params.noise > 0:
            img.add_(torch.randn(img.shape, generator=g) * self.params.noise)
        img.clamp_(0, 1)
        return img, self._target(index, boxes, labels)

    def scene(self, g: torch.Generator, h: int, w: int) -> Tensor:
        """The ``[3, H, W]`` float background the shapes are drawn on, from the image's stream ``g``.

        ``params.background`` chooses it; a subclass may return its own (crops of
        photographs, as the held-out set of ``benchmarks/photo_voc.py``).
        """
        kind = self.params.background
        if kind == "mixed":
            kind = ("gradient", "texture", "photo", "photo")[int(torch.randint(4, (1,), generator=g))]
        if kind == "gradient":
            return self._background(g, h, w)
        img = _texture(g, h, w) if kind == "texture" else _photo(g, h, w)
        return _add_clutter(img, g, self.params.clutter)

    def _background(self, g: torch.Generator, h: int, w: int) -> Tensor:
        """A ``[3, H, W]`` gradient with soft blobs and thin lines of random colours."""
        ys = torch.arange(h, dtype=torch.float32).view(h, 1) + 0.5
        xs = torch.arange(w, dtype=torch.float32).view(1, w) + 0.5
        c = torch.rand(2, 3, 1, 1, generator=g)
        theta = float(torch.rand((), generator=g)) * 2 * math.pi
        t = (xs * math.cos(theta) + ys * math.sin(theta)) / math.hypot(h, w) + 0.5
        img = c[0] + (c[1] - c[0]) * t.clamp(0, 1)
        return _add_clutter(img, g, self.params.clutter)

    def _draw(
        self,
        img: Tensor,
        box: Tensor,
        shape: int,
        orient: int,
        colours: Tensor,
        shading: Tensor,
        texture: Tensor | None = None,
    ) -> None:
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
        if texture is not None:  # stripes, checks or rings darkening the colour by up to 45 %
            shade = shade * (1 - 0.45 * float(texture[3]) * _object_pattern(u, v, texture))
        fill = (colour * shade).clamp(0, 1)
        region.add_(alpha * (fill - region))


def _add_clutter(img: Tensor, g: torch.Generator, clutter: float) -> Tensor:
    """``img`` with up to ``4 * clutter`` soft blobs and ``6 * clutter`` thin lines of random colours."""
    h, w = img.shape[-2:]
    ys = torch.arange(h, dtype=torch.float32).view(h, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, w) + 0.5
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


# ------------------------------------------------------------------ clutter preset
def _fractal(g: torch.Generator, channels: int, h: int, w: int, cells: int, octaves: int) -> Tensor:
    """``[channels, h, w]`` fractal value noise in 0..1: bicubic upsampled random grids, halving per octave."""
    total = torch.zeros(channels, h, w)
    amp, norm = 1.0, 0.0
    for k in range(octaves):
        n = cells * 2**k
        grid = torch.rand(1, channels, n + 1, n + 1, generator=g)
        mode = "bicubic" if k < 2 else "bilinear"  # fine octaves: bilinear is 3x cheaper and looks the same
        total += amp * F.interpolate(grid, size=(h, w), mode=mode, align_corners=False)[0]
        norm += amp
        amp *= 0.5
    total /= norm
    lo = total.amin(dim=(1, 2), keepdim=True)
    hi = total.amax(dim=(1, 2), keepdim=True)
    return (total - lo) / (hi - lo).clamp(min=1e-6)


def _grid(h: int, w: int) -> tuple[Tensor, Tensor]:
    ys = torch.arange(h, dtype=torch.float32).view(h, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float32).view(1, w) + 0.5
    return xs, ys


def _texture(g: torch.Generator, h: int, w: int) -> Tensor:
    """A ``[3, H, W]`` procedural texture: warped stripes, checks, coloured noise or wood-like rings."""
    xs, ys = _grid(h, w)
    side = float(min(h, w))
    r = torch.rand(8, generator=g)
    colours = torch.rand(2, 3, 1, 1, generator=g)
    warp = _fractal(g, 1, h, w, 3, 3)[0] - 0.5
    kind = int(torch.randint(4, (1,), generator=g))
    angle = float(r[0]) * math.pi
    freq = (4 + 28 * float(r[1])) / side  # cycles per pixel
    along = xs * math.cos(angle) + ys * math.sin(angle)
    across = -xs * math.sin(angle) + ys * math.cos(angle)
    if kind == 0:  # stripes
        t = 0.5 + 0.5 * torch.sin(2 * math.pi * freq * along + 6 * float(r[2]) * warp)
    elif kind == 1:  # checks, softened
        t = 0.5 + 0.5 * torch.tanh(4 * torch.sin(2 * math.pi * freq * along) * torch.sin(2 * math.pi * freq * across))
    elif kind == 2:  # coloured noise: three noise channels through a random colour mix
        n = _fractal(g, 3, h, w, 2 + int(6 * float(r[2])), 5)
        mix = torch.rand(3, 3, generator=g) * 0.8 + 0.2 * torch.eye(3)
        img = torch.einsum("ij,jhw->ihw", mix / mix.sum(1, keepdim=True), n)
        return (colours[0] * 0.5 + img * 0.6).clamp(0, 1)
    else:  # rings around an off-image centre (wood grain)
        cx, cy = (float(r[3]) * 3 - 1) * w, (float(r[4]) * 3 - 1) * h
        dist = torch.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
        t = 0.5 + 0.5 * torch.sin(2 * math.pi * freq * dist + 8 * warp)
    grain = _fractal(g, 1, h, w, 16, 2)[0] - 0.5
    img = colours[0] + (colours[1] - colours[0]) * t
    return (img * (1 + 0.25 * grain)).clamp(0, 1)


def _photo(g: torch.Generator, h: int, w: int) -> Tensor:
    """A ``[3, H, W]`` photograph-like scene, generated: sky over a horizon, textured ground,
    large out-of-focus forms (trees, buildings), a light gradient and a vignette."""
    xs, ys = _grid(h, w)
    side = float(min(h, w))
    r = torch.rand(12, generator=g)
    # Sky: a vertical gradient between two muted colours, with faint clouds.
    sky = torch.rand(2, 3, 1, 1, generator=g) * 0.5 + torch.tensor([0.35, 0.4, 0.5]).view(3, 1, 1)
    clouds = _fractal(g, 1, h, w, 3, 4)
    img = sky[0] + (sky[1] - sky[0]) * (ys / h) + 0.25 * float(r[0]) * (clouds - 0.5)
    # Ground: an earthy colour modulated by detailed noise, below a wavy horizon.
    horizon = h * (0.2 + 0.5 * float(r[1])) + h * 0.12 * (_fractal(g, 1, 1, w, 4, 3)[0] - 0.5)
    ground_col = torch.rand(3, 1, 1, generator=g) * torch.tensor([0.6, 0.6, 0.4]).view(3, 1, 1) + 0.15
    detail = _fractal(g, 3, h, w, 8 + int(24 * float(r[2])), 4)
    ground = ground_col * (0.6 + 0.8 * detail)
    below = ((ys - horizon) / 2).clamp(0, 1)
    img = img + below * (ground - img)
    # Large soft forms standing on the ground or floating: ellipses and boxes with noisy fill.
    n_forms = int(torch.randint(2, 7, (1,), generator=g))
    f = torch.rand(n_forms, 10, generator=g)
    tex = _fractal(g, 3, h, w, 6, 3)
    for k in range(n_forms):
        cx, cy = float(f[k, 0]) * w, float(f[k, 1]) * h
        rx, ry = side * (0.08 + 0.3 * float(f[k, 2])), side * (0.08 + 0.3 * float(f[k, 3]))
        if f[k, 4] < 0.5:
            d = torch.sqrt(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2) - 1
        else:
            d = torch.maximum((xs - cx).abs() / rx, (ys - cy).abs() / ry) - 1
        soft = 1.0 + 6.0 * float(f[k, 5])  # out of focus: edges several pixels wide
        alpha = (0.5 - d * min(rx, ry) / soft).clamp(0, 1) * (0.5 + 0.5 * float(f[k, 6]))
        colour = f[k, 7:10].view(3, 1, 1) * 0.8 + 0.1
        img = img + alpha * (colour * (0.7 + 0.6 * tex) - img)
    # Light from one side and a vignette.
    theta = float(r[3]) * 2 * math.pi
    light = ((xs - w / 2) * math.cos(theta) + (ys - h / 2) * math.sin(theta)) / side
    vignette = ((xs - w / 2) ** 2 + (ys - h / 2) ** 2) / (0.25 * (h * h + w * w))
    img = img * (1 + 0.35 * float(r[4]) * light) * (1 - 0.35 * float(r[5]) * vignette)
    # Slight defocus of the whole scene.
    img = F.avg_pool2d(img[None], 3, stride=1, padding=1, count_include_pad=False)[0]
    return img.clamp(0, 1).contiguous()


def _hard_distractors(img: Tensor, g: torch.Generator, n: int) -> None:
    """Paint ``n`` hard-edged distractors in place: irregular blobs, arcs (ring pieces) and thick bars."""
    if n == 0:
        return
    h, w = img.shape[-2:]
    xs, ys = _grid(h, w)
    side = float(min(h, w))
    d = torch.rand(n, 12, generator=g)
    for k in range(n):
        cx, cy = float(d[k, 0]) * w, float(d[k, 1]) * h
        size = side * (0.02 + 0.07 * float(d[k, 2]))
        dx, dy = xs - cx, ys - cy
        dist = torch.sqrt(dx * dx + dy * dy)
        ang = torch.atan2(dy, dx)
        kind = int(d[k, 3] * 3)
        if kind == 0:  # irregular blob: a radius that wobbles with the angle
            wobble = sum(
                0.25 * float(d[k, 4 + j]) * torch.sin((j + 2) * ang + 6.3 * float(d[k, 7 + j])) for j in range(3)
            )
            sd = dist - size * (1 + wobble)
        elif kind == 1:  # arc: a piece of a ring
            thick = 1.5 + 0.25 * size * float(d[k, 4])
            start, span = float(d[k, 5]) * 2 * math.pi, (0.3 + 0.45 * float(d[k, 6])) * 2 * math.pi
            rel = torch.remainder(ang - start, 2 * math.pi)
            sd = (dist - size).abs() - thick / 2
            sd = torch.where(rel <= span, sd, torch.full_like(sd, 1e3))
        else:  # bar: a thick segment
            a = float(d[k, 4]) * math.pi
            length, thick = size * (1.5 + 3 * float(d[k, 5])), 2 + 0.3 * size * float(d[k, 6])
            along = dx * math.cos(a) + dy * math.sin(a)
            across = -dx * math.sin(a) + dy * math.cos(a)
            sd = torch.maximum(along.abs() - length / 2, across.abs() - thick / 2)
        alpha = (0.5 - sd).clamp(0, 1)
        colour = d[k, 9:12].view(3, 1, 1)
        img.add_(alpha * (colour - img))


def _occlude(img: Tensor, box: Tensor, g: torch.Generator) -> None:
    """Paint an irregular occluder in place over one side of ``box``, reaching 10-35 % into it."""
    h, w = img.shape[-2:]
    x1, y1, x2, y2 = (float(v) for v in box.tolist())
    bw, bh = x2 - x1, y2 - y1
    o = torch.rand(9, generator=g)
    cover = 0.1 + 0.25 * float(o[0])
    side = int(o[1] * 4)
    # A disc-like blob whose edge cuts the box at depth ``cover`` from the chosen side; small
    # enough (relative to the box) that it cannot hide a neighbouring object.
    t = float(o[3])
    radius = min(bw, bh) * (0.35 + 0.35 * float(o[2]))
    if side == 0:
        cx, cy = x1 + cover * bw - radius, y1 + t * bh
    elif side == 1:
        cx, cy = x2 - cover * bw + radius, y1 + t * bh
    elif side == 2:
        cx, cy = x1 + t * bw, y1 + cover * bh - radius
    else:
        cx, cy = x1 + t * bw, y2 - cover * bh + radius
    # Only a window around the box (plus the occluder's reach) is touched.
    wx1, wy1 = max(0, int(cx - radius * 1.3)), max(0, int(cy - radius * 1.3))
    wx2, wy2 = min(w, int(cx + radius * 1.3) + 1), min(h, int(cy + radius * 1.3) + 1)
    if wx2 <= wx1 or wy2 <= wy1:
        return
    xs = torch.arange(wx1, wx2, dtype=torch.float32).view(1, -1) + 0.5
    ys = torch.arange(wy1, wy2, dtype=torch.float32).view(-1, 1) + 0.5
    dx, dy = xs - cx, ys - cy
    ang = torch.atan2(dy, dx)
    depth = cover * (bw if side < 2 else bh)
    wobble = 0.2 * depth * (torch.sin(3 * ang + 6.3 * float(o[4])) + 0.5 * torch.sin(5 * ang + 6.3 * float(o[5])))
    sd = torch.sqrt(dx * dx + dy * dy) - radius - wobble
    alpha = (0.5 - sd).clamp(0, 1)
    region = img[:, wy1:wy2, wx1:wx2]
    region.add_(alpha * (o[6:9].view(3, 1, 1) - region))


def _object_pattern(u: Tensor, v: Tensor, texture: Tensor) -> Tensor:
    """A 0..1 pattern over an object's normalised ``u, v`` box coordinates (``texture``: kind, freq, angle, -)."""
    freq = 2 + 5 * float(texture[1])
    a = float(texture[2]) * math.pi
    along = u * math.cos(a) + v * math.sin(a)
    kind = int(texture[0] * 3)
    if kind == 0:
        return 0.5 + 0.5 * torch.sin(math.pi * freq * along)
    if kind == 1:
        across = -u * math.sin(a) + v * math.cos(a)
        return ((torch.sin(math.pi * freq * along) * torch.sin(math.pi * freq * across)) > 0).float()
    return 0.5 + 0.5 * torch.cos(math.pi * freq * torch.sqrt(u * u + v * v))


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
    if shape == "star":  # five points, one up; stretched so its points touch all four box sides
        x, y = u * 0.951, (v + 1) * 0.9045 - 1  # the unit star spans x +-0.951, y -1..0.809
        r = torch.sqrt(x * x + y * y)
        # Fold the angle from the upward point into one half-spike, 0..36 degrees, where the
        # outline is the straight edge from the point (0, 1) to the notch at radius 0.45.
        phi = (torch.remainder(torch.atan2(x, -y) + math.pi / 5, 2 * math.pi / 5) - math.pi / 5).abs()
        px, py = r * torch.sin(phi), r * torch.cos(phi)
        bx, by = 0.45 * math.sin(math.pi / 5), 0.45 * math.cos(math.pi / 5)
        nx, ny = 1 - by, bx  # outward normal of the edge (0, 1) -> (bx, by)
        return (px * nx + (py - 1) * ny) / math.hypot(nx, ny)
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
