"""Image + box transforms: resize, flip, photometric and scale jitter.

A :class:`DetectionTransform` is built from a :class:`TransformConfig` in
train or eval mode.  Eval mode only resizes and is deterministic; train mode
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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from detkit.data.config import TransformConfig

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


class DetectionTransform:
    """``(image [3, H, W], target) -> (image [3, H', W'], target)`` with boxes moved along."""

    def __init__(self, cfg: TransformConfig, train: bool):
        self.cfg = cfg
        self.train = train

    def __repr__(self) -> str:
        return f"DetectionTransform(train={self.train}, {self.cfg!r})"

    def output_size(self, height: int, width: int, jitter: float = 1.0) -> tuple[int, int]:
        """The resized ``(height, width)`` of a ``height x width`` image."""
        c = self.cfg
        return resize_shape(height, width, round(c.min_size * jitter), round(c.max_size * jitter), c.fixed_size)

    def boxes_only(self, size: tuple[int, int], target: dict[str, Any]) -> tuple[tuple[int, int], dict[str, Any]]:
        """Eval-mode geometry on annotations alone: ``(new size, target)`` without pixels."""
        if self.train:
            raise RuntimeError("boxes_only is deterministic and needs an eval-mode transform")
        h, w = int(size[0]), int(size[1])
        nh, nw = self.output_size(h, w)
        return (nh, nw), self._finish_target(target, h, w, nh, nw, flip=False)

    def __call__(
        self, image: Tensor, target: dict[str, Any], generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Any]]:
        h, w = int(image.shape[-2]), int(image.shape[-1])
        jitter, flip, factors = 1.0, False, None
        if self.train:
            # A fixed number of draws, whatever is enabled, so that one option
            # does not shift the random stream of the others.
            r = torch.rand(5, generator=generator)
            if self.cfg.scale_jitter is not None:
                lo, hi = self.cfg.scale_jitter
                jitter = lo + (hi - lo) * float(r[0])
            flip = bool(r[1] < self.cfg.hflip)
            if self.cfg.photometric:
                strength = torch.tensor([_BRIGHTNESS, _CONTRAST, _SATURATION])
                factors = 1 + strength * (2 * r[2:5] - 1)
        nh, nw = self.output_size(h, w, jitter)
        image = resize(image, (nh, nw))
        if flip:
            image = image.flip(-1)
        if factors is not None:
            image = photometric(image, factors)
        return image, self._finish_target(target, h, w, nh, nw, flip)

    @staticmethod
    def _finish_target(target: dict[str, Any], h: int, w: int, nh: int, nw: int, flip: bool) -> dict[str, Any]:
        sx, sy = nw / w, nh / h
        boxes = scale_boxes(target["boxes"], sx, sy)
        if flip:
            boxes = hflip_boxes(boxes, nw)
        # Rounding of the output size can push a border box a fraction past the edge.
        boxes = torch.stack(
            (boxes[:, 0].clamp(0, nw), boxes[:, 1].clamp(0, nh), boxes[:, 2].clamp(0, nw), boxes[:, 3].clamp(0, nh)),
            dim=1,
        )
        out = dict(target)
        out["boxes"] = boxes
        out["scale"] = math.sqrt(sx * sy)
        out["orig_size"] = torch.tensor([h, w], dtype=torch.int64)
        return out


def build_transform(cfg: TransformConfig, train: bool) -> DetectionTransform:
    """The train-mode (augmenting) or eval-mode (resize only) transform of ``cfg``."""
    return DetectionTransform(cfg, train)
