"""Augmentations of an image and its boxes, on ``torchvision.transforms.v2``.

``data.transforms`` augments training images and does nothing else: the
network input size is the detector's (``model.preprocess.min_size``,
``max_size`` and ``train_min_sizes`` for multi-scale training), so training,
evaluation and ``predict`` resize the same way, inside the model.

Each step is a ``transform`` plugin (:class:`detkit.interfaces.Transform`;
built-ins ``hflip`` and ``photometric`` here, ``photometric_distort``,
``iou_crop``, ``zoom_out`` and ``random_resized_crop`` in
:mod:`detkit.data.augment`, registered in the entry-point group
``detkit.transform``).  ``data.transforms`` is either a list of steps
(``[{type: hflip, p: 0.5}, {type: photometric}]``) or the settings mapping
(``{hflip, photometric}``), which stands for ``[hflip, photometric]``.

A :class:`DetectionTransform` runs the steps in train mode, drawing its random
numbers from the ``torch.Generator`` it is given, so a sample's augmentation is
a function of the seed the loader hands out for it (see
:mod:`detkit.data.loader`), whatever the number of workers.  It counts the
boxes the steps dropped (a crop that leaves them degenerate) in the target's
``"augment_dropped"``; the loader's batches sum it and training reports it.  Eval mode returns
the image and its target unchanged: evaluation sees the images ``predict`` sees.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from detkit.data.config import HFLIP_P, TransformConfig
from detkit.interfaces import Transform

_XYXY = tv_tensors.BoundingBoxFormat.XYXY


def hflip_boxes(boxes: Tensor, width: int) -> Tensor:
    """``[G, 4]`` xyxy boxes mirrored in an image ``width`` pixels wide (v2's box flip)."""
    return F.horizontal_flip_bounding_boxes(boxes, format=_XYXY, canvas_size=(1, int(width)))


def photometric(image: Tensor, factors: Tensor) -> Tensor:
    """Brightness, contrast and saturation by ``factors`` ``[3]`` (1 = unchanged), in that order (v2's ops)."""
    b, c, s = factors.tolist()
    image = F.adjust_brightness(image, b)
    image = F.adjust_contrast(image, c)
    return F.adjust_saturation(image, s)


# ----------------------------------------------------------- transform plugins
class HorizontalFlip(Transform):
    """Mirror the image and its boxes with probability ``p`` (train only)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        p: float = Field(HFLIP_P, ge=0, le=1, description="probability of a horizontal flip")

    random_draws = 1
    train_only = True

    def __init__(self, params: "HorizontalFlip.Params | None" = None):
        self.p = (params if params is not None else self.Params()).p

    def __repr__(self) -> str:
        return f"HorizontalFlip(p={self.p})"

    def __call__(self, image: Tensor, target: dict[str, Any], rand: Tensor | None) -> tuple[Tensor, dict[str, Any]]:
        if rand is None or not bool(rand[0] < self.p):
            return image, target
        target["boxes"] = hflip_boxes(target["boxes"], int(image.shape[-1]))
        return F.horizontal_flip(image), target


class Photometric(Transform):
    """Random brightness, contrast and saturation, each factor in ``[1 - s, 1 + s]`` (train only)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")

        brightness: float = Field(0.25, ge=0, le=1)
        contrast: float = Field(0.25, ge=0, le=1)
        saturation: float = Field(0.25, ge=0, le=1)

    random_draws = 3
    train_only = True

    def __init__(self, params: "Photometric.Params | None" = None):
        p = params if params is not None else self.Params()
        self.strength = torch.tensor([p.brightness, p.contrast, p.saturation])

    def __repr__(self) -> str:
        return "Photometric(brightness={:g}, contrast={:g}, saturation={:g})".format(*self.strength.tolist())

    def __call__(self, image: Tensor, target: dict[str, Any], rand: Tensor | None) -> tuple[Tensor, dict[str, Any]]:
        if rand is None:
            return image, target
        return photometric(image, 1 + self.strength * (2 * rand - 1)), target


def steps_from_config(cfg: TransformConfig) -> list[Transform]:
    """The steps a ``data.transforms`` mapping (the settings form) stands for.

    Same order and random draws as a list ``[hflip, photometric]``.
    """
    steps: list[Transform] = [HorizontalFlip(HorizontalFlip.Params(p=cfg.hflip))]
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
    """``(image [3, H, W], target) -> (image [3, H, W], target)``: the steps in order, boxes moved along.

    Train mode gives each step its ``random_draws`` numbers from the sample's
    generator, a fixed count per step whatever its options.  Eval mode runs no
    step: the model sees the original image, as in ``predict``.
    """

    def __init__(self, cfg: TransformConfig | Sequence[Any], train: bool):
        self.cfg = cfg
        self.train = train
        self.steps = build_steps(cfg)

    def __repr__(self) -> str:
        return f"DetectionTransform(train={self.train}, {self.steps!r})"

    def __call__(
        self, image: Tensor, target: dict[str, Any], generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Any]]:
        out = dict(target)
        if not self.train:
            return image, out
        boxes = len(out["boxes"])
        for step in self.steps:
            rand = torch.rand(step.random_draws, generator=generator) if step.random_draws else None
            image, out = step(image, out, rand)
        out["augment_dropped"] = boxes - len(out["boxes"])
        return image, out


def build_transform(cfg: TransformConfig | Sequence[Any], train: bool) -> DetectionTransform:
    """The train-mode (augmenting) or eval-mode (identity) transform of ``data.transforms``."""
    return DetectionTransform(cfg, train)
