"""Batching: a list of images of their own sizes and their targets, as the detector takes them."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

import torch
from torch import Tensor


@dataclass
class Batch:
    """N (augmented) samples at their own sizes; the detector resizes, normalises and pads them.

    images: ``[3, H_i, W_i]`` per image, uint8 0..255 in transit from a loader
    built with ``uint8=True`` (a quarter of the bytes through worker queues,
    pinned memory and the host-to-device copy; the detector converts them on
    its device) or float32 0..1;
    boxes / labels / difficult: per image ``[G, 4]`` float32 xyxy in that
    image's pixels / ``[G]`` int64 / ``[G]`` bool; image_ids: N strings;
    augment_dropped: boxes the augmentation dropped in these samples (degenerate
    after a crop), for the training log.
    """

    images: list[Tensor]
    boxes: list[Tensor]
    labels: list[Tensor]
    difficult: list[Tensor]
    image_ids: list[str]
    augment_dropped: int = 0

    def __len__(self) -> int:
        return len(self.images)

    def _map(self, fn: Any) -> "Batch":
        def apply(x: Any) -> Any:
            if isinstance(x, list) and x and isinstance(x[0], Tensor):
                return [fn(t) for t in x]
            return x

        return replace(self, **{f.name: apply(getattr(self, f.name)) for f in fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on ``device`` (image ids stay as they are)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Called by ``DataLoader(pin_memory=True)`` for custom batch types."""
        return self._map(lambda t: t.pin_memory())

    @property
    def targets(self) -> list[dict[str, Tensor]]:
        """Per image ``{"boxes", "labels", "difficult"}``: the detector's and the evaluators' input."""
        return [
            {"boxes": b, "labels": l, "difficult": d} for b, l, d in zip(self.boxes, self.labels, self.difficult)
        ]


def to_uint8(image: Tensor) -> Tensor:
    """A float 0..1 image as uint8 0..255 (rounded); uint8 images pass through."""
    if image.dtype == torch.uint8:
        return image
    return image.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


class Collate:
    """``collate([(image, target), ...]) -> Batch`` (a class, so that workers can pickle it).

    ``uint8=True`` ships the images as uint8 (see :class:`Batch`).
    """

    def __init__(self, uint8: bool = False):
        self.uint8 = uint8

    def __call__(self, samples: Sequence[tuple[Tensor, dict[str, Any]]]) -> Batch:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        images, targets = zip(*samples)
        return Batch(
            images=[to_uint8(im) if self.uint8 else im.float() for im in images],
            boxes=[t["boxes"].float().reshape(-1, 4) for t in targets],
            labels=[t["labels"].long() for t in targets],
            difficult=[
                t["difficult"].bool() if "difficult" in t else torch.zeros(len(t["labels"]), dtype=torch.bool)
                for t in targets
            ],
            image_ids=[str(t.get("image_id", "")) for t in targets],
            augment_dropped=sum(int(t.get("augment_dropped", 0)) for t in targets),
        )


def collate(samples: Sequence[tuple[Tensor, dict[str, Any]]]) -> Batch:
    """Collate keeping the images' dtype (float32)."""
    return Collate()(samples)
