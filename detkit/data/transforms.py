"""Image + box transforms: resize (with scale jitter), flip, photometric.

Each step is a ``transform`` plugin (:class:`detkit.interfaces.Transform`;
built-ins ``resize``, ``hflip``, ``photometric``, registered in the entry-point
group ``detkit.transform``).  ``data.transforms`` is either a list of steps
(``[{type: resize, min_size: 600}, {type: hflip, p: 0.5}]``) or the settings
mapping (``{min_size, max_size, fixed_size, hflip, photometric, scale_jitter}``),
which stands for ``[resize, hflip, photometric]``.

A :class:`DetectionTransform` runs the steps in train or eval mode.  Eval mode
skips the augmentations and is deterministic; train mode
draws its random numbers from the ``torch.Generator`` it is given, so a
sample's augmentation is a function of the seed the loader hands out for it
(see :mod:`detkit.data.loader`), whatever the number of workers.

Every transformed target also carries ``scale`` (float: how much the image
was enlarged; the geometric mean of the x and y factors for ``fixed_size``)
and ``orig_size`` (int64 ``[2]``: height, width before resizing), so
predictions can be mapped back to the original pixels.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from detkit.data.config import TransformConfig
from detkit.interfaces import Transform

# Photometric jitter: each factor is drawn from [1 - s, 1 + s].
_BRIGHTNESS = 0.25
_CONTRAST = 0.25
_SATURATION = 0.25
_GRAY = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def resize_shape(
    height: int,
    width: int,
    min_size: int,
    max_size: int | None,
    fixed_size: tuple[int, int] | None = None,
    rounding: str = "round",
) -> tuple[int, int]:
    """Output ``(height, width)``: short side ``min_size``, long side at most ``max_size``.

    The one resize policy of detkit (training, evaluation and ``predict``):
    ``scale = min(min_size / short, max_size / long)``, each side times
    ``scale``, then rounded (``round``, the default), floored in floating
    point (``floor``: torchvision's ``GeneralizedRCNNTransform``) or truncated
    from exact integer ratios (``truncate``: faster-rcnn-pytorch).
    ``max_size=None``: no cap on the long side.
    """
    if fixed_size is not None:
        return int(fixed_size[0]), int(fixed_size[1])
    short, long = min(height, width), max(height, width)
    scale = min_size / short
    if max_size is not None and long * scale > max_size:
        scale = max_size / long
    if rounding == "floor":
        return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))
    if rounding == "truncate":
        # The limiting side gets its target exactly, the other side is truncated
        # from exact integer arithmetic (faster-rcnn-pytorch); "floor" may give
        # min_size - 1 where the floating-point scale rounds down.
        capped = max_size is not None and long * min_size > max_size * short
        num, den = (max_size, long) if capped else (min_size, short)
        return max(1, height * num // den), max(1, width * num // den)
    if rounding != "round":
        raise ValueError(f"rounding must be 'round', 'floor' or 'truncate', got {rounding!r}")
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``[3, H, W]`` to ``size`` (antialiased when shrinking)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)
    return out[0].clamp_(0, 1)


def scale_boxes(boxes: Tensor, sx: float, sy: float) -> Tensor:
    """``[G, 4]`` xyxy boxes scaled by ``sx`` horizontally and ``sy`` vertically."""
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


def hflip_boxes(boxes: Tensor, width: int | float) -> Tensor:
    """``[G, 4]`` xyxy boxes mirrored in an image ``width`` pixels wide."""
    return torch.stack((width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]), dim=1)


def photometric(image: Tensor, factors: Tensor) -> Tensor:
    """Brightness, contrast and saturation by ``factors`` ``[3]`` (1 = unchanged)."""
    b, c, s = factors.tolist()
    image = image * b
    mean = (image * _GRAY).sum(0).mean()
    image = (image - mean) * c + mean
    gray = (image * _GRAY).sum(0, keepdim=True)
    image = (image - gray) * s + gray
    return image.clamp_(0, 1)


# ----------------------------------------------------------- transform plugins
class Resize(Transform):
    """Resize so the short side is ``min_size`` and the long side at most ``max_size``.

    ``fixed_size`` (height, width) ignores the aspect ratio; ``scale_jitter``
    (low, high) multiplies both sizes by a random factor in train mode;
    ``rounding`` is :func:`resize_shape`'s.  Boxes scale with the pixels.
    """

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        min_size: int = Field(600, gt=0, description="short side after resizing")
        max_size: int | None = Field(1000, gt=0, description="cap on the long side after resizing; null: none")
        fixed_size: tuple[int, int] | None = Field(
            None, description="(height, width) to resize to, ignoring aspect; overrides min/max_size"
        )
        scale_jitter: tuple[float, float] | None = Field(
            None, description="random factor range applied to min_size and max_size (train)"
        )
        rounding: Literal["round", "floor", "truncate"] = "round"

        @model_validator(mode="after")
        def _ranges(self) -> "Resize.Params":
            if self.fixed_size is not None and min(self.fixed_size) <= 0:
                raise ValueError(f"fixed_size {self.fixed_size}: both sides must be > 0")
            if self.scale_jitter is not None and not 0 < self.scale_jitter[0] <= self.scale_jitter[1]:
                raise ValueError(f"scale_jitter {self.scale_jitter}: need 0 < low <= high")
            return self

    random_draws = 1

    def __init__(self, min_size: int = 600, max_size: int | None = 1000, fixed_size: tuple[int, int] | None = None,
                 scale_jitter: tuple[float, float] | None = None, rounding: str = "round"):
        self.min_size, self.max_size, self.fixed_size = min_size, max_size, fixed_size
        self.scale_jitter, self.rounding = scale_jitter, rounding

    def __repr__(self) -> str:
        return (f"Resize(min_size={self.min_size}, max_size={self.max_size}, fixed_size={self.fixed_size}, "
                f"scale_jitter={self.scale_jitter})")

    def output_size(self, height: int, width: int, jitter: float = 1.0) -> tuple[int, int]:
        max_size = round(self.max_size * jitter) if self.max_size is not None else None
        return resize_shape(height, width, round(self.min_size * jitter), max_size, self.fixed_size, self.rounding)

    def eval_boxes(self, boxes: Tensor, size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
        return scale_boxes(boxes, new_size[1] / size[1], new_size[0] / size[0])

    def __call__(self, image: Tensor, target: dict[str, Any], rand: Tensor | None) -> tuple[Tensor, dict[str, Any]]:
        jitter = 1.0
        if rand is not None and self.scale_jitter is not None:
            lo, hi = self.scale_jitter
            jitter = lo + (hi - lo) * float(rand[0])
        h, w = int(image.shape[-2]), int(image.shape[-1])
        nh, nw = self.output_size(h, w, jitter)
        target["boxes"] = self.eval_boxes(target["boxes"], (h, w), (nh, nw))
        return resize(image, (nh, nw)), target


class HorizontalFlip(Transform):
    """Mirror the image and its boxes with probability ``p`` (train only)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        p: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")

    random_draws = 1
    train_only = True

    def __init__(self, p: float = 0.5):
        self.p = p

    def __repr__(self) -> str:
        return f"HorizontalFlip(p={self.p})"

    def __call__(self, image: Tensor, target: dict[str, Any], rand: Tensor | None) -> tuple[Tensor, dict[str, Any]]:
        if rand is None or not bool(rand[0] < self.p):
            return image, target
        target["boxes"] = hflip_boxes(target["boxes"], int(image.shape[-1]))
        return image.flip(-1), target


class Photometric(Transform):
    """Random brightness, contrast and saturation, each factor in ``[1 - s, 1 + s]`` (train only)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        brightness: float = Field(_BRIGHTNESS, ge=0, le=1)
        contrast: float = Field(_CONTRAST, ge=0, le=1)
        saturation: float = Field(_SATURATION, ge=0, le=1)

    random_draws = 3
    train_only = True

    def __init__(self, brightness: float = _BRIGHTNESS, contrast: float = _CONTRAST, saturation: float = _SATURATION):
        self.strength = torch.tensor([brightness, contrast, saturation])

    def __repr__(self) -> str:
        return "Photometric(brightness={:g}, contrast={:g}, saturation={:g})".format(*self.strength.tolist())

    def __call__(self, image: Tensor, target: dict[str, Any], rand: Tensor | None) -> tuple[Tensor, dict[str, Any]]:
        if rand is None:
            return image, target
        return photometric(image, 1 + self.strength * (2 * rand - 1)), target


def steps_from_config(cfg: TransformConfig) -> list[Transform]:
    """The steps a ``data.transforms`` mapping (the settings form) stands for.

    Same order and random draws as a list ``[resize, hflip, photometric]``.
    """
    steps: list[Transform] = [
        Resize(cfg.min_size, cfg.max_size, cfg.fixed_size, cfg.scale_jitter),
        HorizontalFlip(cfg.hflip),
    ]
    if cfg.photometric:
        steps.append(Photometric())
    return steps


def build_steps(cfg: Any) -> list[Transform]:
    """Steps from a :class:`TransformConfig`, or a list of ``{type: ..., ...}`` specs/steps."""
    if isinstance(cfg, TransformConfig):
        return steps_from_config(cfg)
    from detkit.registry import registry

    steps = []
    for i, spec in enumerate(cfg):
        step = spec if isinstance(spec, Transform) else registry("transform").build(spec)
        if not isinstance(step, Transform):
            raise TypeError(f"data.transforms[{i}]: {type(step).__name__} is not a detkit.interfaces.Transform")
        steps.append(step)
    return steps


class DetectionTransform:
    """``(image [3, H, W], target) -> (image [3, H', W'], target)``: the steps in order, boxes moved along.

    Eval mode skips the ``train_only`` steps (augmentations) and draws nothing.
    Train mode gives each step its ``random_draws`` numbers from the sample's
    generator, a fixed count per step whatever its options.
    """

    def __init__(self, cfg: TransformConfig | Sequence[Any], train: bool):
        self.cfg = cfg
        self.train = train
        self.steps = build_steps(cfg)

    def __repr__(self) -> str:
        return f"DetectionTransform(train={self.train}, {self.steps!r})"

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """The size every image is resized to regardless of aspect, if a step does that."""
        sizes = [getattr(s, "fixed_size", None) for s in self.steps]
        return next((s for s in sizes if s is not None), None)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The eval-mode ``(height, width)`` of a ``height x width`` image."""
        for step in self.steps:
            if not step.train_only:
                height, width = step.output_size(height, width)
        return height, width

    def boxes_only(self, size: tuple[int, int], target: dict[str, Any]) -> tuple[tuple[int, int], dict[str, Any]]:
        """Eval-mode geometry on annotations alone: ``(new size, target)`` without pixels."""
        if self.train:
            raise RuntimeError("boxes_only is deterministic and needs an eval-mode transform")
        h, w = int(size[0]), int(size[1])
        out = dict(target)
        nh, nw = h, w
        for step in self.steps:
            if not step.train_only:
                new = step.output_size(nh, nw)
                out["boxes"] = step.eval_boxes(out["boxes"], (nh, nw), new)
                nh, nw = new
        return (nh, nw), self._finish_target(out, h, w, nh, nw)

    def __call__(
        self, image: Tensor, target: dict[str, Any], generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Any]]:
        h, w = int(image.shape[-2]), int(image.shape[-1])
        out = dict(target)
        for step in self.steps:
            if self.train:
                rand = torch.rand(step.random_draws, generator=generator) if step.random_draws else None
            elif step.train_only:
                continue
            else:
                rand = None
            image, out = step(image, out, rand)
        return image, self._finish_target(out, h, w, int(image.shape[-2]), int(image.shape[-1]))

    @staticmethod
    def _finish_target(target: dict[str, Any], h: int, w: int, nh: int, nw: int) -> dict[str, Any]:
        sx, sy = nw / w, nh / h
        boxes = target["boxes"]
        # Rounding of the output size can push a border box a fraction past the edge.
        boxes = torch.stack(
            (boxes[:, 0].clamp(0, nw), boxes[:, 1].clamp(0, nh), boxes[:, 2].clamp(0, nw), boxes[:, 3].clamp(0, nh)),
            dim=1,
        )
        target["boxes"] = boxes
        target["scale"] = math.sqrt(sx * sy)
        target["orig_size"] = torch.tensor([h, w], dtype=torch.int64)
        return target


def build_transform(cfg: TransformConfig | Sequence[Any], train: bool) -> DetectionTransform:
    """The train-mode (augmenting) or eval-mode transform of ``data.transforms``."""
    return DetectionTransform(cfg, train)
