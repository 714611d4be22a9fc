"""Augmentation steps backed by ``torchvision.transforms.v2``: photometric distort, IoU crop, zoom-out,
random resized crop.

Each is a ``transform`` plugin (:class:`detkit.interfaces.Transform`).  Inside a
step the sample is a ``tv_tensors.Image`` and ``tv_tensors.BoundingBoxes``
(XYXY, ``canvas_size`` the image's), so v2 does the box bookkeeping; between
steps the boxes are plain float32 ``[G, 4]`` tensors, as the Transform
contract has them.

**Seeded draws.**  v2 draws its parameters from torch's global generator.  A
:class:`V2Step` takes three uniform numbers from the sample's generator (the
contract's ``rand``): the first decides whether the step runs at all
(probability ``p``), the other two make a 48-bit seed for the global CPU
generator while v2 runs (:func:`seeded`: its state is restored after).  So a
sample's augmentation is a function of the seed the loader hands out for it,
whatever the number of workers.

**Dropped boxes.**  After a geometric step the boxes are clipped to the new
image and those narrower or lower than ``min_size`` pixels are dropped, with
the same rows of every per-box key (:data:`PER_BOX_KEYS`), so labels stay
aligned.  :class:`~detkit.data.transforms.DetectionTransform` counts them per
sample; training reports the count per epoch.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from detkit import boxes as box_ops
from detkit.interfaces import Transform
from detkit.preprocess import IMAGENET_MEAN

# Target keys with one row per box: filtered together when boxes are dropped.
PER_BOX_KEYS = ("boxes", "labels", "difficult", "area", "iscrowd")


def seed_from(rand: Tensor) -> int:
    """A 48-bit seed from two uniform float32 draws (24 random bits each)."""
    hi, lo = (int(x * 2**24) for x in rand[:2].tolist())
    return (hi << 24) | lo


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Torch's global CPU generator seeded with ``seed`` inside the block, restored after.

    What ``torch.random.fork_rng`` + ``torch.manual_seed`` do for the CPU, at a
    small part of the cost: ``torch.manual_seed`` also seeds every accelerator
    backend, which costs more per sample than the transforms themselves
    (``benchmarks/loader.py --compare-augment`` prints both).
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


def sanitize(target: dict[str, Any], size: tuple[int, int], min_size: float) -> dict[str, Any]:
    """Boxes clipped to ``size`` (h, w); those under ``min_size`` px wide or high dropped, per-box keys alike."""
    h, w = size
    boxes = box_ops.clip(target["boxes"], h, w)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    target["boxes"] = boxes
    if bool(keep.all()):
        return target
    for key in PER_BOX_KEYS:
        value = target.get(key)
        if isinstance(value, Tensor) and value.dim() >= 1 and len(value) == len(keep):
            target[key] = value[keep]
    return target


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _ordered(pair: tuple[float, float], name: str = "") -> tuple[float, float]:
    if pair[0] > pair[1]:
        raise ValueError(f"{name}[{pair[0]:g}, {pair[1]:g}] is not a range (the first is larger)")
    return pair


class V2Step(Transform):
    """A step that runs a ``torchvision.transforms.v2`` transform with seeded draws (see the module doc).

    Subclasses set ``Params`` (with ``p`` and, for geometric steps, ``min_size``)
    and :meth:`v2_transform` ``(height, width) -> v2 transform``; ``geometric``
    says whether the boxes move (then they are clipped and sanitized after).
    A plugin author can subclass it to wrap any v2 transform.
    """

    random_draws = 3
    train_only = True
    geometric = True

    def __init__(self, params: BaseModel | None = None):
        self.params = params if params is not None else self.Params()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{type(self).__name__}({args})"

    def v2_transform(self, height: int, width: int) -> Any:
        raise NotImplementedError

    def skip(self, image: Tensor, target: dict[str, Any]) -> bool:
        """Whether this sample is left alone whatever the draw (e.g. IoU crop of an image without boxes)."""
        return False

    def __call__(self, image: Tensor, target: dict[str, Any], rand: Tensor | None) -> tuple[Tensor, dict[str, Any]]:
        if rand is None or not bool(rand[0] < self.params.p) or self.skip(image, target):
            return image, target
        h, w = int(image.shape[-2]), int(image.shape[-1])
        transform = self.v2_transform(h, w)
        boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(h, w))
        with seeded(seed_from(rand[1:])):
            out_image, out_boxes = transform(tv_tensors.Image(image), boxes)
        image = out_image.as_subclass(Tensor)
        out = dict(target)
        out["boxes"] = out_boxes.as_subclass(Tensor).float()
        if self.geometric:
            out = sanitize(out, (int(image.shape[-2]), int(image.shape[-1])), self.params.min_size)
        return image, out


class PhotometricDistort(V2Step):
    """SSD's photometric distortion (``v2.RandomPhotometricDistort``): brightness, contrast, saturation, hue
    and a channel shuffle, each applied with probability ``p``."""

    class Params(_Params):
        brightness: tuple[float, float] = (0.875, 1.125)
        contrast: tuple[float, float] = (0.5, 1.5)
        saturation: tuple[float, float] = (0.5, 1.5)
        hue: tuple[float, float] = (-0.05, 0.05)
        p: float = Field(0.5, ge=0, le=1, description="probability of each of the five distortions")

        _ranges = field_validator("brightness", "contrast", "saturation", "hue")(_ordered)

        @field_validator("hue")
        @classmethod
        def _hue(cls, v: tuple[float, float]) -> tuple[float, float]:
            if not -0.5 <= v[0] <= v[1] <= 0.5:
                raise ValueError("must lie within [-0.5, 0.5]")
            return v

    geometric = False

    def __init__(self, params: "PhotometricDistort.Params | None" = None):
        super().__init__(params)
        p = self.params
        self._v2 = v2.RandomPhotometricDistort(p.brightness, p.contrast, p.saturation, p.hue, p=p.p)

    def __call__(self, image: Tensor, target: dict[str, Any], rand: Tensor | None) -> tuple[Tensor, dict[str, Any]]:
        if rand is None:
            return image, target
        with seeded(seed_from(rand[1:])):
            image = self._v2(tv_tensors.Image(image)).as_subclass(Tensor)
        return image, target


class IoUCrop(V2Step):
    """SSD's minimum-IoU random crop (``v2.RandomIoUCrop``): a crop whose IoU with some box is at least one
    of ``sampler_options`` (1.0: no crop); boxes whose centre falls outside are dropped.  The crop keeps its
    pixel size; images without boxes are left alone."""

    class Params(_Params):
        min_scale: float = Field(0.3, gt=0, le=1, description="smallest crop side, as a fraction of the image's")
        max_scale: float = Field(1.0, gt=0, le=1)
        min_aspect_ratio: float = Field(0.5, gt=0)
        max_aspect_ratio: float = Field(2.0, gt=0)
        sampler_options: list[float] = Field([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0], min_length=1)
        trials: int = Field(40, ge=1)
        p: float = Field(1.0, ge=0, le=1, description="probability of trying a crop")
        min_size: float = Field(1.0, ge=0, description="boxes narrower or lower than this (px) are dropped")

        @model_validator(mode="after")
        def _ranges(self) -> "IoUCrop.Params":
            _ordered((self.min_scale, self.max_scale), "min_scale, max_scale: ")
            _ordered((self.min_aspect_ratio, self.max_aspect_ratio), "min_aspect_ratio, max_aspect_ratio: ")
            return self

    def __init__(self, params: "IoUCrop.Params | None" = None):
        super().__init__(params)
        p = self.params
        self._v2 = v2.RandomIoUCrop(p.min_scale, p.max_scale, p.min_aspect_ratio, p.max_aspect_ratio,
                                    list(p.sampler_options), p.trials)

    def skip(self, image: Tensor, target: dict[str, Any]) -> bool:
        return len(target["boxes"]) == 0  # v2's IoU test needs a box

    def v2_transform(self, height: int, width: int) -> Any:
        return self._v2


class ZoomOut(V2Step):
    """``v2.RandomZoomOut``: the image on a canvas ``side_range`` times its size, filled with ``fill``
    (0..1 RGB; default the ImageNet mean, which the detector normalises to 0), at a random place."""

    class Params(_Params):
        side_range: tuple[float, float] = (1.0, 4.0)
        fill: tuple[float, float, float] = IMAGENET_MEAN
        p: float = Field(0.5, ge=0, le=1, description="probability of a zoom-out")
        min_size: float = Field(1.0, ge=0, description="boxes narrower or lower than this (px) are dropped")

        @field_validator("side_range")
        @classmethod
        def _side_range(cls, v: tuple[float, float]) -> tuple[float, float]:
            if v[0] < 1:
                raise ValueError("must start at 1 or more (the canvas is at least the image)")
            return _ordered(v)

    def __init__(self, params: "ZoomOut.Params | None" = None):
        super().__init__(params)
        p = self.params
        # p=1 inside: whether to zoom was drawn already (V2Step's gate).
        self._v2 = v2.RandomZoomOut(fill={tv_tensors.Image: list(p.fill), "others": 0},
                                    side_range=tuple(p.side_range), p=1.0)

    def v2_transform(self, height: int, width: int) -> Any:
        return self._v2


class RandomResizedCrop(V2Step):
    """``v2.RandomResizedCrop`` for detection: a random region of ``scale`` times the image's area, of
    aspect ratio ``ratio`` times the image's own, resized back to the image's size.

    So the step zooms in and keeps the image's size (and its aspect-ratio group in
    the loader's batching); the network input size stays the detector's
    (``model.preprocess``).  Boxes cut by the crop are clipped to it; those left
    under ``min_size`` px are dropped.
    """

    class Params(_Params):
        scale: tuple[float, float] = Field((0.3, 1.0), description="crop area, as a fraction of the image's")
        ratio: tuple[float, float] = Field((0.75, 4 / 3), description="crop aspect ratio over the image's")
        p: float = Field(0.5, ge=0, le=1, description="probability of a crop")
        min_size: float = Field(1.0, ge=0, description="boxes narrower or lower than this (px) are dropped")
        antialias: bool = True

        @field_validator("scale")
        @classmethod
        def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
            if not 0 < v[0] <= 1 or not 0 < v[1] <= 1:
                raise ValueError("must lie within (0, 1]")
            return _ordered(v)

        @field_validator("ratio")
        @classmethod
        def _ratio(cls, v: tuple[float, float]) -> tuple[float, float]:
            if v[0] <= 0:
                raise ValueError("must be positive")
            return _ordered(v)

    def v2_transform(self, height: int, width: int) -> Any:
        p = self.params
        aspect = width / height
        return v2.RandomResizedCrop((height, width), scale=tuple(p.scale),
                                    ratio=(p.ratio[0] * aspect, p.ratio[1] * aspect), antialias=p.antialias)
